"""Which budget should the CPU default be? Wall seconds, CPU seconds or FLOPs, measured as runs meet them.

For each mode, at the same nominal size (`--seconds` of the default model on this machine):
  (a) quiet: the default train.py with seeds 1..K, nothing else running;
  (b) loaded: the same seeds beside a competing CPU hog (one busy process: half of a 2-core machine);
  (c) blind spot: BLOCK_SIZE 128 -> 32 (many more, cheaper steps), seed 1, quiet: what the run really took.
Each run goes through the real runner (contained, the judge scoring the exported model). Results are appended to
a JSON file as they come, so a killed bench resumes where it stopped.

    .venv/bin/python bench/bench_budget.py --seconds 30 --seeds 3 --out /tmp/bench_budget.json
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import paths  # noqa: E402
from agent.budget import CPU_FLOPS_PER_S, Budget  # noqa: E402
from agent.sandbox.containment import probe  # noqa: E402
from agent.sandbox.judging import Prepared, prepare_for_runs  # noqa: E402
from agent.sandbox.runner import run_training  # noqa: E402
from agent.sandbox.spec import RunSpec  # noqa: E402


def budgets(seconds: float) -> dict[str, Budget]:
    """mode -> the budget of about `seconds` wall seconds (the runner enforces time and cpu from outside)."""
    cores = os.cpu_count() or 1
    return {
        "time": Budget.parse(f"{seconds:g}"),
        "cpu": Budget.parse(f"{seconds * cores:g}cpu"),
        "flops": Budget.parse(f"{seconds * CPU_FLOPS_PER_S:.4e}flops"),
    }


def one_run(work: Path, train: str, budget: Budget, seed: int, prepared: Prepared) -> dict[str, object]:
    (work / "train.py").write_text(train)
    spec = RunSpec(
        workspace=work,
        scratch=work / "scratch" / f"{seed}",
        exp_id=1,
        seed=seed,
        log_path=work / "run.log",
        deadline_s=600,
        budget=budget,
        handover_s=30,
        hidden=prepared.hidden,
        readable=prepared.readable,
        python=sys.executable,
        env={
            "AUTORESEARCH_CACHE": str(paths.cache_dir()),
            **({"AUTORESEARCH_DATA": str(prepared.data)} if prepared.data is not None else {}),
        },
    )
    result = run_training(spec, lambda event: None, containment=probe())
    summary = result.summary
    return {
        "outcome": result.outcome,
        "reason": result.reason,
        "val_bpb": result.val_bpb,
        "steps": summary.get("num_steps"),
        "wall_s": round(result.seconds, 2),
        "judge_s": round(result.judge_seconds, 2),
        "spent": result.budget_spent,
        "training_s": summary.get("training_seconds"),
    }


def hog() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--seconds", type=float, default=30.0, help="nominal budget in wall seconds")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--modes", default="time,cpu,flops")
    parser.add_argument("--out", type=Path, default=Path("bench_budget.json"))
    args = parser.parse_args()
    done: dict[str, dict[str, object]] = json.loads(args.out.read_text()) if args.out.exists() else {}
    shipped = (ROOT / "nanogpt" / "train.py").read_text()
    blind = shipped.replace("BLOCK_SIZE = 128", "BLOCK_SIZE = 32")
    assert blind != shipped
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in (
            "prepare.py",
            "corpus.py",
            "metric.py",
        ):  # the frozen harness: the run's part and the judge's
            shutil.copy(ROOT / "nanogpt" / name, work / name)
        prepared = prepare_for_runs(
            work,
            work / "scratch",
            python=sys.executable,
            env={"AUTORESEARCH_CACHE": str(paths.cache_dir())},
            containment=probe(),
            emit=lambda event: None,
        )
        plan = []
        for mode in args.modes.split(","):
            for seed in range(1, args.seeds + 1):
                plan.append((mode, "quiet", seed, shipped))
            for seed in range(1, args.seeds + 1):
                plan.append((mode, "loaded", seed, shipped))
            plan.append((mode, "block32", 1, blind))
        for mode, scenario, seed, train in plan:
            key = f"{mode}/{scenario}/{seed}/{args.seconds:g}"
            if key in done:
                continue
            budget = budgets(args.seconds)[mode]
            competitor = hog() if scenario == "loaded" else None
            try:
                started = time.monotonic()
                done[key] = one_run(work, train, budget, seed, prepared)
                done[key]["elapsed_s"] = round(time.monotonic() - started, 2)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
            args.out.write_text(json.dumps(done, indent=1))
            print(key, done[key], flush=True)
    report(done, args.modes.split(","), args.seconds)
    return 0


def report(done: dict[str, dict[str, object]], modes: list[str], seconds: float) -> None:
    def rows(mode: str, scenario: str) -> list[dict[str, object]]:
        prefix = f"{mode}/{scenario}/"
        return [v for k, v in done.items() if k.startswith(prefix) and k.endswith(f"/{seconds:g}")]

    print(f"\nbudget = {seconds:g} s of the default model on this machine, contained runs, judged")
    print(
        "| mode | quiet val_bpb mean (spread, std) | loaded mean (spread) | loaded - quiet | quiet wall s | "
        "loaded wall s | block 32: wall s, steps vs 128 |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode in modes:
        quiet, loaded, blind = rows(mode, "quiet"), rows(mode, "loaded"), rows(mode, "block32")
        qv = [float(r["val_bpb"]) for r in quiet if r["val_bpb"] is not None]  # type: ignore[arg-type]
        lv = [float(r["val_bpb"]) for r in loaded if r["val_bpb"] is not None]  # type: ignore[arg-type]
        if not qv or not lv or not blind:
            continue
        q_wall = statistics.fmean(float(r["wall_s"]) for r in quiet)  # type: ignore[arg-type]
        l_wall = statistics.fmean(float(r["wall_s"]) for r in loaded)  # type: ignore[arg-type]
        q_steps = statistics.fmean(float(r["steps"] or 0) for r in quiet)  # type: ignore[arg-type]
        b = blind[0]
        std = statistics.stdev(qv) if len(qv) > 1 else 0.0
        print(
            f"| {mode} | {statistics.fmean(qv):.4f} ({max(qv) - min(qv):.4f}, {std:.4f}) | "
            f"{statistics.fmean(lv):.4f} ({max(lv) - min(lv):.4f}) | "
            f"{statistics.fmean(lv) - statistics.fmean(qv):+.4f} | {q_wall:.1f} | {l_wall:.1f} | "
            f"{float(b['wall_s']):.1f} s ({float(b['wall_s']) / q_wall:.2f}x), "  # type: ignore[arg-type]
            f"{int(b['steps'] or 0)} steps ({float(b['steps'] or 0) / max(1.0, q_steps):.2f}x), "  # type: ignore[call-overload, arg-type]
            f"val_bpb {b['val_bpb']} |"
        )


if __name__ == "__main__":
    sys.exit(main())
