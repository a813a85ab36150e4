"""GPU profile benchmark: the gpu profile's baseline and two experiments, each trained and judged as the engine
would, with tokens/s, MFU against the device's bf16 peak and val_bpb.

    .venv/bin/python bench/bench_gpu_profile.py                # on a CUDA machine: ~7 minutes at --budget 100
    .venv/bin/python bench/bench_gpu_profile.py --corpus DIR   # your corpus instead of Shakespeare
    .venv/bin/python bench/bench_gpu_profile.py --smoke        # anywhere: the model cut down, 8 s each (a script check)

Each run copies nanogpt/prepare.py and nanogpt/profiles/gpu/train.py (with the experiment's edit) into a fresh
folder, trains with the profile's environment (AUTORESEARCH_VOCAB=8192) and the budget, then has agent/sandbox/judge.py
score the exported model in its own process. tok/s is the steady rate (the median of the progress lines after
the first), and MFU is measured at that rate: 6 x parameters per token (the harness's count), and with attention
too (+ 12 x layers x context x width, nanoGPT's estimate). "run MFU" is the harness's, over the whole budget,
start-up and compilation included. Without CUDA it refuses unless --smoke. Needs torch with CUDA in the
interpreter that runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "nanogpt"))

from agent.workspace import PROFILES  # noqa: E402

PROFILE = PROFILES["gpu"]
TRAIN = ROOT / "nanogpt" / PROFILE.folder / "train.py"
EXPERIMENTS: dict[str, dict[str, str]] = {
    "baseline": {},
    "no dropout": {"DROPOUT = 0.1": "DROPOUT = 0.0"},
    "peak LR 3e-3": {"LEARNING_RATE = 1.5e-3": "LEARNING_RATE = 3e-3"},
}
SMOKE = {
    "N_LAYER = 8": "N_LAYER = 2",
    "N_EMBD = 512": "N_EMBD = 128",
    "BLOCK_SIZE = 1024": "BLOCK_SIZE = 256",
    "BATCH_SIZE = 64": "BATCH_SIZE = 4",
    "LOG_EVERY = 50": "LOG_EVERY = 5",
}
"""--smoke: the same code at 1/30 of the compute per token, so that a CPU gets through it."""


def constant(source: str, name: str) -> int:
    match = re.search(rf"^{name} = (\d+)", source, re.M)
    if not match:
        raise SystemExit(f"train.py has no {name} constant")
    return int(match.group(1))


def train_and_judge(
    name: str, replace: dict[str, str], env: dict[str, str], timeout: float, keep: Path | None
) -> dict[str, Any]:
    """One run of the profile's train.py with `replace` applied, then the judge; the figures of both."""
    source = TRAIN.read_text()
    for old, new in replace.items():
        if source.count(old) != 1:
            raise SystemExit(f"{name}: {old!r} is not in {TRAIN} exactly once")
        source = source.replace(old, new)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        work, harness = Path(tmp) / "run", Path(tmp) / "harness"
        work.mkdir()
        harness.mkdir()
        for file in ("prepare.py", "corpus.py"):  # all of the harness train.py imports
            shutil.copy(ROOT / "nanogpt" / file, work / file)
        for file in (
            "prepare.py",
            "corpus.py",
            "metric.py",
        ):  # the judge's frozen copy, apart from the run's folder
            shutil.copy(ROOT / "nanogpt" / file, harness / file)
        (work / "train.py").write_text(source)
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "train.py"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        wall = time.perf_counter() - started
        if keep:
            (keep / f"{name.replace(' ', '_')}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0 or "\n---\n" not in proc.stdout:
            raise SystemExit(f"{name}: train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rates = [float(m) for m in re.findall(r"^step .*\btok/s ([\d.]+)", proc.stdout, re.M)]
        claims = json.loads((work / "claims.json").read_text()) if (work / "claims.json").exists() else {}
        block = proc.stdout.split("\n---\n")[-1]
        summary = {
            k.strip(): v.strip()
            for k, v in (line.split(":", 1) for line in block.splitlines() if ":" in line)
        }
        result_file = work / "result.json"
        judge_seconds = 0.0
        if (work / "model.pt2").exists():  # the run exported its model: the judge scores it apart
            started = time.perf_counter()
            judged = subprocess.run(
                [sys.executable, "-I", str(ROOT / "agent" / "sandbox" / "judge.py"), "score", str(harness)]
                + [str(work / f) for f in ("model.pt2", "claims.json", "judged.json")],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            judge_seconds = time.perf_counter() - started
            if judged.returncode != 0:
                raise SystemExit(
                    f"{name}: the judge failed:\n{judged.stdout[-2000:]}\n{judged.stderr[-3000:]}"
                )
            result_file = work / "judged.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
    seconds = float(summary["training_seconds"])
    tokens = float(claims.get("tokens") or float(summary["total_tokens_M"]) * 1e6)
    n_params = float(claims.get("num_params") or float(summary["num_params_M"]) * 1e6)
    steady = sorted(rates[1:]) or [tokens / max(1e-9, seconds)]
    layers, block_size, width = (constant(source, n) for n in ("N_LAYER", "BLOCK_SIZE", "N_EMBD"))
    return {
        "name": name,
        "val_bpb": result.get("val_bpb"),
        "status": result.get("status", "?"),
        "reason": result.get("reason", ""),
        "tokens_per_s": steady[len(steady) // 2],
        "run_tokens_per_s": tokens / max(1e-9, seconds),
        "run_mfu": float(summary["mfu_percent"]),
        "flops_per_token_attn": 6 * n_params + 12 * layers * block_size * width,
        "flops_per_token_6n": 6 * n_params,
        "num_steps": int(summary["num_steps"]),
        "num_params_M": n_params / 1e6,
        "peak_memory_mb": float(summary["peak_memory_mb"]),
        "training_seconds": seconds,
        "wall_seconds": wall,
        "judge_seconds": judge_seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument(
        "--budget",
        default="100",
        help="seconds per run, compilation included (default 100; the profile's: 300)",
    )
    parser.add_argument("--corpus", help="a text file or folder of .txt files (default: Shakespeare)")
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS), help="comma-separated subset")
    parser.add_argument(
        "--smoke", action="store_true", help="a cut-down model for 2 s: checks the script on a CPU"
    )
    parser.add_argument(
        "--deadline", type=float, default=570.0, help="skip runs that would end after this (s)"
    )
    parser.add_argument("--logs", type=Path, help="keep each run's log in this folder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import prepare
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(
            "no CUDA device: this benchmark measures a GPU (--smoke checks the script on a CPU)",
            file=sys.stderr,
        )
        return 2
    budget = "8" if args.smoke and args.budget == "100" else args.budget
    names = [n.strip() for n in args.experiments.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise SystemExit(f"unknown experiments {unknown}: choose from {list(EXPERIMENTS)}")
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = prepare.peak_flops("cuda" if cuda else "cpu")
    env = dict(os.environ, **PROFILE.env, AUTORESEARCH_BUDGET=budget, OMP_WAIT_POLICY="PASSIVE")
    if args.corpus:
        env["AUTORESEARCH_CORPUS"] = str(Path(args.corpus).expanduser().resolve())
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)

    began = time.perf_counter()
    print(
        f"## gpu profile on {device}: peak {peak / 1e12:,.1f} TFLOP/s "
        f"({'bf16, from the table' if cuda else 'fp32 matmul, measured'}), budget {budget} s per run"
    )
    prepared = subprocess.run(
        [sys.executable, str(ROOT / "nanogpt" / "prepare.py")], env=env, capture_output=True, text=True
    )
    if prepared.returncode != 0:
        raise SystemExit(f"prepare failed:\n{prepared.stdout}\n{prepared.stderr[-3000:]}")
    print(
        f"prepare ({time.perf_counter() - began:.1f} s): " + " | ".join(prepared.stdout.strip().splitlines())
    )

    rows: list[dict[str, Any]] = []
    header = (
        f"{'run':<14} {'tok/s':>11} {'MFU 6N':>7} {'MFU+attn':>8} {'run MFU':>7} {'val_bpb':>9} {'steps':>6} "
        f"{'peak MB':>8} {'train s':>7} {'wall s':>6}"
    )
    print(header)
    for name in names:
        elapsed = time.perf_counter() - began
        expected = rows[-1]["wall_seconds"] + rows[-1]["judge_seconds"] if rows else float(budget) + 120
        if elapsed + expected > args.deadline:
            print(
                f"{name:<14} skipped: {elapsed:.0f} s used, a run takes ~{expected:.0f} s (--deadline {args.deadline:.0f})"
            )
            continue
        replace = dict(SMOKE if args.smoke else {}, **EXPERIMENTS[name])
        row = train_and_judge(name, replace, env, timeout=float(budget) + 400, keep=args.logs)
        row["mfu_6n"] = 100 * row["flops_per_token_6n"] * row["tokens_per_s"] / peak
        row["mfu_attn"] = 100 * row["flops_per_token_attn"] * row["tokens_per_s"] / peak
        rows.append(row)
        bpb = f"{row['val_bpb']:.6f}" if row["val_bpb"] is not None else row["status"]
        print(
            f"{name:<14} {row['tokens_per_s']:>11,.0f} {row['mfu_6n']:>6.1f}% {row['mfu_attn']:>7.1f}% "
            f"{row['run_mfu']:>6.1f}% {bpb:>9} "
            f"{row['num_steps']:>6} {row['peak_memory_mb']:>8,.0f} {row['training_seconds']:>7.1f} "
            f"{row['wall_seconds'] + row['judge_seconds']:>6.0f}",
            flush=True,
        )
        if row["reason"]:
            print(f"    {row['reason']}")
    print(
        f"total {time.perf_counter() - began:.0f} s; params {rows[0]['num_params_M']:.1f}M"
        if rows
        else "no runs"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"device": device, "peak_flops": peak, "budget": budget, "runs": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
