"""Every part of llama-cpp-python this project touches that is not its public API, in one place (as
`tui/internals.py` does for Textual), with why, and what to check on an upgrade (pinned:
llama-cpp-python[server]==0.3.36 in pyproject.toml; the guard test is tests/test_llama_internals.py).

- `Llama._batch` (a `llama_cpp._internals.LlamaBatch` of n_batch tokens) and `Llama._ctx.decode(batch)`
  (`LlamaContext.decode`): `decode_with_logits` reads a token and the guesses after it in one batch, with logits
  for every row (prompt-lookup drafting: `agent.researcher.local._Drafter`). `Llama.eval` keeps logits of the
  last token only. Check that `Llama.__init__` still sets `self._batch` and `self._ctx`, and the signatures of
  `LlamaBatch.set_batch(batch, n_past, logits_all)` and `LlamaContext.decode(batch)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def decode_with_logits(llm: Any, tokens: Sequence[int], n_past: int) -> None:
    """Decode `tokens` after the first `n_past` of the context, with logits for each (rows 0..n-1); raises
    RuntimeError as llama.cpp's decode does."""
    batch = llm._batch  # llama-cpp-python's own batch: room for n_batch tokens
    batch.set_batch(batch=tokens, n_past=n_past, logits_all=True)
    llm._ctx.decode(batch)
