"""Is the number steady enough to climb on a machine that is not quiet? The engine's own sessions, measured.

Each scenario is a fresh workspace of the shipped train.py on the real harness (contained, judged runs), one
trainer, K baseline seeds, then N candidates that change nothing a run can tell from noise (LEARNING_RATE times
1.0001, 1.0002, ...): every keep among them is a false keep.
  quiet:  nothing else running;
  steady: one competing busy process (half of a 2-core machine) for the whole session;
  bursts: two competing busy processes during the first run of every other experiment (and of baseline seed 2):
          what the disturbed-run rule is for.
Reported per scenario: the baseline's values and margin, false keeps of N, the runs the machine disturbed (run
again), the mean wall seconds per decided experiment. A finished scenario is read back, not run again.

    .venv/bin/python bench/bench_noise.py --budget 60 --candidates 5 --out /var/tmp/bench_noise
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_budget import hog  # noqa: E402
from bench_research import workspace_of  # noqa: E402

from agent.budget import Budget  # noqa: E402
from agent.config import EngineConfig  # noqa: E402
from agent.events import Event, Info, NoiseMeasured, RunFinished, RunStarted  # noqa: E402
from agent.researcher.ideas import IdeaQueue, parse_ideas  # noqa: E402
from agent.session import open_engine  # noqa: E402
from agent.workspace import HARNESS  # noqa: E402

SCENARIOS = ("quiet", "steady", "bursts")


def near_noops(n: int) -> IdeaQueue:
    """N changes no run can tell from noise: the peak learning rate times 1.0001, 1.0002, ..."""
    lines = [
        json.dumps(
            {
                "description": f"peak learning rate times 1.000{i + 1}",
                "edits": [{"search": "  # peak", "replace": f" * 1.000{i + 1}  # peak"}],
            }
        )
        for i in range(n)
    ]
    return IdeaQueue(parse_ideas("\n".join(lines) + "\n", Path("near-noops.jsonl")))


class Machine:
    """The scenario's competing load, switched by the engine's run events (from the engine's thread)."""

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.hogs: list[subprocess.Popen[bytes]] = []
        self.started: dict[tuple[int, int], int] = {}
        self.disturbed: list[str] = []
        self.noise: NoiseMeasured | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted) and self.scenario == "bursts":
            key = (event.exp_id, event.seed)
            self.started[key] = self.started.get(key, 0) + 1
            first = self.started[key] == 1
            if first and (key == (0, 2) or (event.exp_id % 2 == 1 and event.exp_id > 0)):
                self.hogs.extend(hog() for _ in range(2))
        elif isinstance(event, RunFinished) and self.scenario == "bursts":
            self.stop()
        elif isinstance(event, Info) and "the machine was busy" in event.message:
            self.disturbed.append(event.message)
            print("   ", event.message, flush=True)
        elif isinstance(event, NoiseMeasured):
            self.noise = event

    def stop(self) -> None:
        for process in self.hogs:
            process.kill()
            process.wait()
        self.hogs.clear()


def scenario(out: Path, name: str, budget: str, seeds: int, n: int, probe: bool = True) -> dict[str, Any]:
    label = name if probe else f"{name}-no-probe"
    done = out / label / "result.json"
    if done.exists():
        result: dict[str, Any] = json.loads(done.read_text())
        return result
    folder = out / label
    folder.mkdir(parents=True, exist_ok=True)
    harness = {f: (ROOT / "nanogpt" / f).read_text() for f in HARNESS}
    ws = workspace_of(folder, (ROOT / "nanogpt" / "train.py").read_text(), harness, f"noise-{name}", "cpu")
    machine = Machine(name)
    steady = [hog()] if name == "steady" else []
    config = EngineConfig(budget=Budget.parse(budget), seeds=seeds, max_experiments=n, probe=probe)
    started = time.monotonic()
    try:
        engine = open_engine(ws, near_noops(n), config, machine)
        engine.run()
    finally:
        machine.stop()
        for process in steady:
            process.kill()
            process.wait()
    wall = time.monotonic() - started
    ledger = engine.ledger
    experiments = [e for e in ledger.experiments() if e.id != 0]
    noise = machine.noise
    runs = [r for e in ledger.experiments() for r in ledger.runs(e.id)]
    result = {
        "scenario": label,
        "budget": budget,
        "baseline_values": list(noise.values) if noise else [],
        "margin": noise.margin if noise else None,
        "statuses": [e.status for e in experiments],
        "values": [e.val_bpb for e in experiments],
        "false_keeps": sum(1 for e in experiments if e.status == "keep"),
        "candidates": len(experiments),
        "runs": len(runs),
        "disturbed": machine.disturbed,
        "other_load": [r.other_load for r in runs],
        "steps": [r.summary.get("num_steps") for r in runs],
        "wall_s": round(wall, 1),
    }
    engine.close()
    done.write_text(json.dumps(result, indent=1))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--budget", default="60")
    parser.add_argument("--seeds", type=int, default=3, help="baseline seeds (K)")
    parser.add_argument("--candidates", type=int, default=5, help="near no-op candidates per scenario (N)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--out", type=Path, default=Path("bench_noise"))
    parser.add_argument("--no-probe", action="store_true", help="candidates train without their probe first")
    args = parser.parse_args()
    results = []
    for name in args.scenarios.split(","):
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}: use {', '.join(SCENARIOS)}")
        print(f"== {name}", flush=True)
        results.append(scenario(args.out, name, args.budget, args.seeds, args.candidates, not args.no_probe))
    print(
        f"\nbudget {args.budget} s, K = {args.seeds} baseline seeds, N = {args.candidates} near no-op candidates"
    )
    print(
        "| scenario | baseline values | std | margin | false keeps | runs (disturbed) | others' load (cores) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        values = r["baseline_values"]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        loads = [x for x in r["other_load"] if x is not None]
        shown_loads = f"{min(loads):.2f}–{max(loads):.2f}" if loads else "-"
        print(
            f"| {r['scenario']} | {', '.join(f'{v:.4f}' for v in values)} | {std:.4f} | {r['margin']:.4f} | "
            f"{r['false_keeps']} of {r['candidates']} | {r['runs']} ({len(r['disturbed'])}) | {shown_loads} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
