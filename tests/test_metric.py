"""The frozen metric, what only the judge imports: val_bpb by the bytes of the text, the causality and
row-independence probes, and the judge's refusals of a model that cannot be scored or was paid for too little."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import pickle
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_fakes import SUMMARY_KEYS

NANOGPT = Path(__file__).resolve().parent.parent / "nanogpt"
sys.path.insert(0, str(NANOGPT))

import corpus  # noqa: E402
import metric  # noqa: E402
import prepare  # noqa: E402

from agent.sandbox.summary import parse_summary, summary_bpb  # noqa: E402


def test_the_run_side_never_imports_the_metric() -> None:
    """metric.py builds on prepare.py, never the reverse: a run (which imports prepare.py) has no metric to
    import, and needs none."""
    imported = set()
    for node in ast.walk(ast.parse((NANOGPT / "prepare.py").read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert "metric" not in imported


class Uniform(torch.nn.Module):
    """Equal probability for every token: bits per token = log2(vocab)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*idx.shape, self.vocab)


MIXED_TEXT = ("Ünïcödé — ça va? 日本語のテキスト, émoji 🙂 and plain ASCII words. " * 40).strip()


def test_bpb_counts_the_bytes_of_the_text_under_any_tokenizer() -> None:
    """A uniform model scores n_tokens x log2(V) bits over exactly the UTF-8 bytes of the text.

    The byte count must be the same under bytes and BPE; counting by decoding single tokens would not be
    (a lone continuation byte decodes to U+FFFD, three bytes).
    """
    text_bytes = len(MIXED_TEXT.encode())
    bpe = corpus.train_bpe(MIXED_TEXT * 3, 300)
    for encoding in (corpus.byte_encoding(), bpe):
        ids = np.array(encoding.encode_ordinary(MIXED_TEXT), dtype=np.uint16)
        lengths = corpus.token_byte_lengths(encoding)
        assert int(lengths[ids].sum()) == text_bytes
        # Score every token after the first, as one window.
        bpb, tokens, nbytes = metric.evaluate_bpb(
            Uniform(encoding.n_vocab), ids, lengths, block_size=ids.size - 1, batch_size=1
        )
        assert tokens == ids.size - 1
        assert nbytes == text_bytes - int(lengths[ids[0]])
        assert bpb == pytest.approx(
            tokens * math.log2(encoding.n_vocab) / nbytes, rel=1e-6
        )  # float32 cross-entropy
    byte_ids = corpus.byte_encoding().encode_ordinary(MIXED_TEXT)
    naive = sum(len(corpus.byte_encoding().decode([t]).encode()) for t in byte_ids)
    assert naive > text_bytes  # the bug the harness avoids
    assert metric.evaluate_bpb(
        Uniform(256),
        np.array(byte_ids, dtype=np.uint16),
        corpus.token_byte_lengths(corpus.byte_encoding()),
        block_size=64,
    )[0] == pytest.approx(8.0)


class Peeking(torch.nn.Module):
    """Adds the mean of the whole sequence to every position: it sees the future."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        e = self.emb(idx)
        return e + e.mean(dim=1, keepdim=True)


class Causal(torch.nn.Module):
    """A cumulative mean: every position sees only the past."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        e = self.emb(idx)
        steps = torch.arange(1, idx.size(1) + 1).view(1, -1, 1)
        return e.cumsum(dim=1) / steps


def test_causality_is_checked_as_the_model_is_scored() -> None:
    """With the judge's random draw the same windows are scored, to the bit, with the checks inside."""
    data = prepare.prepare()
    honest = Causal(256)
    plain = metric.evaluate_bpb(honest, data.val, data.token_bytes, 32)
    assert metric.evaluate_bpb(honest, data.val, data.token_bytes, 32, rng=np.random.default_rng(1)) == plain
    with pytest.raises(metric.Refused, match="^non-causal: logits changed by"):
        metric.evaluate_bpb(Peeking(256), data.val, data.token_bytes, 32, rng=np.random.default_rng(1))


@pytest.mark.parametrize("model", [Causal, Peeking])
def test_the_summary_fields_print_as_the_block_the_engine_parses(
    model: type[torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = prepare.prepare()
    budget = prepare.Budget(prepare.BudgetSpec("flops", 1e9))
    network = model(256)
    budget.attach(network)
    monkeypatch.chdir(tmp_path)  # the run's folder: the model and the claims are handed over there
    fields = prepare.evaluate_and_report(network, data, budget, 32, "cpu", seed=3, num_steps=5)
    assert list(fields) == SUMMARY_KEYS
    lines = ["---", *(f"{key + ':':<18}{value}" for key, value in fields.items())]  # as train.py prints them
    claims = json.loads((tmp_path / prepare.CLAIMS_FILE).read_text())
    summary = parse_summary(lines)
    assert summary is not None and list(summary) == SUMMARY_KEYS
    assert summary["num_steps"] == claims["num_steps"] == 5 and summary["seed"] == claims["seed"] == 3
    assert summary["mfu_percent"] == 0.0 and summary["budget"] == "1.00e+09 FLOPs"
    assert lines[1] == "val_bpb:          judged after the run" and summary_bpb(summary) is None
    assert claims["export"] == "ok" and claims["num_params"] == budget.n_params
    result = metric.judge(tmp_path / prepare.EXPORT_FILE, claims)
    if model is Causal:
        expected, tokens, nbytes = metric.evaluate_bpb(network, data.val, data.token_bytes, 32)
        assert result["status"] == "ok" and result["val_bpb"] == round(expected, 6)
        assert (result["eval_tokens"], result["eval_bytes"]) == (tokens, nbytes)
    else:
        assert result["status"] == "invalid" and result["val_bpb"] is None
        assert result["reason"].startswith("non-causal")


def _reference_bpb(
    model: torch.nn.Module, val: np.ndarray, token_bytes: np.ndarray, block_size: int
) -> float:
    """val_bpb as the harness computed it in-process before the judge existed (full windows only)."""
    n_windows = min(metric.EVAL_TOKENS, val.size - 1) // block_size
    tokens = torch.from_numpy(val[: n_windows * block_size + 1].astype(np.int64))
    lengths = torch.from_numpy(token_bytes)
    total_nats, total_bytes = 0.0, 0
    with torch.no_grad():
        for first in range(0, n_windows, 32):
            idx = torch.arange(first, min(first + 32, n_windows))
            window = tokens[idx[:, None] * block_size + torch.arange(block_size + 1)]
            logits = model(window[:, :-1])
            nats = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), window[:, 1:].reshape(-1), reduction="sum"
            )
            total_nats += float(nats)
            total_bytes += int(lengths[window[:, 1:]].sum())
    return total_nats / (math.log(2) * total_bytes)


def _default_gpt(vocab: int) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("shipped_train", NANOGPT / "train.py")
    assert spec and spec.loader
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    torch.manual_seed(0)
    return train.GPT(vocab).eval()


def test_the_judge_scores_the_default_model_as_the_in_process_metric_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = prepare.prepare()
    model = _default_gpt(data.vocab_size)
    block = 128
    prepare.export_model(model, block, "cpu", tmp_path / "model.pt2")
    params = sum(p.numel() for p in model.parameters())
    result = metric.judge(tmp_path / "model.pt2", {"num_params": params})
    assert result["status"] == "ok", result
    assert result["val_bpb"] == pytest.approx(
        _reference_bpb(model, data.val, data.token_bytes, block), abs=1e-6
    )
    assert result["num_params"] == params and result["block_size"] == block
    assert (result["eval_tokens"], result["eval_bytes"]) == (metric.EVAL_TOKENS, metric.EVAL_TOKENS)


def test_every_block_size_is_scored_on_the_same_validation_tokens() -> None:
    data = prepare.prepare()
    model = Causal(256)
    for block in (32, 100, 1000):  # 100 and 1000 do not divide EVAL_TOKENS: one last window ends at the end
        bpb, tokens, nbytes = metric.evaluate_bpb(model, data.val, data.token_bytes, block)
        assert (tokens, nbytes) == (metric.EVAL_TOKENS, metric.EVAL_TOKENS), block


def test_the_judge_refuses_a_model_that_undercounts_its_parameters(tmp_path: Path) -> None:
    data = prepare.prepare()
    model = _default_gpt(data.vocab_size)
    prepare.export_model(model, 64, "cpu", tmp_path / "model.pt2")
    params = sum(p.numel() for p in model.parameters())
    result = metric.judge(tmp_path / "model.pt2", {"num_params": params // 2})
    assert result["status"] == "invalid" and "parameters" in result["reason"], result
    honest = {"num_params": params, "tokens": 1000, "train_flops": 6.0 * params * 1000}
    assert metric.judge(tmp_path / "model.pt2", honest)["status"] == "ok"
    short = metric.judge(tmp_path / "model.pt2", {**honest, "train_flops": 6.0 * params * 500})
    assert short["status"] == "invalid" and "training FLOPs" in short["reason"], short


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"not a zip", "not a readable archive"), (b"", "not a readable archive")],
    ids=["garbage", "empty"],
)
def test_the_judge_refuses_a_file_that_is_not_an_exported_model(
    tmp_path: Path, content: bytes, why: str
) -> None:
    (tmp_path / "model.pt2").write_bytes(content)
    result = metric.judge(tmp_path / "model.pt2", {})
    assert result["status"] == "invalid" and why in result["reason"]


def test_the_judge_refuses_a_model_with_the_wrong_inputs_or_outputs(tmp_path: Path) -> None:
    class TwoInputs(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x + y

    class WrongVocab(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(256, 10)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.emb(idx)

    x = torch.zeros(2, 16, dtype=torch.long)
    torch.export.save(torch.export.export(TwoInputs(), (x, x)), str(tmp_path / "two.pt2"))
    assert "one int64" in metric.judge(tmp_path / "two.pt2", {})["reason"]
    prepare.export_model(WrongVocab(), 16, "cpu", tmp_path / "vocab.pt2")
    assert "(32, 16, 256) logits" in metric.judge(tmp_path / "vocab.pt2", {})["reason"]


class PeeksAtTheNextRow(torch.nn.Module):
    """Causal within a row, but each row also sees the next one, which holds its targets."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        e = self.emb(idx)
        return e + 0.5 * e.roll(-1, dims=0)


def test_the_judge_refuses_a_model_whose_rows_see_each_other(tmp_path: Path) -> None:
    prepare.prepare()
    prepare.export_model(PeeksAtTheNextRow(256), 32, "cpu", tmp_path / "model.pt2")
    result = metric.judge(tmp_path / "model.pt2", {})
    assert result["status"] == "invalid" and result["reason"].startswith("rows not independent"), result
    prepare.export_model(Causal(256), 32, "cpu", tmp_path / "causal.pt2")
    assert metric.judge(tmp_path / "causal.pt2", {})["status"] == "ok"


def test_the_metric_scores_an_exported_model_by_hand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prepare.prepare()
    prepare.export_model(Causal(256), 32, "cpu", tmp_path / "model.pt2")
    assert metric.main([str(tmp_path / "model.pt2")]) == 0
    assert re.fullmatch(r"val_bpb: \d+\.\d{6}\n", capsys.readouterr().out)
    (tmp_path / "garbage.pt2").write_bytes(b"not a zip")
    assert metric.main([str(tmp_path / "garbage.pt2")]) == 1
    assert "the exported model is refused: not a readable archive" in capsys.readouterr().out
    assert metric.main([]) == 2 and "usage" in capsys.readouterr().err


# ---- only data reaches the judge -----------------------------------------------------------------------------


class _Runs:
    """Unpickled, it runs code: it writes a marker file (what a hostile archive would do to the judge)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _rewrite(source: Path, target: Path, change: Callable[[str, bytes], bytes | None]) -> None:
    """A copy of an archive with some entries changed (`change` returns the new bytes, or None: unchanged)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for entry in old.infolist():
            data = old.read(entry.filename)
            new.writestr(entry, change(entry.filename, data) or data)


def _loads_and_runs(path: Path, marker: Path) -> bool:
    """Whether plain `torch.export.load` of `path` runs the archive's code (in a process of its own)."""
    code = f"import torch\ntry:\n    torch.export.load({str(path)!r})\nexcept Exception:\n    pass\n"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, check=False)
    return marker.exists()


def _pickled_weight(name: str, data: bytes, marker: Path) -> bytes | None:
    if name.endswith("data/weights/model_weights_config.json"):
        config = json.loads(data)
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True  # the loader then unpickles that weight's file
        return json.dumps(config).encode()
    if name.endswith("data/weights/weight_0"):
        return pickle.dumps(_Runs(marker))
    return None


def _pickled_sample_inputs(name: str, data: bytes, marker: Path) -> bytes | None:
    # torch's weights-only loader refuses it, and the loader then retries with weights_only=False
    return pickle.dumps(_Runs(marker)) if name.endswith("data/sample_inputs/model.pt") else None


@pytest.mark.parametrize("attack", [_pickled_weight, _pickled_sample_inputs], ids=["weight", "sample-inputs"])
def test_an_archive_that_carries_a_pickle_is_refused_before_torch_runs_it(
    tmp_path: Path, attack: Callable[[str, bytes, Path], bytes | None]
) -> None:
    prepare.prepare()
    honest, hostile, marker = tmp_path / "honest.pt2", tmp_path / "hostile.pt2", tmp_path / "ran"
    prepare.export_model(Causal(256), 32, "cpu", honest)
    assert metric.check_archive(honest) is None
    _rewrite(honest, hostile, lambda name, data: attack(name, data, marker))
    assert _loads_and_runs(hostile, marker), "the attack does not work without the defence: no proof"
    marker.unlink()
    result = metric.judge(hostile, {})
    assert result["status"] == "invalid" and "refused" in result["reason"], result
    assert not marker.exists(), "the judge ran the archive's code"


def test_an_archive_with_anything_but_a_model_is_refused(tmp_path: Path) -> None:
    prepare.prepare()
    honest, extra = tmp_path / "honest.pt2", tmp_path / "extra.pt2"
    prepare.export_model(Causal(256), 32, "cpu", honest)
    with zipfile.ZipFile(honest) as old, zipfile.ZipFile(extra, "w") as new:
        for entry in old.infolist():
            new.writestr(entry, old.read(entry.filename))
        root = old.namelist()[0].split("/", 1)[0]
        new.writestr(f"{root}/data/constants/custom_obj_0", b"anything")
    assert "custom_obj_0" in str(metric.check_archive(extra))


class Branches(torch.nn.Module):
    """Causal on every row but one made of one token repeated (the judge's padding, say): there it peeks."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.honest = Causal(vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        plain = (idx == idx[:, :1]).all()
        return torch.cond(plain, lambda x: self.honest(x.roll(-1, dims=1)), lambda x: self.honest(x), (idx,))


class Remembers(torch.nn.Module):
    """A causal model with a lookup table in a buffer (not a parameter): 8 MB of text it could match."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.honest = Causal(vocab)
        self.register_buffer("table", torch.zeros(1 << 20, dtype=torch.long))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.honest(idx) + 0 * self.table[:1].float().sum()


def test_a_graph_may_call_aten_operators_only_and_hold_little_besides_parameters(tmp_path: Path) -> None:
    prepare.prepare()
    prepare.export_model(Branches(256), 32, "cpu", tmp_path / "branches.pt2")
    result = metric.judge(tmp_path / "branches.pt2", {})
    assert result["status"] == "invalid" and "aten operators are judged" in result["reason"], result
    prepare.export_model(Remembers(256), 32, "cpu", tmp_path / "remembers.pt2")
    result = metric.judge(tmp_path / "remembers.pt2", {})
    assert result["status"] == "invalid" and "besides its parameters" in result["reason"], result


# ---- checks that look like scoring ---------------------------------------------------------------------------


class _Peeks(torch.nn.Module):
    """Causal, plus a strong hint of the next token at the positions `peeks_at` names (B, T, 1 weights)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.honest = Causal(vocab)
        self.vocab = vocab

    def peeks_at(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        ahead = torch.nn.functional.one_hot(idx.roll(-1, dims=1), self.vocab).float()
        return self.honest(idx) + 20.0 * ahead * self.peeks_at(idx)


class PeeksBetweenTheOldProbes(_Peeks):
    """Reads the next token everywhere but the four positions the old probe changed the text after."""

    def peeks_at(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        weights = torch.ones(T)
        weights[[0, T // 3, T // 2, T - 2, T - 1]] = 0.0  # (the last one has no next token in its window)
        return weights.view(1, T, 1)


class PeeksUnlessARowIsPadding(_Peeks):
    """Reads the next token unless a row of the batch is all zeros, as the old probe's padded batches were."""

    def peeks_at(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        padded = (idx == 0).all(dim=1).any().float()
        weights = torch.ones(T)
        weights[T - 1] = 0.0
        return (1.0 - padded) * weights.view(1, T, 1)


def _old_fixed_probe(model: torch.nn.Module, val: np.ndarray, block: int, batch: int) -> bool:
    """The causality probe the judge ran before: two windows padded with rows of zeros to the batch, the text
    changed after positions 0, T//3, T//2 and T-2. True if the model passed it."""
    x = torch.from_numpy(val[: 2 * block].astype(np.int64)).reshape(2, block)
    x = torch.cat([x, x.new_zeros(batch - 2, block)])
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        base = model(x)
        for t in (0, block // 3, block // 2, block - 2):
            changed = x.clone()
            changed[:2, t + 1 :] = torch.randint(0, 256, (2, block - t - 1), generator=generator)
            if (model(changed)[:2, : t + 1] - base[:2, : t + 1]).abs().max() > 1e-4:
                return False
    return True


@pytest.mark.parametrize("model", [PeeksBetweenTheOldProbes, PeeksUnlessARowIsPadding])
def test_a_model_that_peeks_where_the_old_probe_did_not_look_is_refused(
    model: type[_Peeks], tmp_path: Path
) -> None:
    data = prepare.prepare()
    cheat, honest = model(256), Causal(256)
    cheat.honest = honest
    block = 32
    assert _old_fixed_probe(cheat, data.val, block, 32)  # it beat the old check...
    cheated = metric.evaluate_bpb(cheat, data.val, data.token_bytes, block)[0]
    assert cheated < metric.evaluate_bpb(honest, data.val, data.token_bytes, block)[0] - 1.0  # ...by a lot
    prepare.export_model(cheat, block, "cpu", tmp_path / "cheat.pt2")
    result = metric.judge(tmp_path / "cheat.pt2", {})
    assert result["status"] == "invalid" and result["reason"].startswith("non-causal"), result
    prepare.export_model(honest, block, "cpu", tmp_path / "honest.pt2")
    assert metric.judge(tmp_path / "honest.pt2", {})["status"] == "ok"


class Recorder(torch.nn.Module):
    """A causal model that keeps every batch it is shown."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.honest = Causal(vocab)
        self.seen: list[torch.Tensor] = []

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.seen.append(idx.clone())
        return self.honest(idx)


def test_a_check_looks_like_a_score() -> None:
    """Every batch the model is shown is full, and every row is real text: a validation window, or two joined at
    the same positions (a causal twin). Which batches are checked, and the order, change with every draw."""
    data = prepare.prepare()
    block, batch = 128, 32
    n_full = metric.EVAL_TOKENS // block
    windows = data.val[: n_full * block].astype(np.int64).reshape(n_full, block)
    shown = []
    for seed in (1, 2):
        model = Recorder(256)
        metric.evaluate_bpb(model, data.val, data.token_bytes, block, batch, rng=np.random.default_rng(seed))
        assert len(model.seen) == n_full // batch + sum(metric.TWINS.values())
        assert all(tuple(x.shape) == (batch, block) for x in model.seen)
        for row in torch.cat(model.seen).numpy():
            same = windows == row
            prefix = np.where(same.all(axis=1), block, same.argmin(axis=1)).max()
            suffix = np.where(same.all(axis=1), block, same[:, ::-1].argmin(axis=1)).max()
            assert prefix + suffix >= block, row
        shown.append(torch.cat(model.seen))
    assert not torch.equal(shown[0], shown[1])


class CountsItsCalls(torch.nn.Module):
    """A causal model that counts its calls in a buffer: it could tell the batch after a scored one."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.honest = Causal(vocab)
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.honest(idx) + 0.0 * self.calls


class WritesInPlace(torch.nn.Module):
    """A causal model that writes in place to its own intermediate tensors only: allowed."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.honest = Causal(vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.honest(idx)
        logits.mul_(0.5)
        return logits.relu_()


def test_a_judged_model_keeps_no_memory_of_its_calls(tmp_path: Path) -> None:
    prepare.prepare()
    counter = CountsItsCalls(256)
    prepare.export_model(counter, 32, "cpu", tmp_path / "counts.pt2")
    program = torch.export.load(str(tmp_path / "counts.pt2")).module()
    x = torch.zeros(32, 32, dtype=torch.long)
    program(x)
    program(x)
    calls = next(value for name, value in program.named_buffers() if name.endswith("calls"))
    assert float(calls) == 2.0  # the primitive: an exported model can count its calls
    result = metric.judge(tmp_path / "counts.pt2", {})
    assert result["status"] == "invalid" and re.search(r"writes to b_\w*calls", result["reason"]), result
    prepare.export_model(WritesInPlace(256), 32, "cpu", tmp_path / "in_place.pt2")
    assert metric.judge(tmp_path / "in_place.pt2", {})["status"] == "ok"


class SlowToScore(torch.nn.Module):
    """A model's logits multiplied by the identity `products` times: the same logits, the same training, and in
    the judge's forwards as many vocab x vocab products as it likes."""

    def __init__(self, model: torch.nn.Module, products: int) -> None:
        super().__init__()
        self.model, self.products = model, products

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = prepare.model_logits(self.model, idx)
        eye = torch.eye(logits.size(-1))
        for _ in range(self.products):
            logits = logits @ eye
        return logits


def test_a_model_too_slow_to_judge_is_refused_before_it_runs(tmp_path: Path) -> None:
    """The judge's deadline (the engine's, from the parent's judging) bounds what a model may cost to score: one
    whose forwards could not be scored in it even at this machine's peak is refused from its graph alone."""
    data = prepare.prepare()
    honest = _default_gpt(data.vocab_size)
    slow = SlowToScore(honest, 200)
    x = torch.from_numpy(data.val[: 2 * 64].astype(np.int64)).view(2, 64)
    with torch.no_grad():
        assert torch.equal(slow(x), prepare.model_logits(honest, x))  # the primitive: only the cost differs
    block = 128
    prepare.export_model(honest, block, "cpu", tmp_path / "honest.pt2")
    prepare.export_model(slow, block, "cpu", tmp_path / "slow.pt2")
    flops = {
        name: metric.forward_flops(torch.export.load(str(tmp_path / f"{name}.pt2")))
        for name in ("honest", "slow")
    }
    batch = prepare.eval_batch_size(block)
    products = 200 * 2.0 * batch * block * data.vocab_size**2
    assert flops["slow"] >= flops["honest"] + products
    assert flops["honest"] > 2.0 * batch * block * sum(
        p.numel() for p in honest.parameters()
    )  # a floor, not less
    # A deadline between what the two cost at this machine's peak (the engine's is ten times the parent's).
    forwards = metric.EVAL_TOKENS // block // batch + sum(metric.TWINS.values()) + 1
    at_peak = {name: forwards * f / prepare.peak_flops("cpu") for name, f in flops.items()}
    deadline = math.sqrt(at_peak["honest"] * at_peak["slow"])
    assert at_peak["slow"] > 4 * at_peak["honest"], at_peak
    started = time.monotonic()
    refused = metric.judge(tmp_path / "slow.pt2", {"judge_deadline_s": deadline})
    assert refused["status"] == "invalid" and refused["reason"].startswith("too slow to judge"), refused
    assert time.monotonic() - started < deadline  # it never ran
    scored = metric.judge(tmp_path / "honest.pt2", {"judge_deadline_s": deadline})
    assert scored["status"] == "ok", scored
