"""Engine overhead per experiment: wall time minus the training run's own time (git, validation, record, decide),
and the judge's cost apart (the model's export inside the run, then the judge process: load, probe, score).

    .venv/bin/python bench/bench_engine_overhead.py                  # 10 experiments, 10 s budget, real nanogpt
    .venv/bin/python bench/bench_engine_overhead.py --budget 1e10flops -n 2     # a quick check that it runs
    .venv/bin/python bench/bench_engine_overhead.py --fake -n 10               # the engine alone, no torch

Each experiment is timed from the moment the engine asks for a proposal to its Decided event; the time of the
train.py process(es) it ran (start to exit, as the runner measures it) and the judge's are subtracted. With
`--probe on` (the CPU default) the few-step probe of each candidate (and of each new best) counts as overhead. Prints one
line per experiment and the medians: overhead at most 1 s, judge (export + load + score) at most 3 s for the
default model on a 2-core CPU. Run it on a quiet machine for figures worth quoting.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import paths  # noqa: E402
from agent.budget import Budget  # noqa: E402
from agent.config import EngineConfig  # noqa: E402
from agent.events import Decided, Event, ProposalReady, ProposalStarted, RunFinished  # noqa: E402
from agent.proposals import Edit, Proposal, ProposalContext  # noqa: E402
from agent.session import open_engine  # noqa: E402
from agent.workspace import Workspace  # noqa: E402

TARGET_S = 1.0
JUDGE_TARGET_S = 3.0

FAKE_HARNESS = {
    "prepare.py": """import json
def report(val):
    print("---")
    print(f"val_bpb:          {val:.6f}")
    print("training_seconds: 0.0")
    json.dump({"val_bpb": round(val, 6)}, open("model.pt2", "w"))
    json.dump({"export": "ok"}, open("claims.json", "w"))
""",
    "corpus.py": '"""No data."""\n',
    "metric.py": """import json
def judge(model_path, claims):
    return {"status": "ok", "reason": "", "val_bpb": json.load(open(model_path))["val_bpb"]}
""",
}
"""A frozen harness that follows docs/contracts.md in milliseconds: the run reports its val_bpb, the judge reads
it back."""
FAKE_TRAIN = """from prepare import report
LEARNING_RATE = 1.0
print("step     1 | loss 2.0000 | lr 1e-3 | tok/s 1 | 0.0s")
report(2.5 + abs(LEARNING_RATE - 1.0))
"""


class NudgeProposer:
    """Proposes n distinct real changes: LEARNING_RATE a little higher each time (a comment would be recorded as a
    no-op and never run). Each applies on any best."""

    name = "bench"
    model_name = None

    def __init__(self, n: int) -> None:
        self.n = n
        self.k = 0

    def propose(self, context: ProposalContext, emit: object, cancel: threading.Event) -> Proposal | None:
        if self.k >= self.n:
            return None
        self.k += 1
        match = re.search(r"^LEARNING_RATE = ([0-9.e+-]+)", context.train_py, re.MULTILINE)
        assert match, "train.py has no LEARNING_RATE constant"
        value = float(match.group(1)) * (1 + 0.001 * self.k)
        edit = Edit(match.group(0), f"LEARNING_RATE = {value!r}")
        return Proposal(f"bench idea {self.k}: LEARNING_RATE {value:.6g}", (edit,), proposer="bench")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=10, help="experiments to time (default 10)")
    parser.add_argument("--budget", default="10", help="AUTORESEARCH_BUDGET per run (default 10 s)")
    parser.add_argument("--fake", action="store_true", help="a no-op train.py: time the engine alone")
    parser.add_argument("--workspace", type=Path, help="where to make the workspace (default: a temp dir)")
    parser.add_argument(
        "--probe",
        choices=("on", "off"),
        default="on",
        help="probe each candidate first (the CPU default; its seconds count as overhead) or not",
    )
    args = parser.parse_args()

    events: list[Event] = []
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        folder = args.workspace or Path(tmp) / "ws"
        source = paths.nanogpt_dir()
        if args.fake:
            source = Path(tmp) / "fake"
            source.mkdir()
            (source / "train.py").write_text(FAKE_TRAIN)
            for name, text in FAKE_HARNESS.items():
                (source / name).write_text(text)
        ws = Workspace.init(folder, tag="bench", source=source, program=Path(tmp) / "none.md")
        config = EngineConfig(
            budget=Budget.parse(args.budget), seeds=1, confirm_marginal=False, probe=args.probe == "on"
        )
        engine = open_engine(ws, NudgeProposer(args.n), config, events.append)
        started = time.perf_counter()
        engine.run()
        elapsed = time.perf_counter() - started
        engine.close()
        if engine.error:
            print(f"the engine failed: {engine.error}", file=sys.stderr)
            return 1

    rows = []
    asked: float | None = None
    runs: dict[int, float] = {}
    judging: dict[int, tuple[float, float]] = {}
    current: int | None = None
    for event in events:
        if isinstance(event, ProposalStarted):
            asked = event.ts
        elif isinstance(event, ProposalReady):
            current = event.exp_id
        elif isinstance(event, RunFinished) and event.exp_id != 0:
            export = event.summary.get("export_seconds")
            export_s = float(export) if isinstance(export, int | float) else 0.0
            judged = judging.get(event.exp_id, (0.0, 0.0))
            judging[event.exp_id] = (judged[0] + export_s, judged[1] + event.judge_seconds)
            runs[event.exp_id] = runs.get(event.exp_id, 0.0) + event.seconds + event.judge_seconds
        elif (
            isinstance(event, Decided) and event.exp_id != 0 and event.exp_id == current and asked is not None
        ):
            wall = event.ts - asked
            child = runs.get(event.exp_id, 0.0)
            export_s, judge_s = judging.get(event.exp_id, (0.0, 0.0))
            rows.append((event.exp_id, event.status, wall, child, wall - child, export_s, judge_s))
    print(
        f"engine overhead per experiment (budget {args.budget}{', fake train.py' if args.fake else ''}, "
        f"probe {args.probe}, "
        f"{os.cpu_count()} CPUs)"
    )
    print(
        f"{'exp':>4}  {'status':<10} {'wall s':>8} {'runs s':>8} {'overhead s':>10} {'export s':>9} {'judge s':>8}"
    )
    for exp_id, status, wall, child, overhead, export_s, judge_s in rows:
        print(
            f"{exp_id:>4}  {status:<10} {wall:8.3f} {child:8.3f} {overhead:10.3f} {export_s:9.3f} {judge_s:8.3f}"
        )
    if not rows:
        print("no experiments were timed")
        return 1
    overheads = [row[4] for row in rows]
    median = statistics.median(overheads)
    print(
        f"overhead: median {median:.3f} s, mean {statistics.fmean(overheads):.3f} s, max {max(overheads):.3f} s "
        f"over {len(rows)} experiments ({elapsed:.1f} s in all)"
    )
    print(f"target <= {TARGET_S:.1f} s: {'met' if median <= TARGET_S else 'NOT met'}")
    if not args.fake:
        exports, judges = [row[5] for row in rows], [row[6] for row in rows]
        cost = statistics.median(e + j for e, j in zip(exports, judges, strict=True))
        print(
            f"judge: export in the run median {statistics.median(exports):.3f} s, judge process (start, load, "
            f"probe, score) median {statistics.median(judges):.3f} s; together median {cost:.3f} s "
            f"(target <= {JUDGE_TARGET_S:.1f} s: {'met' if cost <= JUDGE_TARGET_S else 'NOT met'})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
