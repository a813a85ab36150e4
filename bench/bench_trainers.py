"""Experiments per hour and trainer-busy share for 1, 2, 4 and 8 trainers on a local Ray instance, with a fake
train.py of fixed duration (it sleeps D seconds): how close N trainers come to N times the rate of one.

    .venv/bin/python bench/bench_trainers.py                          # through the engine's scheduler
    .venv/bin/python bench/bench_trainers.py --via trainers           # RayTrainers alone, fed by N threads
    .venv/bin/python bench/bench_trainers.py --trainers 1 2 --sleep 1 --per-trainer 2     # a quick check

`--via engine` runs `open_engine(..., EngineConfig(trainers=N, ray="local"))` with a proposer of instant, harmless
edits (each run is a real run: scratch folder, containment, a judge process); the clock runs from the baseline's
decision to the last experiment's. `--via trainers` calls `RayTrainers.run` from N threads, the clock from the
first submission to the last result. Neither counts Ray's start. Busy share: seconds the trainers spent training
(the runs' own time, as the runner measures it) / (N x wall seconds). Target: N trainers >= 0.9 x N x the rate
of one. The runs' start (interpreter, containment, judge) costs CPU: on a 2-core machine 8 trainers contend for
it, so quote figures from a machine with the cores (or GPUs) to match, or say they were measured under load.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_engine_overhead import FAKE_HARNESS  # noqa: E402  (the same contract-following fake harness)

from agent.budget import Budget  # noqa: E402
from agent.config import EngineConfig  # noqa: E402
from agent.events import Decided, Event, RunFinished  # noqa: E402
from agent.proposals import Edit, Proposal, ProposalContext  # noqa: E402
from agent.sandbox.spec import RunRequest  # noqa: E402
from agent.session import open_engine  # noqa: E402
from agent.trainers.ray import RayTrainers  # noqa: E402
from agent.workspace import Workspace  # noqa: E402

TARGET = 0.9

FAKE_TRAIN = """import time
from prepare import report
SLEEP = {sleep}
print("step     1 | loss 2.0000 | lr 1e-3 | tok/s 1 | 0.0s", flush=True)
time.sleep(SLEEP)
report(2.5)
"""


class PrintProposer:
    """Proposes n harmless, distinct edits (a line printed at the end of train.py: code the engine does not
    take for a no-op, without effect on the score): each applies on any best."""

    name = "bench"
    model_name = None

    def __init__(self, n: int) -> None:
        self.n = n
        self.k = 0

    def propose(self, context: ProposalContext, emit: object, cancel: threading.Event) -> Proposal | None:
        if self.k >= self.n:
            return None
        self.k += 1
        text = context.train_py.rstrip("\n")
        last = text.split("\n")[-1]
        search = last if text.count(last) == 1 else text
        return Proposal(
            f"bench idea {self.k}",
            (Edit(search, f"{search}\nprint('bench idea {self.k}')"),),
            proposer="bench",
        )


def _source(folder: Path, sleep: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.py").write_text(FAKE_TRAIN.format(sleep=sleep))
    for name, text in FAKE_HARNESS.items():
        (folder / name).write_text(text)
    return folder


def via_engine(trainers: int, experiments: int, sleep: float, tmp: Path) -> tuple[int, float, float]:
    """(experiments decided, wall seconds, seconds the runs trained) through the scheduler."""
    source = _source(tmp / "source", sleep)
    ws = Workspace.init(tmp / "ws", tag="bench", source=source, program=tmp / "none.md")
    events: list[Event] = []
    config = EngineConfig(seeds=1, confirm_marginal=False, trainers=trainers, ray="local", overlap=True)
    engine = open_engine(ws, PrintProposer(experiments), config, events.append)
    engine.run()
    engine.close()
    if engine.error:
        raise RuntimeError(f"the engine failed: {engine.error}")
    decided = [e for e in events if isinstance(e, Decided)]
    start = next(e.ts for e in decided if e.exp_id == 0)
    done = [e for e in decided if e.exp_id != 0]
    trained = sum(e.seconds for e in events if isinstance(e, RunFinished) and e.exp_id != 0)
    return len(done), max(e.ts for e in done) - start, trained


def via_trainers(trainers: int, experiments: int, sleep: float, tmp: Path) -> tuple[int, float, float]:
    """(runs finished, wall seconds, seconds the runs trained) calling RayTrainers.run from N threads."""
    workspace = _source(tmp / "ws", sleep)
    config = EngineConfig(deadline_s=sleep + 60, python=sys.executable)
    pool = RayTrainers("local", trainers, "cpu", harness=workspace, config=config)
    train = (workspace / "train.py").read_text()
    todo: queue.Queue[int] = queue.Queue()
    for exp_id in range(1, experiments + 1):
        todo.put(exp_id)
    trained: list[float] = []
    failed: list[str] = []

    def slot(index: int) -> None:
        while True:
            try:
                exp_id = todo.get_nowait()
            except queue.Empty:
                return
            log_path = tmp / "runs" / str(exp_id) / "run.log"
            request = RunRequest(exp_id, 0, 1, train, Budget.parse(f"{sleep + 30:g}"), log_path)
            result = pool.run(index, request, lambda event: None, threading.Event(), None)
            if result.outcome != "ok":
                failed.append(f"#{exp_id}: {result.outcome} {result.reason}")
            trained.append(result.seconds)

    try:
        started = time.monotonic()
        threads = [threading.Thread(target=slot, args=(i,)) for i in range(trainers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.monotonic() - started
    finally:
        pool.close()
    if failed:
        raise RuntimeError("runs failed: " + "; ".join(failed[:3]))
    return len(trained), wall, sum(trained)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--via", choices=("engine", "trainers"), default="engine")
    parser.add_argument("--trainers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--sleep", type=float, default=2.0, help="seconds each fake run sleeps (default 2)")
    parser.add_argument(
        "--per-trainer", type=int, default=4, help="experiments per trainer (default 4: 32 for 8 trainers)"
    )
    args = parser.parse_args()

    measure = via_engine if args.via == "engine" else via_trainers
    print(
        f"trainers on a local Ray instance, via {args.via}: fake runs of {args.sleep:g} s, "
        f"{args.per_trainer} experiments per trainer, {os.cpu_count()} CPUs"
    )
    print(f"{'N':>3} {'exps':>5} {'wall s':>8} {'exp/h':>8} {'x one':>6} {'busy':>6}  target >= {TARGET} x N")
    one: float | None = None
    missed = 0
    for n in args.trainers:
        with tempfile.TemporaryDirectory(prefix="bench-trainers-") as tmp:
            count, wall, trained = measure(n, n * args.per_trainer, args.sleep, Path(tmp))
        rate = count / wall * 3600
        one = one if one is not None else rate / args.trainers[0]
        gain = rate / one
        met = gain >= TARGET * n
        missed += not met
        print(
            f"{n:>3} {count:>5} {wall:8.1f} {rate:8.0f} {gain:6.2f} {trained / (n * wall):6.0%}  "
            f"{'met' if met else 'NOT met'}"
        )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
