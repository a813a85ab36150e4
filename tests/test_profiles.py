"""Profiles: `init` picks cpu or gpu by device (--profile overrides), and the gpu train.py runs on a CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent import cli, config, paths
from agent.workspace import PROFILES, STATE_DIR, Workspace, WorkspaceError

NANOGPT = paths.nanogpt_dir()
GPU = NANOGPT / "profiles" / "gpu"


def on(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """Let `init` see `device` (what agent.config.detect_device reports) and no AUTORESEARCH_PROFILE."""
    monkeypatch.delenv("AUTORESEARCH_PROFILE", raising=False)
    monkeypatch.setattr(config, "detect_device", lambda: device)


def test_init_picks_the_profile_by_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTORESEARCH_PROFILE", raising=False)
    here = Workspace.init(tmp_path / "here")  # this machine, as detected
    assert here.profile == ("gpu" if config.detect_device().startswith("cuda") else "cpu")

    on(monkeypatch, "cuda: NVIDIA H100 80GB HBM3")
    gpu = Workspace.init(tmp_path / "gpu")
    assert gpu.profile == "gpu" and gpu.meta["profile"] == "gpu"
    assert gpu.read_train() == (GPU / "train.py").read_text()
    assert gpu.read_program() == (GPU / "program.md").read_text()
    assert gpu.run_env == {"AUTORESEARCH_VOCAB": "8192"}
    for name in ("prepare.py", "corpus.py", "metric.py"):
        assert (gpu.path / name).read_text() == (NANOGPT / name).read_text()
    assert gpu.repo.git.ls_files().split() == [
        "corpus.py",
        "metric.py",
        "prepare.py",
        "program.md",
        "train.py",
    ]

    on(monkeypatch, "cpu (2 cores)")
    cpu = Workspace.init(tmp_path / "cpu")
    assert cpu.profile == "cpu" and cpu.run_env == {}
    assert cpu.read_train() == (NANOGPT / "train.py").read_text()
    assert cpu.read_program() == paths.default_program_md().read_text()
    assert Workspace.open_or_init(tmp_path / "new", profile="gpu").profile == "gpu"  # `run` on a new folder


def test_the_profile_flag_overrides_the_device_and_status_shows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    on(monkeypatch, "cpu (2 cores)")
    assert cli.main(["init", str(tmp_path / "g"), "--profile", "gpu"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^profile gpu: 8 layers x 512.* \(AUTORESEARCH_VOCAB=8192\)$", out, re.M), out
    assert Workspace.open(tmp_path / "g").profile == "gpu"
    assert cli.main(["status", "--workspace", str(tmp_path / "g")]) == 0
    status = capsys.readouterr().out
    assert re.search(r"^profile\s+gpu: .*AUTORESEARCH_VOCAB=8192", status, re.M), status

    on(monkeypatch, "cuda: NVIDIA H100 80GB HBM3")
    assert cli.main(["init", str(tmp_path / "c"), "--profile", "cpu"]) == 0
    assert Workspace.open(tmp_path / "c").profile == "cpu"
    assert re.search(r"^profile cpu: 2 layers x 128", capsys.readouterr().out, re.M)

    with pytest.raises(SystemExit) as refused:
        cli.main(["init", str(tmp_path / "t"), "--profile", "tpu"])
    assert refused.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    with pytest.raises(WorkspaceError, match="no profile 'tpu': choose one of cpu, gpu"):
        Workspace.init(tmp_path / "t", profile="tpu")


def test_a_workspace_from_before_profiles_reads_as_cpu(tmp_path: Path) -> None:
    ws = Workspace.init(tmp_path / "old", profile="cpu")
    meta_path = ws.path / STATE_DIR / "workspace.json"
    meta = json.loads(meta_path.read_text())
    del meta["profile"], meta["env"]
    meta_path.write_text(json.dumps(meta))
    old = Workspace.open(ws.path)
    assert old.profile == "cpu" and old.run_env == {}


def words_corpus(path: Path, n_bytes: int = 60_000) -> Path:
    """Lines of made-up words from a fixed seed: validation holds two 256-token windows (the causality probe takes two)."""
    import random

    rng = random.Random(7)
    vocabulary = ["".join(rng.choice("aeioulnrstkmpd") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    lines: list[str] = []
    while sum(len(line) + 1 for line in lines) < n_bytes:
        lines.append(" ".join(rng.choice(vocabulary) for _ in range(rng.randint(4, 12))).capitalize() + ".")
    path.write_text("\n".join(lines) + "\n")
    return path


SMALLER = {
    "N_LAYER = 8": "N_LAYER = 2",
    "N_EMBD = 512": "N_EMBD = 128",
    "BLOCK_SIZE = 1024": "BLOCK_SIZE = 256",
    "BATCH_SIZE = 64": "BATCH_SIZE = 2",
}
"""The GPU model cut down for a shared 2-core CPU: same code, 1/30 of the compute per token."""


def test_the_gpu_train_py_trains_a_few_steps_on_cpu_and_exports_for_the_judge(tmp_path: Path) -> None:
    """The GPU profile's train.py, smaller, trains on a CPU with the profile's vocabulary; the judge scores it."""
    ws = Workspace.init(tmp_path / "ws", profile="gpu")
    source = ws.read_train()
    for old, new in SMALLER.items():
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    (ws.path / "train.py").write_text(source)
    env = dict(
        os.environ,
        **ws.run_env,
        AUTORESEARCH_CORPUS=str(words_corpus(tmp_path / "words.txt")),
        AUTORESEARCH_BUDGET="1.5e10flops",  # 3 or 4 steps of 512 tokens, however busy the machine
    )
    proc = subprocess.run(
        [sys.executable, "train.py"], cwd=ws.path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "device cpu | params" in proc.stdout
    assert "training a BPE vocabulary of 8192 tokens" in proc.stderr  # the profile's AUTORESEARCH_VOCAB
    block = proc.stdout.split("\n---\n")[-1]
    summary = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in block.splitlines())}
    assert int(summary["num_steps"]) >= 3
    claims = json.loads((ws.path / "claims.json").read_text())
    assert claims["export"] == "ok" and claims["block_size"] == 256
    judged = subprocess.run(
        [
            sys.executable,
            "-I",
            str(paths.PROJECT_ROOT / "agent" / "sandbox" / "judge.py"),
            "score",
            str(ws.path),
        ]
        + [str(ws.path / name) for name in ("model.pt2", "claims.json", "result.json")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert judged.returncode == 0, judged.stdout + judged.stderr
    result = json.loads((ws.path / "result.json").read_text())
    assert result["status"] == "ok", result["reason"]
    assert 0.5 < result["val_bpb"] < 20.0  # a barely trained model over a BPE vocabulary: a few bits per byte


def test_the_gpu_model_as_shipped_is_causal_and_several_hundred_wide(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import math

    import numpy as np
    import torch

    monkeypatch.syspath_prepend(str(NANOGPT))  # train.py and metric.py import the harness as `prepare`
    spec = importlib.util.spec_from_file_location("gpu_train", GPU / "train.py")
    assert spec is not None and spec.loader is not None
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    import metric

    model = train.GPT(8192)
    n_params = sum(p.numel() for p in model.parameters())
    assert (train.N_LAYER, train.N_EMBD, train.BLOCK_SIZE) == (8, 512, 1024)
    assert 28e6 < n_params < 30e6  # 8 x 12 x 512^2 in the blocks and a tied 8192 x 512 embedding
    tokens = torch.randint(0, 8192, (2, 1024), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(tokens[:, :64]).shape == (2, 64, 8192)
    val, token_bytes = tokens.reshape(-1).numpy().astype(np.uint16), np.ones(8192, dtype=np.int64)
    rng = np.random.default_rng(0)  # with the judge's checks: a twin whose logits moved would raise Refused
    bpb, _, _ = metric.evaluate_bpb(model, val, token_bytes, 64, batch_size=2, rng=rng)
    assert math.isfinite(bpb)


def test_every_profile_names_files_that_exist() -> None:
    for profile in PROFILES.values():
        assert (NANOGPT / profile.folder / "train.py").is_file()
        if profile.folder:
            assert (NANOGPT / profile.folder / "program.md").is_file()
