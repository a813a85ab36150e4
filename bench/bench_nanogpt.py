"""Training benchmark: throughput, MFU, val_bpb at 30/60/120 s in both budget modes, and the seed spread.

    .venv/bin/python bench/bench_nanogpt.py            # everything (~15 min on 2 cores)
    .venv/bin/python bench/bench_nanogpt.py --scale 0.1  # a quick check of the script itself

Run it on a quiet machine: wall-clock budgets measure the machine as much as the model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "nanogpt"))

from prepare import DEFAULT_CPU_FLOPS  # noqa: E402

VARIANTS = {
    "default (2L x 128, batch 16)": {},
    "4L x 128, batch 32": {"N_LAYER = 2": "N_LAYER = 4", "BATCH_SIZE = 16": "BATCH_SIZE = 32"},
}


def train(budget: str, seed: int = 1, replace: dict[str, str] | None = None) -> dict:  # type: ignore[type-arg]
    """Run a copy of train.py once and have the judge score its model (uncontained); the run's claims, the
    judge's result and the summary's throughput figures."""
    with tempfile.TemporaryDirectory() as tmp:
        work, harness = Path(tmp) / "run", Path(tmp) / "harness"
        work.mkdir()
        harness.mkdir()
        for name in ("prepare.py", "corpus.py"):  # all of the harness train.py imports
            shutil.copy(ROOT / "nanogpt" / name, work)
        for name in (
            "prepare.py",
            "corpus.py",
            "metric.py",
        ):  # the judge's frozen copy, apart from the run's folder
            shutil.copy(ROOT / "nanogpt" / name, harness)
        source = (ROOT / "nanogpt" / "train.py").read_text()
        for old, new in (replace or {}).items():
            source = source.replace(old, new)
        (work / "train.py").write_text(source)
        env = dict(
            os.environ, AUTORESEARCH_BUDGET=budget, AUTORESEARCH_SEED=str(seed), OMP_WAIT_POLICY="PASSIVE"
        )
        proc = subprocess.run([sys.executable, "train.py"], cwd=work, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"train.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        files = [str(work / name) for name in ("model.pt2", "claims.json", "result.json")]
        judged = subprocess.run(
            [
                sys.executable,
                "-I",
                str(ROOT / "agent" / "sandbox" / "judge.py"),
                "score",
                str(harness),
                *files,
            ],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
        )
        if judged.returncode != 0:
            raise SystemExit(f"the judge failed:\n{judged.stdout[-2000:]}\n{judged.stderr[-2000:]}")
        result = json.loads((work / "claims.json").read_text()) | json.loads(
            (work / "result.json").read_text()
        )
        summary = dict(
            line.split(":", 1) for line in proc.stdout.split("\n---\n")[-1].splitlines() if ":" in line
        )
        result["mfu_percent"] = float(summary["mfu_percent"])
        result["tokens_per_s"] = result["tokens"] / max(1e-9, result["training_seconds"])
        return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every budget (0.1 = quick check)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sections", default="budgets,seeds,variants", help="comma-separated subset to run")
    parser.add_argument(
        "--seed-modes", default="compute,time", help="budget modes of the seed-spread section"
    )
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    flops_per_second = DEFAULT_CPU_FLOPS / 60.0

    def throughput(r: dict, what: str) -> None:  # type: ignore[type-arg]
        print(f"\n## Throughput of the default train.py ({what})")
        print(f"tokens/s {r['tokens_per_s']:,.0f} | MFU {r['mfu_percent']:.2f} % | steps {r['num_steps']}")
        print(
            f"counted FLOPs/s {r['train_flops'] / r['training_seconds']:.3e} (the default compute budget assumes "
            f"{flops_per_second:.3e})"
        )

    if "throughput" in sections:
        throughput(train(f"{60 * args.scale:g}"), "time budget, 60 s")

    if "budgets" in sections:
        print("\n## val_bpb by budget (seed 1)")
        print("| budget | mode | val_bpb | steps | training s |")
        print("|---|---|---|---|---|")
        for seconds in (30, 60, 120):
            seconds_scaled = seconds * args.scale
            for mode, spec in (
                ("time", f"{seconds_scaled:g}"),
                ("compute", f"{flops_per_second * seconds_scaled:.3e}flops"),
            ):
                r = train(spec)
                if seconds == 60 and mode == "time":
                    first_60s_time_run = r
                print(
                    f"| {seconds} s | {mode} ({spec}) | {r['val_bpb']:.4f} | {r['num_steps']} | "
                    f"{r['training_seconds']:.1f} |",
                    flush=True,
                )

        throughput(first_60s_time_run, "the 60 s time-budget run above")

    if "seeds" in sections:
        print(f"\n## Noise floor: {args.seeds} seeds at the default budget")
        modes = {"compute": f"{DEFAULT_CPU_FLOPS * args.scale:.3e}flops", "time": f"{60 * args.scale:g}"}
        for mode, spec in modes.items():
            if mode not in args.seed_modes.split(","):
                continue
            values = [train(spec, seed=seed)["val_bpb"] for seed in range(1, args.seeds + 1)]
            spread = max(values) - min(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            print(
                f"{mode:8s} {spec:>14s}: "
                + ", ".join(f"{v:.4f}" for v in values)
                + f" | spread {spread:.4f} | std {std:.4f}",
                flush=True,
            )

    if "variants" in sections:
        print("\n## Shapes at the default compute budget (seed 1)")
        print("| variant | val_bpb | steps | params M |")
        print("|---|---|---|---|")
        for name, replace in VARIANTS.items():
            r = train(f"{DEFAULT_CPU_FLOPS * args.scale:.3e}flops", replace=replace)
            print(
                f"| {name} | {r['val_bpb']:.4f} | {r['num_steps']} | {r['num_params'] / 1e6:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
