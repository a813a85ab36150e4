"""No wasted runs: probes of the real train.py on the real harness (contained, judged by the warm judge) whose
fingerprints tell a no-op from a one-ulp change, and a crash in seconds (agent/sandbox/probe.py; the static
check: test_static_noop)."""

from __future__ import annotations

import hashlib
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from engine_fakes import working_in, write_harness

from agent.budget import Budget
from agent.config import EngineConfig
from agent.sandbox import probe as probe_module
from agent.sandbox.containment import in_sight
from agent.sandbox.containment import probe as containment_probe
from agent.sandbox.judging import WarmJudge, judged, prepare_for_runs
from agent.sandbox.probe import (
    PROBE_STEPS,
    Probe,
    ProbeCache,
    probe,
    probe_key,
    same_computation,
)
from agent.sandbox.process import scrub_environment
from agent.sandbox.runner import run_training
from agent.sandbox.sandbox import PROBE_GRACE_S, PROBE_MIN_DEADLINE_S, Sandbox
from agent.sandbox.spec import ProbeParent, RunRequest, RunSpec
from agent.static_noop import static_noop

NANOGPT = Path(__file__).resolve().parent.parent / "nanogpt"
TRAIN = (NANOGPT / "train.py").read_text()
sys.path.insert(0, str(NANOGPT))

import metric  # noqa: E402
import prepare  # noqa: E402


def edited(old: str, new: str, text: str = TRAIN) -> str:
    assert text.count(old) == 1, f"{old!r} is not in nanogpt/train.py once any more"
    return text.replace(old, new)


# ---- the harness's probe mode and fingerprint -------------------------------------------------------------


def test_a_probe_budget_samples_the_schedule_by_steps_and_only_ends_a_run_sooner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The clock starts now, as the runner's would (without it: when prepare was imported, maybe minutes ago).
    monkeypatch.setenv("AUTORESEARCH_CLOCK_START", f"{time.time():.6f}")
    budget = prepare.Budget(prepare.BudgetSpec("time", 60.0), probe_steps=4)
    optimizer, other = object(), object()
    seen = []
    while not budget.done():
        seen.append(budget.fraction())
        budget.on_batch(10)
        budget.on_optimizer_step(optimizer)
        budget.on_optimizer_step(other)  # a second optimizer in the same step is the same step
    assert seen == [0.0, pytest.approx(1 / 3), pytest.approx(2 / 3), pytest.approx(1.0, abs=1e-5)]
    assert seen[-1] < 1.0 and budget.fraction() == 1.0 and budget.steps == 4
    long = prepare.Budget(prepare.BudgetSpec("time", 1.0), probe_steps=10**9)
    long.origin -= 2.0  # the run's own budget is spent
    assert long.done()
    stopped = prepare.Budget(prepare.BudgetSpec("time", 60.0), probe_steps=10**9)
    stopped.request_stop()
    assert stopped.done()
    no_optimizer = prepare.Budget(prepare.BudgetSpec("time", 60.0), probe_steps=2)
    no_optimizer.on_batch(10)
    no_optimizer.on_batch(10)
    assert no_optimizer.done()  # batches served count when no torch optimizer ever stepped


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(256, 8)
        self.head = torch.nn.Linear(8, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(idx))


def test_the_judge_fingerprints_a_probe_bit_for_bit_and_never_scores_it(tmp_path: Path) -> None:
    prepare.prepare()
    model = _Tiny()

    def verdict(name: str, claims: dict[str, object]) -> dict[str, object]:
        prepare.export_model(model, 16, "cpu", tmp_path / name)
        return metric.judge(tmp_path / name, claims)

    claims = {"probe_steps": 2, "probe_steps_done": 2}
    first, again = verdict("a.pt2", claims), verdict("b.pt2", claims)
    assert first["status"] == "probe" and first["val_bpb"] is None and first["block_size"] == 16
    assert isinstance(first["fingerprint"], str) and len(first["fingerprint"]) == 64
    assert again["fingerprint"] == first["fingerprint"]
    assert judged(first).outcome == "invalid"  # a run that claims to be a probe only loses its score
    with torch.no_grad():
        weight = model.head.bias
        weight[0] = torch.nextafter(weight[0], torch.tensor(1.0))  # one ulp of one weight
    assert verdict("c.pt2", claims)["fingerprint"] != first["fingerprint"]
    short = verdict("d.pt2", {"probe_steps": 2, "probe_steps_done": 1})
    assert short["fingerprint"] is None and "after 1 of 2 steps" in str(short["reason"])


# ---- probes on the real harness ------------------------------------------------------------------------------


@dataclass
class Lab:
    """A workspace of the real nanogpt sandbox, its prepared data, a warm judge and the parent's probe."""

    workspace: Path
    root: Path
    base: RunSpec
    judge: WarmJudge
    parent: Probe
    runs: int = 0

    def spec(self, text: str) -> RunSpec:
        self.runs += 1
        return replace(
            self.base,
            scratch=self.root / "scratch" / f"probe-{self.runs}",
            exp_id=self.runs,
            log_path=self.root / "runs" / f"{self.runs}.log",
            train_source=text.encode(),
        )

    def probe(self, text: str) -> Probe:
        return probe(self.spec(text), containment=containment_probe(), judge=self.judge)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("noop")
    workspace = root / "ws"
    workspace.mkdir()
    for name in ("prepare.py", "corpus.py", "metric.py", "train.py"):
        shutil.copy(NANOGPT / name, workspace / name)
    hashes = {
        name: hashlib.sha256((workspace / name).read_bytes()).hexdigest()
        for name in ("prepare.py", "corpus.py", "metric.py")
    }
    env = {"AUTORESEARCH_CACHE": str(shared_cache)}
    containment = containment_probe()
    prepared = prepare_for_runs(
        workspace,
        root / "scratch",
        python=sys.executable,
        env=env,
        containment=containment,
        emit=lambda e: None,
        harness_hashes=hashes,
    )
    base = RunSpec(
        workspace=workspace,
        scratch=root / "scratch" / "probe-0",
        exp_id=0,
        seed=1,
        log_path=root / "runs" / "0.log",
        deadline_s=180.0,
        budget=Budget.parse("60"),
        hidden=prepared.hidden,
        readable=prepared.readable,
        harness_hashes=hashes,
        python=sys.executable,
        env={**env, "AUTORESEARCH_DATA": str(prepared.data)},
        visible=in_sight(sys.executable),
    )
    judge = WarmJudge(
        workspace,
        root / "scratch" / "judge",
        python=sys.executable,
        env=env,
        containment=containment,
        readable=(shared_cache,),
        harness_hashes=hashes,
    )
    try:
        bench = Lab(workspace, root, base, judge, parent=Probe("", None, "", 0.0, 0))
        bench.parent = bench.probe(TRAIN)
        assert bench.parent.outcome == "ok", bench.parent.log_tail
        yield bench
    finally:
        judge.close()


def test_a_real_noop_is_the_same_computation_as_its_parent(lab: Lab) -> None:
    """LOG_EVERY is read by the loop, so the static check cannot drop it; the probe shows no number moves."""
    candidate = edited("LOG_EVERY = 25", "LOG_EVERY = 50")
    assert static_noop(TRAIN, candidate) is None
    found = lab.probe(candidate)
    assert (found.outcome, found.steps, found.fingerprint) == ("ok", PROBE_STEPS, lab.parent.fingerprint)
    assert (
        same_computation(lab.parent, found, 3)
        == f"no-op: same computation as #3 in {PROBE_STEPS} probe steps"
    )
    assert f"step {PROBE_STEPS:5d}" in found.log_path.read_text()  # it trained its steps, then stopped


def test_a_one_ulp_change_of_the_learning_rate_is_seen_bit_for_bit(lab: Lab) -> None:
    """One float32 ulp of LEARNING_RATE changes the fingerprint. One float64 ulp does not, and that is true:
    the optimizer applies the rate to float32 weights, where both values round to the same number."""
    float32_ulp = lab.probe(edited("LEARNING_RATE = 2e-3", "LEARNING_RATE = 2e-3 * (1 + 2**-23)"))
    assert float32_ulp.outcome == "ok" and float32_ulp.fingerprint != lab.parent.fingerprint
    assert same_computation(lab.parent, float32_ulp, 0) is None
    float64_ulp = lab.probe(edited("LEARNING_RATE = 2e-3", "LEARNING_RATE = 2e-3 * (1 + 2**-52)"))
    assert float64_ulp.outcome == "ok" and float64_ulp.fingerprint == lab.parent.fingerprint


def test_a_shape_error_is_caught_by_the_probe_in_seconds(lab: Lab) -> None:
    candidate = edited(
        "self.down = nn.Linear(4 * N_EMBD, N_EMBD, bias=False)",
        "self.down = nn.Linear(4 * N_EMBD, 2 * N_EMBD, bias=False)",
    )
    started = time.monotonic()
    found = lab.probe(candidate)
    assert found.outcome == "crash" and found.settles and found.fingerprint is None
    assert "RuntimeError: The size of tensor a (128) must match the size of tensor b (256)" in found.reason
    assert found.seconds <= time.monotonic() - started < 60.0  # well under one run of the 60 s default budget
    assert found.log_path is not None and "Traceback" in found.log_path.read_text()  # the log is kept
    assert same_computation(lab.parent, found, 0) is None


def test_a_run_that_makes_itself_a_probe_only_loses_its_score(lab: Lab) -> None:
    """Probe mode comes from the runner's environment (the engine's own never reaches a run); a train.py that
    sets it itself stops sooner and is fingerprinted, never scored."""
    assert scrub_environment({"AUTORESEARCH_PROBE_STEPS": "2", "PATH": "/bin"}) == {"PATH": "/bin"}
    forged = "import os\nos.environ['AUTORESEARCH_PROBE_STEPS'] = '1'\n" + TRAIN
    result = run_training(lab.spec(forged), lambda e: None, containment=containment_probe(), judge=lab.judge)
    assert (result.outcome, result.val_bpb) == ("invalid", None)
    assert "fingerprinted, never scored" in result.reason


def test_only_a_crash_of_the_code_settles_an_experiment() -> None:
    crash = Probe("crash", None, "exit code 1: NameError: name 'x' is not defined", 3.0, PROBE_STEPS)
    assert crash.settles
    assert not replace(crash, reason="the run's containment could not be set up: unshare failed").settles
    assert not replace(crash, outcome="nan").settles  # the probe samples the schedule's peak; a run warms up
    assert not replace(crash, outcome="oom").settles and not replace(crash, outcome="timeout").settles


def test_a_workspace_whose_harness_predates_probes_is_not_probed(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    write_harness(workspace)  # a prepare.py without PROBE_STEPS_ENV
    (workspace / "train.py").write_text("raise SystemExit('a probe must not run this')\n")
    spec = RunSpec(
        workspace,
        tmp_path / "scratch",
        1,
        1,
        tmp_path / "run.log",
        10.0,
        Budget.parse("60"),
        python=sys.executable,
    )
    found = probe(spec)
    assert (found.outcome, found.fingerprint, found.seconds) == ("unsupported", None, 0.0)
    assert "predates probes" in found.reason and not spec.log_path.exists()


# ---- the parent's probe, once ------------------------------------------------------------------------------


def test_probe_key_names_what_a_fingerprint_depends_on(tmp_path: Path) -> None:
    spec = RunSpec(
        tmp_path, tmp_path / "s", 1, 1, tmp_path / "l", 10.0, Budget.parse("60"), train_source=b"A = 1\n"
    )
    assert probe_key(spec) == probe_key(replace(spec, exp_id=2, scratch=tmp_path / "t"))
    for other in (
        replace(spec, train_source=b"A = 2\n"),
        replace(spec, seed=2),
        replace(spec, budget=Budget.parse("30")),
        replace(spec, harness_hashes={"prepare.py": "0" * 64, "metric.py": "1" * 64}),
        replace(spec, env={"AUTORESEARCH_VOCAB": "8192"}),
    ):
        assert probe_key(other) != probe_key(spec)
    assert probe_key(spec, steps=2) != probe_key(spec)


def test_the_cache_probes_a_parent_once_even_when_two_slots_ask_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = ProbeCache(size=2)
    waiting = threading.Event()
    """Set when an asker waits for another's probe of the same key: the first probe ends only then, so both
    askers are in at once (no sleep: a second asker that came late would find the probe cached anyway)."""

    class WatchedLock:
        """The cache's per-key lock, saying when a second asker has to wait for it."""

        def __init__(self) -> None:
            self.lock = threading.Lock()

        def __enter__(self) -> WatchedLock:
            if not self.lock.acquire(blocking=False):
                waiting.set()
                self.lock.acquire()
            return self

        def __exit__(self, *exc: object) -> None:
            self.lock.release()

    monkeypatch.setattr(probe_module, "threading", SimpleNamespace(Lock=WatchedLock))  # the key locks only
    calls: list[str] = []

    def run(key: str, fingerprint: str | None = "f") -> Probe:
        calls.append(key)
        if len(calls) == 1:
            waiting.wait(10)  # a cache that let both probe would never get here twice in time
        return Probe("ok" if fingerprint else "timeout", fingerprint, "", 1.0, PROBE_STEPS)

    got: list[Probe] = []
    barrier = threading.Barrier(2)

    def ask() -> None:
        barrier.wait(10)
        got.append(cache.get("a", lambda: run("a")))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert waiting.is_set(), "the second asker never waited for the first's probe"
    assert calls == ["a"] and got[0] is got[1]
    assert cache.get("b", lambda: run("b", None)).outcome == "timeout"
    assert cache.get("b", lambda: run("b")).fingerprint == "f"  # a failed probe is not kept
    cache.get("c", lambda: run("c"))
    cache.get("a", lambda: run("a"))  # evicted by b and c (size 2): probed again
    assert calls == ["a", "b", "b", "c", "a"]


HANGS = {
    "spin": "while True:\n    pass\n",
    "sleep": "import time\ntime.sleep(10_000)\n",
    "flood": "while True:\n    print('x' * 4096, flush=True)\n",
    "orphans": (
        "import subprocess, sys, time\n"
        "for _ in range(3):\n"
        "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(10_000)'], start_new_session=True)\n"
        "time.sleep(10_000)\n"
    ),
}
"""Candidates that never train: each line goes before the real train.py."""


def lab_sandbox(lab: Lab, tmp_path: Path) -> Sandbox:
    """A sandbox on the lab's real harness, probing, with a cold judge."""
    return Sandbox(
        harness=lab.workspace,
        harness_hashes=lab.base.harness_hashes,
        scratch_root=tmp_path / "scratch",
        config=EngineConfig(probe=True, warm_judge=False),
        env={},
        emit=lambda event: None,
    )


@pytest.mark.parametrize("case", sorted(HANGS))
def test_a_hanging_candidate_costs_one_probe_deadline_not_a_run(lab: Lab, tmp_path: Path, case: str) -> None:
    """Its probe's steps must fit in the run's budget: one that spins, sleeps, floods its output or waits on
    children is settled as a timeout there, and no run follows (it used to wait for the run's own deadline, then
    train to a second one: minutes for a budget of seconds)."""
    sandbox = lab_sandbox(lab, tmp_path)
    sandbox.prepared()  # the data prepared first, as an engine's first run does: not the candidate's time
    budget = Budget.parse("2e11flops")  # ~4 s by the engine's estimate; the run's deadline is 102 s
    log_path = tmp_path / "runs" / "run.log"
    request = RunRequest(1, 0, 1, HANGS[case] + TRAIN, budget, log_path, probe_against=ProbeParent(0, TRAIN))
    started = time.monotonic()
    result = sandbox.run(request, lambda event: None, threading.Event())
    took = time.monotonic() - started
    assert (result.outcome, result.val_bpb) == ("timeout", None), result.reason
    assert (
        result.reason.startswith(f"in a probe of {PROBE_STEPS} steps: ") and "probe_steps" in result.summary
    )
    assert not log_path.exists(), "a run followed the probe"
    assert sandbox.probe_deadline(request) == PROBE_MIN_DEADLINE_S < sandbox.deadline(request)
    assert took < budget.estimate_seconds()[0] + PROBE_GRACE_S + 15.0  # the kill's grace, on a busy machine
    assert working_in(tmp_path) == []  # nothing of it left running


def test_a_trial_tells_the_proposer_the_crash_and_spares_the_run_its_probe(lab: Lab, tmp_path: Path) -> None:
    """A proposer's trial is the probe the candidate's first run would start with: an invented torch function
    comes back as its traceback's last lines (its parent, probed once, trains); a candidate that trains is kept
    in the probe cache, so its run does not probe it again (here it is a no-op, settled from the trial's probe
    and its parent's)."""
    sandbox = lab_sandbox(lab, tmp_path)
    budget = Budget.parse("60")

    def request(text: str, log: str) -> RunRequest:
        return RunRequest(1, 0, 1, text, budget, tmp_path / "runs" / log, probe_against=ProbeParent(0, TRAIN))

    invented = request(edited("F.gelu(", "F.relu_squared("), "invented.log")
    crashed = sandbox.trial(invented, threading.Event())
    assert crashed.settles
    lines = crashed.crash_lines()
    assert "AttributeError" in lines and "relu_squared" in lines and len(lines.splitlines()) <= 8

    noop = edited("LOG_EVERY = 25", "LOG_EVERY = 50")
    tried = sandbox.trial(request(noop, "tried.log"), threading.Event())
    assert tried.outcome == "ok" and tried.fingerprint is not None
    run = request(noop, "run.log")
    result = sandbox.run(run, lambda event: None, threading.Event())
    assert (result.outcome, result.log_path) == ("noop", tmp_path / "runs" / "tried.log"), result.reason
    assert not (tmp_path / "runs" / "run.probe.log").exists()  # the candidate was not probed again ...
    # ... nor its parent: probed once, when the first trial crashed (a crash counts where the parent trains).
    assert (tmp_path / "runs" / "parent.log").exists()
    assert not (tmp_path / "runs" / "run.parent-probe.log").exists()
