"""Ray trainers on a real Ray cluster of this machine: 2 nodes with fake logical GPUs, every server on 127.0.0.1.

Runs use the fast contract-following harness (tests/engine_fakes.py) through the real runner, containment and
judge on each node: results as the fake computes them, log lines streamed while runs train, a stop that kills
the remote run, a node removed mid-run, and a local instance whose sockets are all loopback.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from engine_fakes import (
    BETTER,
    CRASHES,
    FAKE_TRAIN,
    MARGINAL,
    ROOT,
    WORSE,
    Recorder,
    alive,
    assert_consistent,
    idea,
    make_workspace,
    working_in,
    write_harness,
    write_ideas,
)

ray = pytest.importorskip("ray")  # installed by scripts/setup.sh: skipped only where Ray truly is absent

from ray.cluster_utils import Cluster  # noqa: E402

from agent.budget import Budget  # noqa: E402
from agent.commands import SetTrainers  # noqa: E402
from agent.config import EngineConfig  # noqa: E402
from agent.events import Decided, Event, Info, LogLine, RunFinished, StepMetric, Transferred  # noqa: E402
from agent.ledger import Ledger  # noqa: E402
from agent.researcher.ideas import IdeaQueue, parse_ideas  # noqa: E402
from agent.sandbox.spec import RunRequest, RunResult  # noqa: E402
from agent.session import open_engine  # noqa: E402
from agent.trainers.base import TrainerLost  # noqa: E402
from agent.trainers.ray import CANCEL_WAIT_S, RayTrainers, node_root  # noqa: E402
from agent.trainers.ray_internals import loopback_only  # noqa: E402

LOOPBACK = "127.0.0.1"
_FAST_FAILURE_DETECTION = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 4,
}


def _train(learning_rate: float = 1.0, sleep: float = 0.0) -> bytes:
    """The fake train.py with its learning rate set; says its GPU and pid, then sleeps `sleep` seconds."""
    extra = (
        "CRASH = False\nimport time\n"
        "print('gpu', os.environ.get('CUDA_VISIBLE_DEVICES'), 'pid', os.getpid(), flush=True)\n"
        f"time.sleep({sleep})\n"
    )
    text = FAKE_TRAIN.replace("LEARNING_RATE = 1.0", f"LEARNING_RATE = {learning_rate}")
    return text.replace("CRASH = False\n", extra, 1).encode()


def _expected(learning_rate: float, seed: int) -> float:
    """What the fake harness computes for the untouched constants (EXTRA 0, WOBBLE 1e-4)."""
    return round(2.0 + abs(learning_rate - 0.5) + 0.0001 * (seed % 3), 6)


class Arrivals:
    """An EventSink that keeps each event with the time it reached the driver."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[float, Event]] = []
        self.hooks: list = []

    def __call__(self, event: Event) -> None:
        with self.lock:
            self.events.append((time.monotonic(), event))
        for hook in self.hooks:
            hook(event)

    def of(self, kind: type, exp_id: int) -> list[tuple[float, Any]]:
        with self.lock:
            return [(t, e) for t, e in self.events if isinstance(e, kind) and _exp(e) == exp_id]


def _exp(event: Event) -> int | None:
    if isinstance(event, LogLine | StepMetric):
        return event.exp_id
    if isinstance(event, Info) and (match := re.match(r"\[ray\] #(\d+) ", event.message)):
        return int(match.group(1))
    return None


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def cluster_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The AUTORESEARCH_HOME of the cluster's nodes (a node's environment is the one it was started with)."""
    return tmp_path_factory.mktemp("ray-home")


@pytest.fixture(scope="module")
def cluster(cluster_home: Path) -> Iterator[Cluster]:
    """Two Ray nodes on this machine, 2 CPUs and 2 fake GPUs each, bound to 127.0.0.1; started with SIGINT
    ignored, as the nodes of a driver run in the background by a script are (`nohup autoresearch run ... &`):
    Ray's cancel raises KeyboardInterrupt in the task's worker as a SIGINT would, and a stop must reach the run
    even where that does nothing."""
    home = cluster_home
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTORESEARCH_HOME", str(home))
        patch.setenv("AUTORESEARCH_CACHE", str(home / "cache"))
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        patch.setenv("OMP_WAIT_POLICY", "PASSIVE")
        node: dict[str, Any] = {"node_ip_address": LOOPBACK, "num_cpus": 2, "num_gpus": 2}
        # Loopback only: what RayTrainers("local") does (see its docstring).
        with loopback_only(), _sigint_ignored():
            made = Cluster(
                initialize_head=True,
                head_node_args={
                    **node,
                    "include_dashboard": False,
                    "_system_config": _FAST_FAILURE_DETECTION,
                },
            )
            made.add_node(**node)
        try:
            made.wait_for_nodes()
            yield made
        finally:
            made.shutdown()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    folder = tmp_path / "ws"
    folder.mkdir()
    (folder / "train.py").write_text(FAKE_TRAIN)
    write_harness(folder)
    return folder


def _request(workspace: Path, exp_id: int, train: bytes, seed: int = 1) -> RunRequest:
    log_path = workspace.parent / "runs" / str(exp_id) / "run.log"
    return RunRequest(exp_id, 0, seed, train.decode(), Budget.parse("600"), log_path)


def _ray(address: str, trainers: int, device: str, workspace: Path, **options: Any) -> RayTrainers:
    """Ray trainers for the test workspace's harness; each run's deadline is 60 s."""
    config = EngineConfig(deadline_s=60.0, python=sys.executable)
    return RayTrainers(address, trainers, device, harness=workspace, config=config, **options)


def test_parallel_runs_on_two_nodes_stream_and_score(cluster: Cluster, workspace: Path) -> None:
    trainers = _ray(cluster.address, 4, "cuda", workspace)
    try:
        assert trainers.description.startswith("4 Ray trainers (at ") and LOOPBACK in trainers.description
        sink = Arrivals()
        rates = {1: 0.1, 2: 0.3, 3: 0.7, 4: 0.9}
        results: dict[int, RunResult] = {}
        returned: dict[int, float] = {}

        def one(exp_id: int) -> None:
            request = _request(workspace, exp_id, _train(rates[exp_id], sleep=6.0), seed=exp_id)
            results[exp_id] = trainers.run(exp_id - 1, request, sink, threading.Event(), None)
            returned[exp_id] = time.monotonic()

        threads = [threading.Thread(target=one, args=(exp_id,)) for exp_id in rates]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=150)
        assert sorted(results) == [1, 2, 3, 4]
        placements = set()
        for exp_id, rate in rates.items():
            result = results[exp_id]
            assert (result.outcome, result.reason) == ("ok", "")
            assert result.val_bpb == pytest.approx(_expected(rate, exp_id), abs=1e-9)
            assert result.log_path == workspace.parent / "runs" / str(exp_id) / "run.log"
            log = result.log_path.read_text()
            assert f"val_bpb:          {_expected(rate, exp_id):.6f}" in log and "step     2" in log
            assert [e.step for _, e in sink.of(StepMetric, exp_id)] == [0, 1, 2]
            lines = sink.of(LogLine, exp_id)
            gpu_line = next(e.text for _, e in lines if e.text.startswith("gpu "))
            assert gpu_line in log
            # Streamed while the run trained: its first line came well before the run returned (it slept 6 s).
            assert returned[exp_id] - lines[0][0] > 4.0
            info = next(e.message for _, e in sink.of(Info, exp_id))
            node, gpu = re.match(r"\[ray\] #\d+ trains on node (\w+), GPU (\d+);", info).groups()  # type: ignore[union-attr]
            assert gpu_line.split()[1] == gpu  # the run sees the GPU Ray gave its task, and no other
            placements.add((node, gpu))
        # All four ran at once (each one's first line arrived before any returned), on 2 nodes x 2 GPUs.
        first_lines = [sink.of(LogLine, exp_id)[0][0] for exp_id in rates]
        assert max(first_lines) < min(returned.values())
        assert len(placements) == 4 and len({node for node, _ in placements}) == 2
    finally:
        trainers.close()


def test_stop_interrupts_the_remote_run(
    cluster: Cluster, cluster_home: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainers = _ray(cluster.address, 1, "cpu", workspace)
    try:
        sink = Arrivals()
        stop = threading.Event()
        stopped_at: list[float] = []

        def stop_once_it_trains(event: Event) -> None:
            if isinstance(event, LogLine) and event.text.startswith("gpu ") and not stop.is_set():
                stopped_at.append(time.monotonic())
                stop.set()

        sink.hooks.append(stop_once_it_trains)
        result = trainers.run(0, _request(workspace, 9, _train(sleep=120.0)), sink, stop, None)
        assert stop.is_set()
        assert (result.outcome, result.val_bpb, result.reason) == ("interrupted", None, "stopped by the user")
        took = time.monotonic() - stopped_at[0]
        assert "gpu None pid" in result.log_path.read_text()  # the lines streamed before the stop
        # The runner on the node killed the run and removed its folder (it does so only after the kill).
        monkeypatch.setenv("AUTORESEARCH_HOME", str(cluster_home))  # where the nodes keep their folders
        scratch = node_root() / "scratch"
        deadline = time.monotonic() + 30
        while scratch.is_dir() and any(scratch.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert scratch.is_dir() and not any(scratch.iterdir())
        # The node honoured the cancel (~1 s; the start is not timed: the machine is shared). Had the cancel not
        # reached the task (SIGINT ignored in its worker), the driver would give up waiting after CANCEL_WAIT_S
        # and the node would kill the run only at its 60 s deadline.
        assert took < CANCEL_WAIT_S, f"the stop returned {took:.0f} s after it was asked"
    finally:
        trainers.close()


def test_a_node_lost_mid_run_raises_trainer_lost(cluster: Cluster, workspace: Path) -> None:
    with loopback_only():
        victim = cluster.add_node(node_ip_address=LOOPBACK, num_cpus=1, num_gpus=1, resources={"victim": 1})
    trainers = _ray(cluster.address, 1, "cuda", workspace, resources={"victim": 1}, containment_level="none")
    pid: list[int] = []
    try:
        sink = Arrivals()
        running = threading.Event()

        def seen(event: Event) -> None:
            if isinstance(event, LogLine) and event.text.startswith("gpu "):
                pid.append(int(event.text.split()[-1]))
                running.set()

        sink.hooks.append(seen)
        outcome: dict[str, object] = {}

        def train() -> None:
            try:
                outcome["result"] = trainers.run(
                    0, _request(workspace, 5, _train(sleep=60.0)), sink, threading.Event(), None
                )
            except TrainerLost as exc:
                outcome["lost"] = exc

        thread = threading.Thread(target=train)
        thread.start()
        assert running.wait(90), "the run never started on the victim node"
        cluster.remove_node(victim, allow_graceful=False)
        thread.join(timeout=90)
        assert not thread.is_alive(), "run() did not notice the node had gone"
        lost = outcome.get("lost")
        assert isinstance(lost, TrainerLost), outcome
        assert lost.system_retries == 0 and "went away" in lost.reason
        assert "gpu 0 pid" in (workspace.parent / "runs" / "5" / "run.log").read_text()
        # The run went with its node's worker (as it would with a machine really lost), not at its deadline.
        deadline = time.monotonic() + 15
        while alive(pid[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(pid[0]), "the run trains on without its node"
    finally:
        trainers.close()
        for leftover in pid:
            with contextlib.suppress(psutil.Error):
                psutil.Process(leftover).kill()


def test_a_cluster_that_cannot_take_a_run_is_refused(cluster: Cluster) -> None:
    with pytest.raises(
        RuntimeError, match=r"no Ray node can take a run: each run needs trainer 1 \(the cluster has 0\)"
    ):
        _ray(cluster.address, 1, "cuda", Path("."), resources={"trainer": 1})
    assert not ray.is_initialized()  # disconnected again: the next RayTrainers may start


def _non_loopback(pids: set[int]) -> list[str]:
    """Sockets of `pids` that listen on, or talk to, anything but loopback."""
    bad = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.pid not in pids:
            continue
        for addr in (conn.laddr, conn.raddr):
            if addr and not ipaddress.ip_address(addr.ip.removeprefix("::ffff:")).is_loopback:
                bad.append(f"pid {conn.pid} {conn.status} {conn.laddr} -> {conn.raddr}")
    return bad


def test_local_ray_binds_only_loopback_and_shuts_down(cluster: Cluster, workspace: Path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    trainers = _ray("local", 2, "cpu", workspace)
    try:
        assert trainers.description == "2 Ray trainers (local, 127.0.0.1)"
        assert os.environ.get("RAY_AUTH_MODE") == "token"  # every client of the instance needs its token
        result = trainers.run(0, _request(workspace, 3, _train(0.6)), Arrivals(), threading.Event(), None)
        assert (result.outcome, result.val_bpb) == ("ok", _expected(0.6, 1))
        ours = {p.pid for p in psutil.Process().children(recursive=True)}
        started = ours - before
        assert started, "the local instance started no process"
        # Every socket of the local instance and of the test cluster: loopback only, listening or connected.
        assert _non_loopback(ours) == []
    finally:
        trainers.close()
    deadline = time.monotonic() + 30
    while [p for p in started if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [p for p in started if alive(p)] == [], "close() left the local instance's processes running"


def test_engine_with_two_local_ray_trainers_records_every_result_once(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    ideas = IdeaQueue(
        parse_ideas("".join(json.dumps(i) + "\n" for i in (BETTER, WORSE, CRASHES, MARGINAL)), Path("i"))
    )
    events = Recorder()
    config = EngineConfig(seeds=2, deadline_s=60.0, trainers=2, ray="local", promote=(2.0,))
    engine = open_engine(ws, ideas, config, events)
    engine.run()
    assert engine.error is None
    assert any(e.message == "training on 2 Ray trainers (local, 127.0.0.1)" for e in events.of(Info))
    ledger = assert_consistent(ws)  # branch, refs and results.tsv agree with the ledger
    experiments = ledger.experiments()
    assert [e.id for e in experiments] == [0, 1, 2, 3, 4]
    status = {e.description: e.status for e in experiments}
    assert status[str(BETTER["description"])] == "keep" and status[str(CRASHES["description"])] == "crash"
    assert status[str(WORSE["description"])] == "discard"
    # Every run recorded once, with the outcome the engine was told; the kept one scored as the fake computes.
    finished = [(e.exp_id, e.outcome) for e in events.of(RunFinished) if not e.promotion]
    recorded = [(e.id, r.outcome) for e in experiments for r in ledger.runs(e.id)]
    assert sorted(finished) == sorted(recorded) and all(outcome for _, outcome in recorded)
    kept = next(e for e in experiments if e.status == "keep")
    assert kept.val_bpb == pytest.approx(2.1, abs=0.001)
    # Promotion is trainer work like any run: on the cluster, the baseline's seeds at once, each measured once.
    promoted = ledger.promotions()
    assert all(r.outcome == "ok" and r.budget == "120" for r in promoted)
    assert len({(r.code_hash, r.seed) for r in promoted}) == len(promoted)
    keeps = [e.id for e in experiments if e.status == "keep"]  # the marginal one may be kept too
    assert {(r.exp_id, r.seed) for r in promoted} >= {(0, 3), (0, 4), *((k, 3) for k in keeps)}
    marks = events.of(Transferred)[-1].marks
    assert set(marks) == set(keeps) and marks[kept.id] == "✓"
    assert any(isinstance(e, LogLine) and e.text.startswith("step ") for e in events.events)
    # The node keeps the whole frozen harness the driver shipped, hash checked, under one folder per harness.
    [shipped] = (node_root() / "harness").iterdir()
    assert {p.name: p.read_text() for p in shipped.iterdir()} == {
        name: (ws.path / name).read_text() for name in ("prepare.py", "corpus.py", "metric.py")
    }


def test_an_engine_switches_from_this_machine_to_local_ray_mid_session(tmp_path: Path) -> None:
    """As the cockpit's 'Trainers and Ray' does: the baseline trains here, the experiments as Ray tasks."""
    ws = make_workspace(tmp_path)
    ideas = IdeaQueue(parse_ideas("".join(json.dumps(i) + "\n" for i in (BETTER, WORSE)), Path("i")))
    events = Recorder()
    engine = open_engine(ws, ideas, EngineConfig(seeds=2, deadline_s=60.0, trainers=1), events)
    events.hooks.append(
        lambda e: engine.send(SetTrainers(2, "local")) if isinstance(e, Decided) and e.exp_id == 0 else None
    )
    engine.run()
    assert engine.error is None
    infos = [e.message for e in events.of(Info)]
    here, there = (
        infos.index("training on 1 local trainer"),
        infos.index("training on 2 Ray trainers (local, 127.0.0.1)"),
    )
    assert here < there
    on_ray = {int(m.split("#")[1].split()[0]) for m in infos[there:] if m.startswith("[ray] #")}
    assert on_ray == {1, 2} and not any(m.startswith("[ray] #0") for m in infos)
    assert engine.snapshot().trainers == 2 and engine.snapshot().ray == "local"
    ledger = assert_consistent(ws)
    assert [e.status for e in ledger.experiments()] == ["baseline", "keep", "discard"]


@pytest.mark.slow
def test_kill_9_of_the_driver_with_a_ray_run_in_flight_then_resume(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    slow = idea("a slow run", "CRASH = False", "CRASH = False\nimport time\ntime.sleep(8)")
    ideas = write_ideas(tmp_path / "ideas.jsonl", [BETTER, slow])
    args = ["run", "--headless", "--workspace", str(ws.path), "--ideas", str(ideas), "--seeds", "2"]
    args += ["--trainers", "2", "--ray", "local"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AUTORESEARCH_CONTAINMENT": "none"}  # cwd seen from here
    # The driver kills itself with -9 at the slow idea's (#2) first line streamed from its Ray node.
    crashing = {**env, "AUTORESEARCH_CRASH_AT": "during_run:2"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=ROOT,
        env=crashing,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    scratch = node_root() / "scratch"
    try:
        driver.wait(timeout=180)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == -signal.SIGKILL, driver.stderr.read() if driver.stderr else None
    # The run went with the driver (and its Ray instance): nothing trains on in its folder.
    deadline = time.monotonic() + 30
    while working_in(scratch) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert working_in(scratch) == []
    ledger = Ledger(ws.ledger_path)
    assert [r.outcome for r in ledger.runs(2)] == [None]  # killed while #2 trained
    ledger.close()
    resumed = subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, (resumed.stdout, resumed.stderr)
    ledger = assert_consistent(ws)
    experiments = ledger.experiments()
    assert [e.description for e in experiments if e.status == "keep"] == [BETTER["description"]]
    assert [e.status for e in experiments if e.description == "a slow run"][-1] == "discard"
    assert ledger.queued() == [] and all(r.outcome for e in experiments for r in ledger.runs(e.id))
    assert not list(scratch.glob("*")), "the killed run's folder was not swept"
