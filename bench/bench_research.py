"""Effectiveness benchmark: what the researcher achieves against random search in the same compute.

    .venv/bin/python bench/bench_research.py --arms default,random -R 3 -N 8 --budget 30 --out bench-out/research
    .venv/bin/python bench/bench_research.py --arms random -R 1 -N 2 --budget 5      # a quick check that it runs

For each arm (`default`: the hybrid researcher the CLI proposes with, CMA-ES and the embedded model on 30 % of
the turns; `hybrid:SHARE`: the same with another share of the model's turns; `llm`: the embedded model alone,
`--proposer llm`; `random`: `--proposer random`; `tpe` and `cmaes`: Optuna's samplers, `--proposer tpe|cmaes`,
each session's study in its workspace; `cmaes:SIGMA0`: CMA-ES with another first step, as the hybrid's; any other name: that registry model alone), R independent sessions of N experiments, each on a fresh workspace made from
nanogpt/ (or `--source DIR`), driven headless by the real engine with the proposer the CLI would build. Every
session gets the same budget, the same baseline seeds and the session seed `--seed + i` (random search's seed,
the model's sampling seed), so arms differ only in who proposes.

Per session, from the session's ledger and its events:
- gain: the baseline's mean val_bpb minus the best keep's (0 without a keep);
- keeps, valid proposals (they applied and ran), rejected ones, crashes (every failed run: crash, timeout, oom,
  nan, invalid), no-op runs (a first run whose val_bpb equals, to half a unit of the 6th decimal, the parent's
  run with the same seed: the edit changed nothing measurable);
- seconds per proposal (ProposalStarted to ProposalReady or ProposalRejected; a model's load is not counted:
  it happens once, before the session), and seconds per experiment (the session's wall time from its first
  proposal to its last decision, over its experiments);
- false keeps: every keep's train.py is trained again with 2 fresh seeds (RERUN_SEEDS, the same for every
  keep), in a workspace of its own by the same engine; a keep whose reruns' mean does not beat the best at the
  time it was kept (its parent's val_bpb) by the session's noise margin is false. `rerun gain` is the gain of
  the session's final best measured on those fresh seeds.

Per arm: the mean gain with its spread over sessions (sample std, min, max), the sums of the counts, the
median and p90 of every proposal's seconds, the seconds per experiment; then the gain ratio of each arm to
random search. Written to DIR/results.json and DIR/research.png (best-so-far val_bpb against experiment, one
line per session, one colour per arm), and printed as tables.

Resumable: each session's results are saved in DIR/sessions/ARM/I/session.json when it ends, and a rerun with
the same settings skips those; a session killed half-way is resumed by the engine's own recovery (its ledger
and git say where it was), with the proposer seeded afresh so that it does not replay its first proposals; a
false-keep rerun killed half-way resumes the same way. A rerun with a different N, budget, seed, source or
program is refused (results would not compare); more sessions or more arms extend the results.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.budget import Budget  # noqa: E402
from agent.commands import Shutdown  # noqa: E402
from agent.config import EngineConfig  # noqa: E402
from agent.engine import Engine  # noqa: E402
from agent.events import (  # noqa: E402
    Decided,
    EngineError,
    Event,
    ModelLoaded,
    ProposalReady,
    ProposalRejected,
    ProposalStarted,
    RunFinished,
)
from agent.ledger import FAILED, Experiment, Ledger  # noqa: E402
from agent.proposals import Proposal, ProposalContext, Proposer  # noqa: E402
from agent.session import open_engine  # noqa: E402
from agent.workspace import (  # noqa: E402
    HARNESS,
    PROGRAM,
    TRAIN,
    Workspace,
    WorkspaceError,
    get_profile,
    write_atomic,
)

RANDOM = "random"
"""The control arm: random search (`--proposer random`)."""
OPTUNA = ("tpe", "cmaes")
"""The classical arms: Optuna's TPE and CMA-ES (`--proposer tpe|cmaes`), their study in each session's workspace."""
DEFAULT = "default"
"""The researcher as a new user meets it: the hybrid of CMA-ES and the embedded default model."""
LLM = "llm"
"""The embedded default model alone (`--proposer llm`)."""
HYBRID_PREFIX = "hybrid:"
"""`hybrid:SHARE` (e.g. hybrid:0.5): the default researcher with another share of the model's turns."""
RERUN_SEEDS = (1001, 1002)
"""Fresh training seeds for the false-keep reruns (the baseline and candidates use 1, 2, ...)."""
NOOP_TOLERANCE = 5e-7
"""Two val_bpb closer than this are identical as the ledger shows them (6 decimals): a no-op run."""
RESUME_SEED_STRIDE = 1_000_003
"""A resumed session's proposer is seeded with seed + stride x experiments done, not replaying the first ones."""
COLOURS = ("#d62728", "#7f7f7f", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")
"""One colour per arm, in --arms order (random search grey when it comes second, as in `default,random`)."""
SETTINGS_FILE = "settings.json"


class BenchError(Exception):
    """A benchmark that cannot go on; the message says why."""


@dataclass(frozen=True)
class Arm:
    """One way of proposing: a name and how to build its proposer for a session seed and workspace."""

    name: str
    make: Callable[[int, Workspace], Proposer]


def arm_named(name: str) -> Arm:
    """`random`, `tpe`, `cmaes`, `default` or a registry model's name, as the CLI would build it (ModelError if
    unknown)."""
    if name == RANDOM:
        from agent.researcher.random_search import RandomSearch

        return Arm(name, lambda seed, ws: RandomSearch(seed))
    sampler, _, sigma = name.partition(":")
    if sampler in OPTUNA:  # tpe, cmaes, or cmaes:SIGMA0 (CMA-ES with another first step)
        from agent.researcher.optuna_search import STUDY_FILE, OptunaSearch

        step = float(sigma) if sigma else None
        return Arm(name, lambda seed, ws: OptunaSearch(sampler, ws.state_dir / STUDY_FILE, seed, step))
    from agent.researcher.hybrid import MODEL_SHARE
    from agent.researcher.models import resolve_model

    share = MODEL_SHARE if name == DEFAULT else None  # None: the model alone
    if name.startswith(HYBRID_PREFIX):
        share = float(name.removeprefix(HYBRID_PREFIX))
    model = None if name == LLM or share is not None else name
    resolve_model(model)  # an unknown model fails now, not after an hour of other arms

    def make(seed: int, ws: Workspace) -> Proposer:
        from agent.researcher.hybrid import hybrid
        from agent.researcher.proposer import make_proposer

        proposer = make_proposer(model, seed)
        return proposer if share is None else hybrid(proposer, ws.state_dir, seed, share)

    return Arm(name, make)


@dataclass(frozen=True)
class Settings:
    """What every session of every arm shares; results made with other settings do not compare."""

    experiments: int
    """N: experiments per session (the baseline not counted; rejected proposals counted)."""
    budget: str | None
    """The training budget of every run (None: the harness default)."""
    seed: int = 0
    """Session i's seed is seed + i."""
    baseline_seeds: int | None = None
    """K baseline runs per session (None: the engine's default)."""
    source: Path | None = None
    """A folder shaped like nanogpt/ to make the workspaces from (None: the shipped one)."""
    program: Path | None = None
    """The program.md of every session (None: the profile's); an ablation changes the human's instructions."""
    engine: Mapping[str, Any] = field(default_factory=dict)
    """Further EngineConfig fields (tests: a short deadline)."""

    def key(self) -> dict[str, Any]:
        """What must match for a rerun to add to earlier results."""
        return {
            "experiments": self.experiments,
            "budget": self.budget,
            "seed": self.seed,
            "baseline_seeds": self.baseline_seeds,
            "source": str(self.source.resolve()) if self.source else None,
        } | ({"program": str(self.program.resolve())} if self.program else {})

    def config(self, **fields: Any) -> EngineConfig:
        budget = Budget.parse(self.budget) if self.budget else None
        values: dict[str, Any] = {"budget": budget, "seeds": self.baseline_seeds, **self.engine}
        return EngineConfig(**{**values, **fields})


# ---- driving the engine -------------------------------------------------------------------------------


class _NoProposals:
    """The proposer of a false-keep rerun: only the baseline (the kept train.py) runs."""

    name = "rerun"
    model_name = None

    def propose(self, context: ProposalContext, emit: Any, cancel: threading.Event) -> Proposal | None:
        return None


_LOGGED = (ProposalStarted, ProposalReady, ProposalRejected, Decided, RunFinished, ModelLoaded, EngineError)
"""The events a session keeps in its events.jsonl (run output, tokens and states are left out)."""


class EventLog:
    """An EventSink that appends a session's timing and decision events to a JSON-lines file, and prints
    one line per decision."""

    def __init__(self, path: Path, label: str, echo: bool = True) -> None:
        self.path = path
        self.label = label
        self.echo = echo
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def mark(self, kind: str) -> None:
        """A line of the bench's own: a segment of the session starts (the engine is started) or ends."""
        self._write({"kind": kind, "ts": time.time()})

    def __call__(self, event: Event) -> None:
        if not isinstance(event, _LOGGED):
            return
        data: dict[str, Any] = {"kind": event.kind, "ts": event.ts}
        if isinstance(event, Decided):
            data |= {"exp_id": event.exp_id, "status": event.status, "val_bpb": event.val_bpb}
            if self.echo:
                bpb = "-" if event.val_bpb is None else f"{event.val_bpb:.6f}"
                best = "-" if event.best_bpb is None else f"{event.best_bpb:.6f}"
                print(
                    f"  {self.label} #{event.exp_id:<3d} {event.status:<9s} {bpb:>9s}  best {best}",
                    flush=True,
                )
        elif isinstance(event, RunFinished):
            data |= {"exp_id": event.exp_id, "outcome": event.outcome, "seconds": event.seconds}
        elif isinstance(event, ProposalReady):
            data["exp_id"] = event.exp_id
        elif isinstance(event, ModelLoaded):
            data["seconds"] = event.seconds
        elif isinstance(event, EngineError):
            data["message"] = event.message
            if self.echo:
                print(f"  {self.label} error: {event.message}", flush=True)
        self._write(data)

    def _write(self, data: dict[str, Any]) -> None:
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(data) + "\n")
            fh.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        # A kill can leave a half-written last line: it is dropped.
        return [json.loads(line) for line in lines if line.strip().endswith("}")]


def drive(engine: Engine) -> None:
    """Run the engine to its end in its thread; Ctrl-C shuts it down cleanly (the run in flight is recorded
    as interrupted and re-queued, so a rerun of the bench resumes the session) and is raised again."""
    engine.start()
    try:
        while not engine.finished:
            engine.join(0.5)
    except KeyboardInterrupt:
        print(
            "bench: stopping (the run in flight is recorded as interrupted; rerun to resume)", file=sys.stderr
        )
        engine.send(Shutdown())
        engine.join()
        raise
    finally:
        engine.close()


def _fresh(path: Path) -> Path:
    """`path` as an empty folder (what a kill during a workspace's creation left is removed)."""
    if path.exists():
        shutil.rmtree(path)
    return path


def workspace_of(
    folder: Path,
    train_py: str,
    harness: Mapping[str, str],
    tag: str,
    profile: str,
    program: Path | None = None,
) -> Workspace:
    """The workspace in `folder`/ws whose baseline is `train_py` on `harness` (file name -> text): made from a
    source folder written beside it, or opened where an earlier (killed) run made it."""
    where = folder / "ws"
    if Workspace.is_workspace(where):
        return Workspace.open(where)
    source = _fresh(folder / "source")
    train = source / get_profile(profile).folder / TRAIN
    train.parent.mkdir(parents=True, exist_ok=True)
    train.write_text(train_py, encoding="utf-8")
    for name, text in harness.items():
        (source / name).write_text(text, encoding="utf-8")
    return Workspace.init(_fresh(where), tag=tag, source=source, program=program, profile=profile)


def _counted(experiments: Sequence[Experiment]) -> list[Experiment]:
    """The session's experiments: after the baseline, interrupted ones left out (their re-run counts)."""
    return [e for e in experiments if e.id != 0 and e.status != "interrupted"]


# ---- one session --------------------------------------------------------------------------------------


def session_dir(out: Path, arm: str, index: int) -> Path:
    return out / "sessions" / re.sub(r"[^A-Za-z0-9._-]", "_", arm) / str(index)


def run_session(arm: Arm, index: int, settings: Settings, out: Path) -> dict[str, Any]:
    """Session `index` of `arm`: its saved results, or the session run (or resumed) now and measured."""
    folder = session_dir(out, arm.name, index)
    saved = folder / "session.json"
    if saved.is_file():
        return dict(json.loads(saved.read_text(encoding="utf-8")))
    label = f"[{arm.name} {index}]"
    path = folder / "ws"
    if Workspace.is_workspace(path):
        ws = Workspace.open(path)
        print(f"{label} resuming the session in {path}", flush=True)
    else:
        ws = Workspace.init(
            _fresh(path), tag=f"bench{index}", source=settings.source, program=settings.program
        )
        print(f"{label} a new session in {path}", flush=True)
    done = _ledger_experiments(ws)
    left = settings.experiments - len(_counted(done))
    seed = settings.seed + index
    proposer = arm.make(seed + RESUME_SEED_STRIDE * len(_counted(done)) if done else seed, ws)
    log = EventLog(folder / "events.jsonl", label)
    load = getattr(proposer, "load", None)
    if callable(load):
        load(log)  # a model is loaded once per session, before it: not a proposal's seconds
    engine = open_engine(ws, proposer, settings.config(max_experiments=max(0, left)), log)
    log.mark("Start")
    try:
        drive(engine)
    finally:
        close = getattr(proposer, "close", None)
        if callable(close):
            close()
    log.mark("End")
    if engine.error:
        raise BenchError(f"{label} the engine failed: {engine.error}")
    experiments = _ledger_experiments(ws)
    result = measure_session(ws, experiments, log.read(), settings)
    result |= {"arm": arm.name, "index": index, "seed": seed, "workspace": str(ws.path)}
    result["keeps"] = [
        {**keep, **check_keep(ws, keep, result["margin"], settings, folder / "reruns", label)}
        for keep in result["keeps"]
    ]
    result |= rerun_figures(result)
    write_atomic(saved, json.dumps(result, indent=2) + "\n")
    return result


def _ledger_experiments(ws: Workspace) -> list[Experiment]:
    ledger = Ledger(ws.ledger_path)
    try:
        return ledger.experiments()
    finally:
        ledger.close()


def measure_session(
    ws: Workspace, experiments: Sequence[Experiment], events: Sequence[dict[str, Any]], settings: Settings
) -> dict[str, Any]:
    """A finished session's figures, from its ledger and its event log (false keeps come after)."""
    ledger = Ledger(ws.ledger_path)
    try:
        baseline = ledger.get_meta("baseline_bpb")
        noise = ledger.get_meta("noise") or {}
        runs_of = {e.id: ledger.runs(e.id) for e in experiments}
    finally:
        ledger.close()
    if baseline is None:
        raise BenchError(f"{ws.path} has no baseline: the session did not get going")
    counted = _counted(experiments)
    by_commit = {e.commit: e for e in experiments if e.status in ("baseline", "keep") and e.commit}
    base_seed = settings.config().base_seed

    def seed_run(exp: Experiment) -> float | None:
        return next((r.val_bpb for r in runs_of[exp.id] if r.seed == base_seed and r.outcome == "ok"), None)

    best = float(baseline)
    curve = [best]
    keeps: list[dict[str, Any]] = []
    noops: list[int] = []
    for exp in counted:
        parent = by_commit.get(exp.parent_commit or "")
        if exp.status == "noop":  # caught by the engine (same syntax tree, or the same model after a probe)
            noops.append(exp.id)
        elif exp.status in ("keep", "discard") and parent is not None:
            mine, theirs = seed_run(exp), seed_run(parent)
            if mine is not None and theirs is not None and abs(mine - theirs) < NOOP_TOLERANCE:
                noops.append(exp.id)
        if exp.status == "keep" and exp.val_bpb is not None:
            parent_bpb = parent.val_bpb if parent is not None and parent.val_bpb is not None else best
            keeps.append(
                {
                    "exp_id": exp.id,
                    "description": exp.description,
                    "commit": exp.commit,
                    "val_bpb": exp.val_bpb,
                    "parent_bpb": parent_bpb,
                    "gain": parent_bpb - exp.val_bpb,
                }
            )
            best = exp.val_bpb
        curve.append(best)
    proposals, wall = proposal_seconds(events), active_seconds(events)
    statuses = [e.status for e in counted]
    return {
        "baseline_bpb": float(baseline),
        "margin": float(noise.get("margin", settings.config().default_margin)),
        "best_bpb": best,
        "gain": float(baseline) - best,
        "experiments": len(counted),
        "valid": sum(s in ("keep", "discard", *FAILED) for s in statuses),
        "rejected": statuses.count("rejected"),
        "crashes": sum(s in FAILED for s in statuses),
        "noops": noops,
        "keeps": keeps,
        "best_so_far": curve,
        "proposal_seconds": proposals,
        "wall_seconds": wall,
        "seconds_per_experiment": wall / len(counted) if counted else None,
        "model_load_seconds": [e["seconds"] for e in events if e["kind"] == "ModelLoaded"],
        "profile": ws.profile,
    }


def proposal_seconds(events: Sequence[dict[str, Any]]) -> list[float]:
    """Seconds of each proposal: a ProposalStarted to the next ProposalReady or ProposalRejected (a proposer
    that raised, was cancelled or ran dry has no such end: it is not a proposal)."""
    seconds: list[float] = []
    started: float | None = None
    for event in events:
        if event["kind"] == "ProposalStarted":
            started = event["ts"]
        elif event["kind"] in ("ProposalReady", "ProposalRejected") and started is not None:
            seconds.append(event["ts"] - started)
            started = None
        elif event["kind"] == "Start":
            started = None
    return seconds


def active_seconds(events: Sequence[dict[str, Any]]) -> float:
    """The session's wall time spent on experiments: in each segment (an engine's life), from its first
    proposal to its last decision; the baseline and the time between a kill and the resume are left out."""
    total = 0.0
    first: float | None = None
    last: float | None = None
    for event in [*events, {"kind": "Start", "ts": 0.0}]:
        if event["kind"] == "Start":
            if first is not None and last is not None and last > first:
                total += last - first
            first = last = None
        elif event["kind"] == "ProposalStarted" and first is None:
            first = event["ts"]
        elif event["kind"] in ("Decided", "ProposalRejected") and first is not None:
            last = event["ts"]
    return total


# ---- false keeps ----------------------------------------------------------------------------------------


def check_keep(
    ws: Workspace, keep: Mapping[str, Any], margin: float, settings: Settings, folder: Path, label: str
) -> dict[str, Any]:
    """Train the kept train.py again with RERUN_SEEDS (in a workspace of its own); false if the reruns' mean
    does not beat the parent's val_bpb by `margin`."""
    path = folder / str(keep["exp_id"])
    saved = path / "rerun.json"
    if saved.is_file():
        return dict(json.loads(saved.read_text(encoding="utf-8")))
    harness = {name: ws.file_at(keep["commit"], name) for name in HARNESS}
    train_py = ws.file_at(keep["commit"])
    rerun = workspace_of(path, train_py, harness, "rerun", ws.profile, ws.path / PROGRAM)
    print(
        f"{label} #{keep['exp_id']}: training the kept train.py again with seeds {list(RERUN_SEEDS)}",
        flush=True,
    )
    config = settings.config(seeds=len(RERUN_SEEDS), base_seed=RERUN_SEEDS[0], max_experiments=0)
    engine = open_engine(rerun, _NoProposals(), config, EventLog(path / "events.jsonl", label, echo=False))
    drive(engine)
    values = _rerun_values(rerun)
    if engine.error or len(values) < len(RERUN_SEEDS):
        result: dict[str, Any] = {
            "reruns": values,
            "rerun_mean": None,
            "false": True,
            "why": f"the reruns failed: {engine.error or 'no value'}",
        }
    else:
        mean = statistics.fmean(values)
        beats = mean < keep["parent_bpb"] - margin
        result = {
            "reruns": values,
            "rerun_mean": mean,
            "false": not beats,
            "why": f"reruns' mean {mean:.6f} {'beats' if beats else 'does not beat'} the best at the time "
            f"{keep['parent_bpb']:.6f} - margin {margin:.6f}",
        }
    write_atomic(saved, json.dumps(result, indent=2) + "\n")
    return result


def _rerun_values(ws: Workspace) -> list[float]:
    ledger = Ledger(ws.ledger_path)
    try:
        runs = ledger.runs(0)
    finally:
        ledger.close()
    by_seed = {r.seed: r.val_bpb for r in runs if r.outcome == "ok" and r.val_bpb is not None}
    return [by_seed[s] for s in RERUN_SEEDS if s in by_seed]


def rerun_figures(session: Mapping[str, Any]) -> dict[str, Any]:
    """False keeps, and the gain of the final best as its reruns measure it."""
    keeps = session["keeps"]
    final = keeps[-1]["rerun_mean"] if keeps else session["baseline_bpb"]
    return {
        "false_keeps": [k["exp_id"] for k in keeps if k["false"]],
        "rerun_gain": None if final is None else session["baseline_bpb"] - final,
    }


# ---- an arm's figures -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) of `values`, linear between order statistics; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, sample std (None with one value), min and max."""
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def summarize_arm(sessions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """An arm's figures over its sessions."""
    proposals = [s for session in sessions for s in session["proposal_seconds"]]
    wall = sum(s["wall_seconds"] for s in sessions)
    experiments = sum(s["experiments"] for s in sessions)
    keeps = sum(len(s["keeps"]) for s in sessions)
    false_keeps = sum(len(s["false_keeps"]) for s in sessions)
    rerun_gains = [s["rerun_gain"] for s in sessions if s["rerun_gain"] is not None]
    return {
        "sessions": len(sessions),
        "experiments": experiments,
        "gain": spread([s["gain"] for s in sessions]),
        "rerun_gain": spread(rerun_gains),
        "keeps": keeps,
        "valid": sum(s["valid"] for s in sessions),
        "rejected": sum(s["rejected"] for s in sessions),
        "crashes": sum(s["crashes"] for s in sessions),
        "noops": sum(len(s["noops"]) for s in sessions),
        "false_keeps": false_keeps,
        "false_keep_share": false_keeps / keeps if keeps else None,
        "proposal_seconds": {
            "n": len(proposals),
            "median": statistics.median(proposals) if proposals else None,
            "p90": percentile(proposals, 0.9),
        },
        "seconds_per_experiment": wall / experiments if experiments else None,
    }


def gain_ratios(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """Each arm's mean gain over random search's (None where random search gained nothing or is absent)."""
    control = summaries.get(RANDOM)
    base = control["gain"]["mean"] if control else None
    return {
        name: (summary["gain"]["mean"] / base if base else None)
        for name, summary in summaries.items()
        if name != RANDOM
    }


# ---- the whole benchmark --------------------------------------------------------------------------------


def check_settings(out: Path, settings: Settings) -> None:
    """Record the settings in a new DIR; refuse a DIR whose results were made with other ones."""
    path = out / SETTINGS_FILE
    key = settings.key()
    if path.is_file():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        if earlier != key:
            changed = ", ".join(
                f"{k} {earlier.get(k)!r} -> {v!r}" for k, v in key.items() if earlier.get(k) != v
            )
            raise BenchError(
                f"{out} holds results made with other settings ({changed}): they would not compare; "
                "use the same settings or another --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(key, indent=2) + "\n")


ORACLE_AT = (10, 20)
"""The experiments at which each arm's gain is given as a share of the oracle's (and at N)."""


def oracle_shares(
    results: Mapping[str, Sequence[Mapping[str, Any]]], oracle: Mapping[str, Any], experiments: int
) -> dict[str, dict[str, float | None]]:
    """Per arm, its sessions' mean gain after k experiments (best so far) as a share of the oracle's gain, for
    each k of ORACLE_AT within N and for N."""
    shares: dict[str, dict[str, float | None]] = {}
    gain = float(oracle["gain"])
    for name, sessions in results.items():
        shares[name] = {}
        for k in sorted({*(k for k in ORACLE_AT if k <= experiments), experiments}):
            gains = [
                s["best_so_far"][0] - s["best_so_far"][min(k, len(s["best_so_far"]) - 1)] for s in sessions
            ]
            shares[name][str(k)] = statistics.fmean(gains) / gain if gains and gain > 0 else None
    return shares


def read_oracle(path: Path, settings: Settings) -> dict[str, Any]:
    """bench_oracle's results for the train.py, budget and baseline seeds of these sessions (else BenchError)."""
    from bench_oracle import source_train

    from agent.edits import file_hash

    oracle = dict(json.loads(path.read_text(encoding="utf-8")))
    wanted = {
        "train_hash": file_hash(source_train(settings.source)),
        "budget": settings.budget,
        "baseline_seeds": settings.baseline_seeds,
    }
    found = {key: oracle.get(key) for key in wanted}
    if found != wanted:
        raise BenchError(f"--oracle {path} was measured for {found}, not for these sessions' {wanted}")
    return oracle


def run_benchmark(
    arms: Sequence[Arm], sessions: int, settings: Settings, out: Path, oracle: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """R sessions of every arm (saved ones skipped), then results.json and research.png in `out`."""
    check_settings(out, settings)
    results: dict[str, list[dict[str, Any]]] = {}
    for arm in arms:
        results[arm.name] = [run_session(arm, i, settings, out) for i in range(sessions)]
    summaries = {name: summarize_arm(found) for name, found in results.items()}
    report = {
        "settings": settings.key() | {"sessions": sessions, "rerun_seeds": list(RERUN_SEEDS)},
        "arms": {name: {"summary": summaries[name], "sessions": results[name]} for name in results},
        "gain_ratio_to_random": gain_ratios(summaries),
    }
    if oracle is not None:
        report["oracle"] = {
            "gain": oracle["gain"],
            "best": oracle["best"],
            "shares": oracle_shares(results, oracle, settings.experiments),
        }
    write_atomic(out / "results.json", json.dumps(report, indent=2) + "\n")
    write_plot(results, out / "research.png", settings)
    return report


def write_plot(results: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, settings: Settings) -> Path:
    """Best-so-far val_bpb against experiment: one line per session, one colour per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    for number, (name, sessions) in enumerate(results.items()):
        colour = COLOURS[number % len(COLOURS)]
        for i, session in enumerate(sessions):
            curve = session["best_so_far"]
            ax.step(
                range(len(curve)),
                curve,
                where="post",
                color=colour,
                alpha=0.8,
                linewidth=1.5,
                label=name if i == 0 else None,
            )
    budget = settings.budget or "default"
    ax.set_title(f"best val_bpb so far (budget {budget}, N = {settings.experiments})")
    ax.set_xlabel("experiment (0: the baseline)")
    ax.set_ylabel("best val_bpb (lower is better)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_report(report: Mapping[str, Any]) -> str:
    """The tables: one per arm (a row per session, then the arm's figures), then the gain ratios."""
    settings = report["settings"]
    lines = [
        f"research effectiveness: N = {settings['experiments']} experiments per session, "
        f"R = {settings['sessions']} sessions, budget {settings['budget'] or 'default'}, "
        f"seed {settings['seed']}, false keeps rerun with seeds {settings['rerun_seeds']}"
    ]
    header = (
        f"  {'session':>7} {'baseline':>9} {'best':>9} {'gain':>8} {'rerun':>8} {'keeps':>5} {'false':>5} "
        f"{'valid':>5} {'rej':>4} {'crash':>5} {'no-op':>5} {'prop med':>8} {'p90':>7} {'s/exp':>7}"
    )
    for name, arm in report["arms"].items():
        summary = arm["summary"]
        lines += ["", f"arm {name}", header]
        for s in arm["sessions"]:
            lines.append(
                f"  {s['index']:>7d} {s['baseline_bpb']:9.4f} {s['best_bpb']:9.4f} {s['gain']:8.4f} "
                f"{_num(s['rerun_gain']):>8s} {len(s['keeps']):5d} {len(s['false_keeps']):5d} {s['valid']:5d} "
                f"{s['rejected']:4d} {s['crashes']:5d} {len(s['noops']):5d} "
                f"{_num(statistics.median(s['proposal_seconds']) if s['proposal_seconds'] else None, 2):>8s} "
                f"{_num(percentile(s['proposal_seconds'], 0.9), 2):>7s} "
                f"{_num(s['seconds_per_experiment'], 1):>7s}"
            )
        gain, rerun, prop = summary["gain"], summary["rerun_gain"], summary["proposal_seconds"]
        share = summary["false_keep_share"]
        lines.append(
            f"  gain {_num(gain['mean'])} bpb (std {_num(gain['std'])}, {_num(gain['min'])} .. "
            f"{_num(gain['max'])} over {summary['sessions']} sessions); rerun gain {_num(rerun['mean'])}"
        )
        lines.append(
            f"  {summary['experiments']} experiments: {summary['keeps']} keeps ({summary['false_keeps']} false"
            f"{f', {share:.0%}' if share is not None else ''}), {summary['valid']} valid, {summary['rejected']} "
            f"rejected, {summary['crashes']} crashes, {summary['noops']} no-op runs"
        )
        lines.append(
            f"  seconds per proposal: median {_num(prop['median'], 2)}, p90 {_num(prop['p90'], 2)} "
            f"({prop['n']} proposals); per experiment {_num(summary['seconds_per_experiment'], 1)}"
        )
    ratios = report["gain_ratio_to_random"]
    if ratios:
        lines.append("")
    for name, ratio in ratios.items():
        if RANDOM not in report["arms"]:
            lines.append(f"gain ratio {name} / random: no random arm in these results")
        elif ratio is None:
            lines.append(f"gain ratio {name} / random: undefined (random search gained nothing)")
        else:
            lines.append(f"gain ratio {name} / random: {ratio:.2f}x")
    if "oracle" in report:
        oracle = report["oracle"]
        lines += [
            "",
            f"oracle gain {oracle['gain']:.4f} bpb ({oracle['best']['name']}); share of it found by:",
        ]
        for name, shares in oracle["shares"].items():
            shown = ", ".join(f"{_num(v, 2)} at {k}" for k, v in shares.items())
            lines.append(f"  {name}: {shown}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arms",
        default=f"{DEFAULT},{RANDOM}",
        help="comma-separated: default (the hybrid researcher), llm (the embedded model alone), hybrid:SHARE, "
        "random (random search), tpe, cmaes or cmaes:SIGMA0 (Optuna) or model names (default: default,random)",
    )
    parser.add_argument("-R", type=int, default=3, dest="sessions", help="sessions per arm (default 3)")
    parser.add_argument(
        "-N", type=int, default=8, dest="experiments", help="experiments per session (default 8)"
    )
    parser.add_argument("--budget", help="training budget of every run: 30 (wall s), 60cpu, 1e12flops")
    parser.add_argument("--out", type=Path, default=Path("bench-out/research"), help="results folder")
    parser.add_argument(
        "--oracle", type=Path, help="bench_oracle.py's oracle.json: each arm's gain as a share of its gain"
    )
    parser.add_argument("--seed", type=int, default=0, help="session i is seeded with SEED + i (default 0)")
    parser.add_argument("--seeds", type=int, help="baseline runs per session (default: the engine's)")
    parser.add_argument(
        "--source", type=Path, help="a folder shaped like nanogpt/ (default: the shipped one)"
    )
    parser.add_argument(
        "--program",
        type=Path,
        help="the program.md of every session (default: the shipped one); for ablations",
    )
    args = parser.parse_args(argv)
    try:
        if args.program is not None and not args.program.is_file():
            raise BenchError(f"--program {args.program}: no such file")
        if args.sessions < 1 or args.experiments < 1:
            raise BenchError("-R and -N must be at least 1")
        if args.seeds is not None and args.seeds < 1:
            raise BenchError("--seeds must be at least 1")
        budget = Budget.parse(args.budget).text if args.budget else None
        names = [n.strip() for n in args.arms.split(",") if n.strip()]
        if not names or len(set(names)) != len(names):
            raise BenchError(f"--arms {args.arms!r}: name each arm once")
        arms = [arm_named(name) for name in names]
        settings = Settings(args.experiments, budget, args.seed, args.seeds, args.source, args.program)
        oracle = read_oracle(args.oracle, settings) if args.oracle else None
        report = run_benchmark(arms, args.sessions, settings, args.out, oracle)
    except KeyboardInterrupt:
        return 130
    except (BenchError, WorkspaceError, ValueError) as exc:  # ModelError, a bad budget: ValueErrors
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'research.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
