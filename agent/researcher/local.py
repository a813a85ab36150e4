"""The in-process llama.cpp model: prefix reuse, grammar-constrained replies, prompt-lookup drafting, cancel.

llama_cpp is imported lazily (see `_llama_cpp`): OMP_WAIT_POLICY must be in the environment before the library
loads, and the TUI's first frame should not wait for it.
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from agent.researcher.backend import Completion, GenerationCancelled, GenerationStats, ModelError
from agent.researcher.llama_internals import decode_with_logits
from agent.researcher.models import validate
from agent.researcher.prompt import Message, PromptTooLong, render_chatml
from agent.researcher.reply import REPLY_GRAMMAR, close_open_string

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 8192
"""Context tokens allocated (capped by the model's own): the prompt is about 3k, replies and one retry fit."""
_STATE_SAVE_MIN_NEW = 400
"""Save the KV cache to disk only when at least this many of its tokens are new since the last save."""
DRAFT_NGRAM = 3
"""Prompt lookup: the last this many tokens are looked up in the prompt and the reply so far ..."""
DRAFT_TOKENS = 3
"""... and up to this many tokens that followed them are checked in the same batch as the next token. On 2
cores a batch of 4 tokens costs about 2x one token (2 costs 1.5x, 8 costs 4.5x): 3 guesses is the sweet spot."""
DRAFT_FROM = '"edits"'
"""Guess only once the reply has reached its edits, which copy train.py: its prose is rarely guessed right."""

_llama_module: ModuleType | None = None
_log_callback: Any = None


def _llama_cpp() -> ModuleType:
    """Import llama_cpp once, with OpenMP told not to spin and llama.cpp's log routed away from stderr."""
    global _llama_module, _log_callback
    if _llama_module is None:
        # Spinning OpenMP workers would steal the CPU from a training run beside us; must precede the import.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import llama_cpp

        # llama.cpp writes to stderr even with verbose=False (e.g. when a decode is aborted), which would
        # scribble over the TUI; its messages go to the logging module instead.
        @llama_cpp.llama_log_callback
        def _to_logging(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
            log.debug("llama.cpp: %s", text.decode("utf-8", errors="replace").rstrip())

        _log_callback = _to_logging
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        _llama_module = llama_cpp
    return _llama_module


def default_threads() -> int:
    """Threads for llama.cpp: AUTORESEARCH_LLM_THREADS, else every core this process may use."""
    if value := os.environ.get("AUTORESEARCH_LLM_THREADS"):
        return max(1, int(value))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS and Windows
        return max(1, os.cpu_count() or 1)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class LocalModel:
    """One GGUF loaded in-process: a single Llama kept for its KV cache, with cancellable generation."""

    def __init__(
        self,
        name: str,
        path: Path,
        *,
        n_ctx: int | None = None,
        threads: int | None = None,
        state_dir: Path | None = None,
        draft_tokens: int = DRAFT_TOKENS,
    ) -> None:
        info = validate(path)  # header and size check first: llama.cpp may crash on a truncated file
        lc = _llama_cpp()
        self.name = name
        self.path = path
        wanted = n_ctx or int(os.environ.get("AUTORESEARCH_LLM_CTX", DEFAULT_CONTEXT))
        self.n_ctx = min(wanted, info.context_length or wanted)
        self.threads = threads or default_threads()
        self.draft_tokens = draft_tokens
        """Prompt lookup guesses per step (0: none)."""
        try:
            self.llm = lc.Llama(
                str(path),
                n_ctx=self.n_ctx,
                n_batch=512,
                n_threads=self.threads,
                n_threads_batch=self.threads,
                verbose=False,
            )
        except Exception as exc:  # llama.cpp reports a bad file as ValueError or RuntimeError
            raise ModelError(f"{path}: llama.cpp could not load it: {exc}") from None
        self._lc = lc
        self._vocab = lc.llama_model_get_vocab(self.llm.model)
        self._n_vocab = self.llm.n_vocab()
        self._cancel: threading.Event | None = None
        # Checked by ggml between graph nodes: the only way to stop a long prompt evaluation promptly.
        self._abort = lc.ggml_abort_callback(self._should_abort)
        lc.llama_set_abort_callback(self.llm.ctx, self._abort, None)
        self._formatter = self._make_formatter(info.chat_template)
        self._state_path = self._state_file(state_dir) if state_dir else None
        self._saved_tokens: list[int] = []
        if self._state_path is not None:
            self._restore_state()

    # -- prompt text -------------------------------------------------------------------------------------

    def _make_formatter(self, template: str | None) -> Callable[[Sequence[Message]], str]:
        if not template:
            return render_chatml
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def token_text(token: int) -> str:
            if token < 0:
                return ""
            return self.llm.detokenize([token], special=True).decode("utf-8", errors="ignore")

        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=token_text(self.llm.token_eos()),
            bos_token=token_text(self.llm.token_bos()),
        )

        def render(messages: Sequence[Message]) -> str:
            try:
                return str(formatter(messages=list(messages)).prompt)  # type: ignore[arg-type]
            except Exception:  # a template that needs features we do not pass: ChatML is what most expect
                return render_chatml(messages)

        return render

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def _tokenize_prompt(self, messages: Sequence[Message]) -> list[int]:
        prompt = self._formatter(messages)
        bos = self.llm.token_bos()
        tokens = self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        if bos >= 0 and tokens[:2] == [bos, bos]:  # the template wrote its own BOS
            tokens = tokens[1:]
        return list(tokens)

    # -- cancellation --------------------------------------------------------------------------------------

    def _should_abort(self, _data: ctypes.c_void_p) -> bool:
        event = self._cancel
        return event is not None and event.is_set()

    # -- generation ----------------------------------------------------------------------------------------

    def _failed(self, exc: RuntimeError, partial: str) -> Exception:
        if self._cancel is not None and self._cancel.is_set():
            return GenerationCancelled(partial)
        return ModelError(f"{self.name}: llama.cpp failed: {exc}")

    def _eval(self, tokens: Sequence[int], partial: str) -> None:
        try:
            self.llm.eval(tokens)
        except RuntimeError as exc:
            raise self._failed(exc, partial) from None

    def _decode(self, tokens: Sequence[int], partial: str) -> None:
        """Append the next token and a guess of the ones after it, with logits for each (rows 0..n-1).

        Only the first token counts as read (`n_tokens`); the caller advances it for each guess it accepts, and
        the KV entries of guesses it did not accept are dropped here, before the next batch.
        """
        llm, lc = self.llm, self._lc
        n_past = llm.n_tokens
        lc.llama_memory_seq_rm(lc.llama_get_memory(llm.ctx), -1, n_past, -1)
        try:
            decode_with_logits(llm, tokens, n_past)
        except RuntimeError as exc:
            raise self._failed(exc, partial) from None
        llm.input_ids[n_past : n_past + len(tokens)] = tokens
        llm.n_tokens = n_past + 1

    def complete(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int,
        temperature: float,
        seed: int,
        on_text: Callable[[str], None],
        cancel: threading.Event,
        grammar: str | None = REPLY_GRAMMAR,
        draft_from: str = DRAFT_FROM,
    ) -> Completion:
        """Generate one reply, reusing the KV cache for the prompt prefix shared with the previous call.

        Prompt lookup guesses start once the reply contains `draft_from` ("" from the start).
        """
        tokens = self._tokenize_prompt(messages)
        room = self.n_ctx - len(tokens) - 1
        if room < 32:
            raise PromptTooLong(f"the prompt is {len(tokens)} tokens; the context holds {self.n_ctx}")
        max_tokens = min(max_tokens, room)
        llm = self.llm
        # Keep at least one token to evaluate: its logits are what we sample from.
        reused = min(_common_prefix(llm.input_ids[: llm.n_tokens].tolist(), tokens), len(tokens) - 1)
        self._cancel = cancel
        sampler = _Sampler(self._lc, self._vocab, self._n_vocab, grammar, temperature, seed)
        text_parts: list[str] = []
        try:
            if cancel.is_set():
                raise GenerationCancelled("")
            started = time.perf_counter()
            llm.n_tokens = reused  # eval() drops the KV cache beyond n_tokens first
            self._eval(tokens[reused:], "")
            prompt_done = time.perf_counter()
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            drafter = _Drafter(tokens, k=self.draft_tokens)
            draft: list[int] = []  # the guesses of the last batch not yet confirmed
            width = self.draft_tokens  # of the next guess: 1 after a guess that missed at once
            row = -1  # which logits of the last batch to sample from: the last prompt token's
            finish = "length"
            generated = drafted = accepted = 0
            guessing = not draft_from
            while generated < max_tokens:
                if cancel.is_set():
                    raise GenerationCancelled("".join(text_parts))
                token = sampler.sample(llm.ctx, row)
                if self._lc.llama_vocab_is_eog(self._vocab, token):
                    finish = "stop"
                    break
                generated += 1
                drafter.append(token)
                piece = decoder.decode(llm.detokenize([token]))
                if piece:
                    text_parts.append(piece)
                    on_text(piece)
                    if grammar and "}" in piece:
                        so_far = "".join(text_parts)
                        # The grammar allows nothing more: skip reading the end token. Or the model ended
                        # the reply inside a string it forgot to close: the rest would be prose.
                        if (piece.endswith("}") and _complete_json(so_far)) or close_open_string(so_far):
                            finish = "stop"
                            break
                if draft and draft[0] == token:  # guessed right: read already, its logits are the next row
                    draft.pop(0)
                    accepted += 1
                    llm.n_tokens += 1
                    row += 1
                    continue
                if generated == max_tokens:
                    break  # no logits are needed after the last token
                guessing = guessing or draft_from in "".join(text_parts[-6:])
                if draft:  # the last guess missed after `row` right tokens
                    width = 1 if row == 0 else width
                elif row > 0:  # all of it was right
                    width = self.draft_tokens
                room = min(width, max_tokens - generated, self.n_ctx - llm.n_tokens - 2, llm.n_batch - 1)
                draft = drafter.draft(room) if guessing else []
                drafted += len(draft)
                self._decode([token, *draft], "".join(text_parts))
                row = 0
            tail = decoder.decode(b"", final=True)
            if tail:
                text_parts.append(tail)
                on_text(tail)
            finished = time.perf_counter()
        finally:
            self._cancel = None
            sampler.close()
        stats = GenerationStats(
            prompt_tokens=len(tokens),
            reused_tokens=reused,
            prompt_seconds=prompt_done - started,
            generated_tokens=generated,
            generate_seconds=finished - prompt_done,
            finish_reason=finish,
            drafted_tokens=drafted,
            accepted_tokens=accepted,
        )
        return Completion(text="".join(text_parts), stats=stats)

    def set_threads(self, threads: int) -> None:
        """Change the thread count, e.g. while a training run shares the CPU."""
        self.threads = max(1, threads)
        self._lc.llama_set_n_threads(self.llm.ctx, self.threads, self.threads)

    # -- the prompt cache on disk --------------------------------------------------------------------------

    def _state_file(self, state_dir: Path) -> Path:
        stat = self.path.stat()
        version = getattr(self._lc, "__version__", "?")
        key = f"{self.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{self.n_ctx}|{version}"
        return state_dir / f"{self.path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.state"

    def _restore_state(self) -> None:
        path = self._state_path
        if path is None or not path.is_file():
            return
        capacity = self.n_ctx
        ids = (self._lc.llama_token * capacity)()
        count = ctypes.c_size_t(0)
        ok = self._lc.llama_state_load_file(
            self.llm.ctx, str(path).encode(), ids, capacity, ctypes.byref(count)
        )
        if not ok or count.value == 0:
            path.unlink(missing_ok=True)
            return
        n = int(count.value)
        self.llm.input_ids[:n] = ids[:n]
        self.llm.n_tokens = n
        self._saved_tokens = list(ids[:n])

    def remember(self) -> None:
        """Save the KV cache to disk when much of it is new (program.md or train.py changed), so that a
        restart skips the long prompt; a few new history rows are not worth the write."""
        path = self._state_path
        llm = self.llm
        if path is None or llm.n_tokens == 0:
            return
        current = llm.input_ids[: llm.n_tokens].tolist()
        if len(current) - _common_prefix(self._saved_tokens, current) < _STATE_SAVE_MIN_NEW:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        ids = (self._lc.llama_token * len(current))(*current)
        if self._lc.llama_state_save_file(llm.ctx, str(tmp).encode(), ids, len(current)):
            os.replace(tmp, path)
            self._saved_tokens = current
        else:
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        self._lc.llama_set_abort_callback(self.llm.ctx, self._lc.ggml_abort_callback(0), None)
        self.llm.close()


def _complete_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


class _Drafter:
    """Prompt lookup decoding: guesses the next tokens from where the last few appeared before.

    A reply copies much of its prompt (each "search" is a verbatim copy of train.py lines, each "replace"
    mostly a copy of its "search"), so the tokens that followed the same n-gram last time are often the ones
    the model writes next. The guesses are read in one batch with the next token, which on a CPU costs little
    more than that token alone; the sampler still picks every token from the model's own logits, so the
    reply is drawn from the same distribution as without guessing.
    """

    def __init__(self, tokens: Sequence[int], n: int = DRAFT_NGRAM, k: int = DRAFT_TOKENS) -> None:
        self.n, self.k = n, k
        self.tokens: list[int] = []
        self.follows: dict[tuple[int, ...], int] = {}
        """n-gram -> the index of the token after its latest occurrence."""
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        tokens = self.tokens
        tokens.append(token)
        end = len(tokens) - 1
        if end >= self.n:
            self.follows[tuple(tokens[end - self.n : end])] = end

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the current last n-gram the last time it appeared."""
        if limit <= 0 or len(self.tokens) < self.n:
            return []
        start = self.follows.get(tuple(self.tokens[-self.n :]))
        if start is None:
            return []
        return self.tokens[start : start + min(self.k, limit)]


class _Sampler:
    """top-k / top-p / min-p / temperature sampling, checked against a grammar.

    The grammar is applied to the one sampled token first and to the whole vocabulary only when that token is
    rejected (as llama.cpp's own common sampler does): masking all 150k tokens every step costs ~50 ms here.
    """

    def __init__(
        self, lc: ModuleType, vocab: Any, n_vocab: int, grammar: str | None, temperature: float, seed: int
    ) -> None:
        import numpy as np

        self._lc = lc
        self._np = np
        self.chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if temperature <= 0:
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_greedy())
        else:
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_top_k(40))
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_top_p(0.95, 1))
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_min_p(0.05, 1))
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_temp(temperature))
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        self.grammar = lc.llama_sampler_init_grammar(vocab, grammar.encode(), b"root") if grammar else None
        if grammar and not self.grammar:
            raise ModelError("llama.cpp rejected the reply grammar")
        dtype = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
        self._n_vocab = n_vocab
        self._ids = np.arange(n_vocab, dtype=np.intc)
        self._all = np.recarray((n_vocab,), dtype=dtype)
        self._all_array = lc.llama_token_data_array(
            data=self._all.ctypes.data_as(lc.llama_token_data_p), size=n_vocab, selected=-1, sorted=False
        )
        self._one = np.recarray((1,), dtype=dtype)
        self._one_array = lc.llama_token_data_array(
            data=self._one.ctypes.data_as(lc.llama_token_data_p), size=1, selected=-1, sorted=False
        )

    def _fill(self, ctx: Any, row: int) -> None:
        np, lc = self._np, self._lc
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, row), shape=(self._n_vocab,))
        self._all.id[:] = self._ids
        self._all.logit[:] = logits
        self._all.p[:] = 0.0
        self._all_array.size = self._n_vocab
        self._all_array.selected = -1
        self._all_array.sorted = False

    def _pick(self) -> int:
        self._lc.llama_sampler_apply(self.chain, ctypes.byref(self._all_array))
        return int(self._all.id[self._all_array.selected])

    def sample(self, ctx: Any, row: int = -1) -> int:
        """The next token from the logits of the last batch's `row` (-1: its last token)."""
        lc = self._lc
        self._fill(ctx, row)
        token = self._pick()
        if self.grammar is not None:
            self._one.id[0], self._one.logit[0], self._one.p[0] = token, 1.0, 0.0
            self._one_array.size, self._one_array.selected, self._one_array.sorted = 1, -1, False
            lc.llama_sampler_apply(self.grammar, ctypes.byref(self._one_array))
            if not self._np.isfinite(self._one.logit[0]):
                self._fill(ctx, row)
                lc.llama_sampler_apply(self.grammar, ctypes.byref(self._all_array))
                token = self._pick()
            lc.llama_sampler_accept(self.grammar, token)
        lc.llama_sampler_accept(self.chain, token)
        return token

    def close(self) -> None:
        if self.grammar is not None:
            self._lc.llama_sampler_free(self.grammar)
            self.grammar = None
        if self.chain is not None:
            self._lc.llama_sampler_free(self.chain)
            self.chain = None
