"""A fake harness that follows docs/contracts.md in milliseconds, for engine, runner and resume tests.

val_bpb = 2 + |LEARNING_RATE - 0.5| + a tiny seed-dependent wobble, so an idea's effect is known exactly. Its
"model" is that number, and its judge (in FAKE_METRIC, as the real one is in metric.py) reads it back: the real
judge's defences are tested on the real harness.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from agent.events import Event
from agent.ledger import Ledger, read_results_tsv
from agent.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent

FAKE_PREPARE = '''"""Fake frozen harness, what train.py imports: prints the summary block, hands over a "model" (its val_bpb)."""
import json
import os


def report(val_bpb, steps=3, printed=None):
    seed = int(os.environ.get("AUTORESEARCH_SEED", "0"))
    print("---")
    print(f"val_bpb:          {printed if printed is not None else val_bpb:.6f}")
    print("training_seconds: 0.1")
    print("total_seconds:    0.2")
    print("peak_memory_mb:   42.0")
    print(f"num_steps:        {steps}")
    print(f"seed:             {seed}")
    with open("model.pt2", "w") as fh:
        json.dump({"val_bpb": round(val_bpb, 6)}, fh)
    with open("claims.json", "w") as fh:
        json.dump({"export": "ok", "training_seconds": 0.1, "train_flops": 1.0, "num_steps": steps,
                   "seed": seed}, fh)
'''

PROBING_PREPARE = FAKE_PREPARE.replace(
    "def report(val_bpb, steps=3, printed=None):\n",
    "def report(val_bpb, steps=3, printed=None):\n"
    '    steps = int(os.environ.get("AUTORESEARCH_PROBE_STEPS", steps))  # a probe\'s few steps\n',
)
"""The fake harness with the probe knob: a crashing train.py crashes in a probe (and a trial) too; a probe
that trains has no fingerprint (the fake judge gives none), so nothing is settled as a no-op."""

FAKE_METRIC = '''"""Fake frozen metric, what only the judge imports: reads the "model" (its val_bpb) back."""
import json

import prepare  # noqa: F401  (only the judge's frozen copy can be found: the real metric.py imports it too)


def judge(model_path, claims):
    with open(model_path) as fh:
        model = json.load(fh)
    return {"status": "ok", "reason": "", "val_bpb": model["val_bpb"], "eval_tokens": 1, "eval_bytes": 1}
'''

FAKE_CORPUS = '''"""Fake frozen corpus: the fake harness reads no data."""
'''

FAKE_TRAIN = '''"""Fake train.py: the constants decide val_bpb."""
import os

from prepare import report

seed = int(os.environ.get("AUTORESEARCH_SEED", "1"))
LEARNING_RATE = 1.0
EXTRA = 0.0
CRASH = False
WOBBLE = 0.0001

if CRASH:
    raise RuntimeError("boom: this idea crashes")
for step in range(3):
    print(f"step {step:5d} | loss {2.5 - step * 0.1:.4f} | lr {LEARNING_RATE:.2e} | tok/s 1000 | 0.0s")
report(2.0 + abs(LEARNING_RATE - 0.5) + EXTRA + WOBBLE * (seed % 3))
'''


SLOW_TRAIN = '''"""Fake train.py for the scheduler: the constants decide val_bpb, SLEEP how long a run takes."""
import os
import time

from prepare import report

seed = int(os.environ.get("AUTORESEARCH_SEED", "1"))

LEARNING_RATE = 1.0

# ---

EXTRA = 0.0

# ---

SLEEP = 0.2

time.sleep(SLEEP)
print("step     0 | loss 2.5000 | lr 1.00e+00 | tok/s 1000 | 0.0s", flush=True)
report(2.0 + abs(LEARNING_RATE - 0.5) + EXTRA)
'''
"""For the scheduler: no wobble (every baseline seed scores 2.5, so the margin is the minimum, 0.002), and the
constants lines apart, so that changes to two of them merge cleanly."""


SUMMARY_KEYS = [
    "val_bpb",
    "training_seconds",
    "total_seconds",
    "peak_memory_mb",
    "mfu_percent",
    "total_tokens_M",
    "num_steps",
    "num_params_M",
    "train_flops",
    "budget",
    "seed",
]
"""The keys of the `---` summary block a run prints, in order (docs/contracts.md)."""

FAKE_HARNESS_SHA256 = {
    name: hashlib.sha256(text.encode()).hexdigest()
    for name, text in (("prepare.py", FAKE_PREPARE), ("corpus.py", FAKE_CORPUS), ("metric.py", FAKE_METRIC))
}
"""The fake harness's files' SHA-256, by name, as a workspace records them at init."""


def write_harness(folder: Path, prepare: str = FAKE_PREPARE, metric: str = FAKE_METRIC) -> None:
    """Write the fake frozen harness (prepare.py, corpus.py, metric.py) into `folder`."""
    (folder / "prepare.py").write_text(prepare)
    (folder / "corpus.py").write_text(FAKE_CORPUS)
    (folder / "metric.py").write_text(metric)


def make_source(
    folder: Path, train: str = FAKE_TRAIN, prepare: str = FAKE_PREPARE, metric: str = FAKE_METRIC
) -> Path:
    """A folder shaped like nanogpt/ holding the fake harness."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.py").write_text(train)
    write_harness(folder, prepare, metric)
    return folder


def make_workspace(
    tmp: Path, train: str = FAKE_TRAIN, prepare: str = FAKE_PREPARE, metric: str = FAKE_METRIC
) -> Workspace:
    source = make_source(tmp / "source", train, prepare, metric)
    return Workspace.init(tmp / "ws", tag="test", source=source, program=tmp / "no-program.md")


def idea(description: str, search: str, replace: str, **extra: str) -> dict[str, object]:
    edit: dict[str, str] = {"search": search, "replace": replace, **extra}
    return {"description": description, "edits": [edit]}


def write_ideas(path: Path, ideas: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(i) + "\n" for i in ideas))
    return path


BETTER = idea("lower the learning rate", "LEARNING_RATE = 1.0", "LEARNING_RATE = 0.6")
WORSE = idea("add a penalty", "EXTRA = 0.0", "EXTRA = 0.5")
CRASHES = idea("an idea that crashes", "CRASH = False", "CRASH = True")
MARGINAL = idea("a marginal gain", "EXTRA = 0.0", "EXTRA = -0.003")
FLUKE = idea("a fluke on seed 1", "EXTRA = 0.0", "EXTRA = -0.003 if seed == 1 else 0.0")
SLOW = idea(
    "a run that takes a minute",
    "CRASH = False",
    "CRASH = False\nimport time\nprint('sleeping', flush=True)\ntime.sleep(60)",
)
"""Baseline with seeds 1, 2: 2.5001, 2.5002 -> mean 2.50015, margin 0.002 (the minimum)."""


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `python -m agent.cli ARGS` as the user would, from the project root."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=ROOT,
        timeout=timeout,
    )


class Recorder:
    """An EventSink that keeps every event, runs hooks (from the engine thread) and lets a test wait."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.hooks: list[Callable[[Event], None]] = []
        self._cond = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()
        for hook in self.hooks:
            hook(event)

    def of(self, kind: type) -> list:
        with self._cond:
            return [e for e in self.events if isinstance(e, kind)]

    def wait_for(self, predicate: Callable[[Event], bool], timeout: float = 60.0) -> Event:
        """The first event matching `predicate`, waiting for it if need be (fails after `timeout`)."""

        def found() -> Event | None:
            return next((e for e in self.events if predicate(e)), None)

        with self._cond:
            event = self._cond.wait_for(found, timeout)
        assert event is not None, "the awaited event never came"
        return event


def assert_consistent(ws: Workspace) -> Ledger:
    """The invariants a stopped engine must leave, whatever happened: returns the (open) ledger."""
    ledger = Ledger(ws.ledger_path)
    experiments = ledger.experiments()
    assert experiments, "no experiments"
    assert all(e.phase == "decided" for e in experiments), [(e.id, e.phase) for e in experiments]
    assert not [e for e in experiments if e.status in ("pending", "running")]
    best_commit = ledger.get_meta("best_commit")
    best = ledger.get(ledger.get_meta("best_exp_id"))
    assert best is not None and best.status in ("keep", "baseline") and best.commit == best_commit
    assert ws.head() == best_commit, "the branch is not at the best kept commit"
    assert ws.read_train() == ws.file_at(best_commit)
    refs = ws.discarded_refs()
    for exp in experiments:
        if exp.status not in ("keep", "baseline") and exp.commit:
            assert refs.get(exp.id) == exp.commit, f"#{exp.id} ({exp.status}) lost its commit"
    kept = [e for e in experiments if e.status == "keep"]
    for exp in kept:
        assert ws.repo.is_ancestor(exp.commit, best_commit), f"kept #{exp.id} is not on the branch"
    assert read_results_tsv(ws.results_tsv) == ledger.results_rows()
    assert ws.repo.git.status("--porcelain") == ""
    assert ws.harness_problems() == []
    assert not [r for e in experiments for r in ledger.runs(e.id) if r.outcome is None]
    return ledger


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie is dead: killed, not yet reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def working_in(folder: Path) -> list[int]:
    """Live processes whose working directory is in `folder`."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.status() != psutil.STATUS_ZOMBIE and Path(proc.cwd()).is_relative_to(folder):
                found.append(proc.pid)
    return found


class BusyMachine:
    """Competing busy processes, one pinned to each core this process may use (so a run shares every core with
    one of them, wherever the scheduler puts it), from `start()` until `stop()`; a context manager too."""

    def __init__(self) -> None:
        self.hogs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for core in sorted(os.sched_getaffinity(0)):
            self.hogs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
            os.sched_setaffinity(self.hogs[-1].pid, {core})

    def stop(self) -> None:
        for hog in self.hogs:
            hog.kill()
            hog.wait()
        self.hogs.clear()

    def __enter__(self) -> BusyMachine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def outside_tmp(name: str) -> Iterator[Path]:
    """A fresh folder outside /tmp, where users keep their workspaces (a run's private /tmp would hide one under
    /tmp from it, and so hide what a run can reach), removed afterwards."""
    base = Path("/var/tmp") if os.access("/var/tmp", os.W_OK) else Path.home()
    folder = Path(tempfile.mkdtemp(prefix=f"autoresearch-test-{name}-", dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
