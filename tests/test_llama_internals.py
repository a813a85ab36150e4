"""Guards for the private parts of llama-cpp-python that agent/researcher/llama_internals.py uses: an upgrade
that moves them fails here, by name, instead of in the middle of a proposal."""

from __future__ import annotations

import inspect

import llama_cpp
from llama_cpp import _internals


def test_llama_keeps_its_own_batch_and_context() -> None:
    source = inspect.getsource(llama_cpp.Llama.__init__)
    assert "self._batch = " in source and "self._ctx = " in source


def test_the_batch_and_decode_signatures_are_the_ones_used() -> None:
    assert list(inspect.signature(_internals.LlamaBatch.set_batch).parameters) == [
        "self",
        "batch",
        "n_past",
        "logits_all",
    ]
    assert list(inspect.signature(_internals.LlamaContext.decode).parameters) == ["self", "batch"]
