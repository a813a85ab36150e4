"""The researcher: who proposes the next experiment.

`proposer` (a model, retried on bad replies), `local` (in-process llama.cpp), `endpoint` (a local server),
`backend` (what both are), `models` (the model registry), `gguf` (model files), `prompt`, `reply` (the edit
grammar), `random_search` and `ideas` (proposers without a model).
"""
