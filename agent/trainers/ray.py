"""Trainers on a Ray cluster: each run is a Ray task that builds the same `Sandbox` on the node it lands on.

`RayTrainers(address, trainers, device, harness=..., ...)` implements `agent.trainers.base.Trainer`. `address`
is "local" (a Ray instance started in this process, every server bound to 127.0.0.1, dashboard and usage stats
off), or Ray's own "auto" or a cluster ADDRESS. Each run ships the engine's `RunRequest` (the candidate's
train.py among it), the workspace's frozen harness (prepare.py, corpus.py, metric.py; hashes checked on the driver)
and the run settings with the task; on the node the harness is written to a node-local folder and a `Sandbox`
made of that node's facts (its containment, memory, device; the data prepared once per node and harness,
behind a file lock) trains and judges as on this machine. Log lines, step metrics and the node's info lines
stream back to the driver while the run trains (a Ray streaming generator, batched, bounded); the driver
writes the run's log at the request's `log_path` and gets the RunResult. Ledger and git never leave the
driver, and the driver prepares no data.

Failures: the user's code crashing is an outcome of the run (the runner's), never retried. A worker or node lost
before the run started is retried here (`max_retries`, counted); lost once it had started, `run` raises
`TrainerLost` (the engine records the run interrupted and re-queues the experiment). Ray's own task retries are
off: a retried streaming task replays into the same stream (items deduplicated by index), which would splice two
runs' logs and results. `stop` cancels the task: Ray raises KeyboardInterrupt in it, which sets the runner's stop
event on the node (the run's process group is killed there), and `run` returns outcome "interrupted".

This module and `ray_internals` (Ray's private parts) are the only ones that import `ray`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import ray
import ray.exceptions

from agent import paths
from agent.config import EngineConfig
from agent.events import Event, EventSink, Info, LogLine, first_line
from agent.sandbox.containment import LEVELS
from agent.sandbox.handover import HarnessChanged, frozen_harness, read_regular
from agent.sandbox.judging import Prepared, prepare_for_runs
from agent.sandbox.process import kill_stale_run, remove_tree
from agent.sandbox.sandbox import Sandbox
from agent.sandbox.spec import Outcome, PrepareError, RunRequest, RunResult
from agent.trainers.base import TrainerLost
from agent.trainers.ray_internals import (
    LOOPBACK,
    TOKEN,
    cluster_address,
    is_loopback,
    loopback_only,
    quiet_token_notice,
)

LOCAL = "local"
OBJECT_STORE_MB = 200
"""Object store of a local instance: runs ship a few MB at most (sources, log batches, the log)."""
EVENT_BATCH_S = 0.25
"""How often a node sends the events it has gathered."""
MAX_PENDING_EVENTS = 20_000
"""Events a node holds for the driver at most; past it log lines are counted, not sent (run.log keeps them)."""
STREAM_BACKPRESSURE = 16
"""Batches in flight to the driver before the node's stream waits for it."""
CANCEL_WAIT_S = 30.0
"""How long a stopped run's task may take to end (the runner kills the run's process group: a few seconds)."""
_LOST = (
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.LocalRayletDiedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.RaySystemError,
    ray.exceptions.RuntimeEnvSetupError,
    ray.exceptions.TaskUnschedulableError,
)
"""Ray errors that mean the place a run ran went away (not the run's fault)."""
_DRIVER = f"{socket.gethostname()}.{os.getpid()}"


@dataclass(frozen=True)
class _Job:
    """What a run's task carries to its node."""

    request: RunRequest
    """The engine's request: its log path is the driver's; the node keeps its own log and ships it back."""
    config: EngineConfig
    """The run settings (limits, deadline policy); the node applies them to its own machine."""
    env: Mapping[str, str]
    """The profile's environment for runs."""
    harness: Mapping[str, bytes]
    """The frozen harness's files by name, as read (and hash checked) on the driver."""
    harness_hashes: Mapping[str, str]
    """Each file's SHA-256, by name: the node's judge checks them again."""
    token: str
    """Unique per run, and names the driver ("<random>@<host>.<pid>"): two drivers sharing a cluster never share
    a scratch folder, and a node on the driver's machine can tell the runs of a driver killed with -9."""
    containment: str | None
    """The strongest containment level the run may get ("none", "network", "full"); None: what the node allows."""


class RayTrainers:
    """Runs as Ray tasks: `trainers` at a time, each asking for one GPU (device cuda) or `cpus_per_run` CPUs."""

    def __init__(
        self,
        address: str,
        trainers: int,
        device: str,
        *,
        harness: Path,
        harness_hashes: Mapping[str, str] | None = None,
        config: EngineConfig | None = None,
        env: Mapping[str, str] | None = None,
        containment_level: str | None = None,
        cpus_per_run: float | None = None,
        resources: Mapping[str, float] | None = None,
        max_retries: int = 2,
    ) -> None:
        """Start (address "local") or join (Ray's "auto" or an ADDRESS) a Ray cluster for `trainers` runs at once.

        `harness`: the workspace folder whose frozen harness (prepare.py, corpus.py, metric.py, each file's SHA-256
        recorded at init in `harness_hashes`; None: unchecked) each run ships; `config`: the run settings a node
        applies; `env`: the profile's environment for runs. `containment_level` caps the containment a node gives
        a run; `cpus_per_run`: the CPUs a run asks for (on "local" CPU: this machine's cores shared among the
        trainers; otherwise 1); `resources`: custom Ray resources each run also asks for (e.g. {"trainer": 1}:
        only nodes started with that resource train); `max_retries`: how often a run lost before it started is
        submitted again.
        """
        if trainers < 1:
            raise ValueError("at least one trainer")
        if containment_level is not None and containment_level not in LEVELS:
            raise ValueError(
                f"containment_level must be one of {', '.join(LEVELS)}, not {containment_level!r}"
            )
        if ray.is_initialized():
            raise RuntimeError("Ray is already initialised in this process: one RayTrainers at a time")
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no usage report from this process or what Ray starts
        self.slots = trainers
        self.can_probe = False  # each probe would be a task of its own: not worth it for the few seconds
        self.containment = containment_level or ""
        self.harness, self.harness_hashes = harness, harness_hashes
        self.config = config or EngineConfig()
        self.env = dict(env or {})
        self.device = device
        self.gpu = device.startswith("cuda")
        self.local = address == LOCAL
        self.containment_level = containment_level
        self.resources = dict(resources or {})
        self.max_retries = max_retries
        if cpus_per_run is None:
            cpus_per_run = max(1, (os.cpu_count() or 1) // trainers) if self.local and not self.gpu else 1
        self.cpus_per_run = cpus_per_run
        quiet: dict[str, Any] = {
            "log_to_driver": False,
            "logging_level": "WARNING",
            "configure_logging": False,
        }
        self._own_token = False
        self._closed = False
        try:
            where = self._start(address, quiet)
            self._check_resources()
        except BaseException:
            self.close()
            raise
        self.description = f"{trainers} Ray trainer{'s' if trainers > 1 else ''} ({where})"
        self._task = ray.remote(_train_on_node)

    def _start(self, address: str, quiet: dict[str, Any]) -> str:
        """Start or join Ray; where it runs, for the description."""
        if self.local:
            # A user's own RAY_AUTH_MODE or token stands.
            if "RAY_AUTH_MODE" not in os.environ and "RAY_AUTH_TOKEN" not in os.environ:
                os.environ["RAY_AUTH_TOKEN"] = TOKEN
                self._own_token = True
            with loopback_only(), quiet_token_notice():
                ray.init(
                    address="local",  # never join a cluster found on this machine (RAY_ADDRESS, `ray start`)
                    _node_ip_address=LOOPBACK,
                    num_cpus=max(1, round(self.cpus_per_run * self.slots)),
                    include_dashboard=False,
                    object_store_memory=OBJECT_STORE_MB * 2**20,
                    **quiet,
                )
            return f"local, {LOOPBACK}"
        target = cluster_address(address)
        with loopback_only() if is_loopback(target) else contextlib.nullcontext():
            ray.init(address=target, **quiet)
        return f"at {target}"

    def _check_resources(self) -> None:
        """Refuse a cluster on which no run could ever be placed (Ray would keep such a task pending forever)."""
        total = ray.cluster_resources()
        needs = {"CPU": float(self.cpus_per_run), **self.resources}
        if self.gpu:
            needs["GPU"] = 1.0
        missing = [
            f"{name} {amount:g} (the cluster has {total.get(name, 0):g})"
            for name, amount in needs.items()
            if total.get(name, 0) < amount
        ]
        if missing:
            raise RuntimeError(f"no Ray node can take a run: each run needs {', '.join(missing)}")

    def run(
        self,
        slot: int,
        request: RunRequest,
        emit: EventSink,
        stop: threading.Event,
        on_start: Callable[[int], None] | None,
    ) -> RunResult:
        """Train `request` as a Ray task and return its result; see `agent.trainers.base.Trainer.run`. A remote
        run has no local process: `on_start` is not called."""
        del slot, on_start  # Ray places runs; the run's pid is the node's
        started = time.monotonic()
        log_path = request.log_path
        try:
            harness = frozen_harness(self.harness, self.harness_hashes)
        except HarnessChanged as exc:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text(f"not run: {exc}\n", encoding="utf-8")
            return _result(log_path, Outcome.INVALID, f"not judged: {exc}", started)
        hashes = self.harness_hashes or {
            name: hashlib.sha256(data).hexdigest() for name, data in harness.items()
        }
        job = _Job(
            request=request,
            config=self.config,
            env=self.env,
            harness=harness,
            harness_hashes=hashes,
            token=f"{uuid.uuid4().hex[:12]}@{_DRIVER}",
            containment=self.containment_level,
        )
        retries = 0
        while True:
            log = _StreamedLog(self.config.log_cap_bytes)
            stream = self._submit(job)
            try:
                return self._follow(stream, log_path, emit, stop, log, started, retries)
            except _LostBeforeStart as lost:
                if retries >= self.max_retries:
                    log.write(log_path)
                    raise TrainerLost(lost.reason, retries) from lost.__cause__
                retries += 1
                where = f"#{request.exp_id}: {lost.reason}"
                emit(Info(message=f"{where}; submitted again ({retries}/{self.max_retries})"))

    def _submit(self, job: _Job) -> Any:
        options: dict[str, Any] = {
            "num_returns": "streaming",
            "max_retries": 0,  # retried here, and only before the run started: see the module's docstring
            "retry_exceptions": False,  # the user's code crashing is the run's outcome, never retried
            "num_cpus": self.cpus_per_run,
            "num_gpus": 1 if self.gpu else 0,
            "_generator_backpressure_num_objects": STREAM_BACKPRESSURE,
        }
        if self.resources:
            options["resources"] = self.resources
        return self._task.options(**options).remote(job)

    def _follow(
        self,
        stream: Any,
        log_path: Path,
        emit: EventSink,
        stop: threading.Event,
        log: _StreamedLog,
        started: float,
        retries: int,
    ) -> RunResult:
        """Relay the task's events until its result comes; cancel it when `stop` is set."""
        began = False
        while True:
            if stop.is_set():
                return self._cancel(stream, log_path, log, started)
            ready, _ = ray.wait([stream], timeout=0.2)
            if not ready:
                continue
            try:
                item = ray.get(next(stream))
            except StopIteration:
                log.write(log_path)
                raise TrainerLost("the Ray task ended without a result", retries) from None
            except ray.exceptions.TaskCancelledError:
                log.write(log_path)
                raise TrainerLost("the Ray task was cancelled from outside", retries) from None
            except ray.exceptions.OutOfMemoryError as exc:
                # Ray's memory monitor killed the worker: the node ran short of memory while this run trained.
                log.write(log_path)
                why = f"killed by Ray's memory monitor: {first_line(str(exc))}"
                return _result(log_path, Outcome.OOM, why, started)
            except _LOST as exc:
                reason = f"the Ray worker or node went away: {type(exc).__name__}: {first_line(str(exc))}"
                if began:
                    log.write(log_path)
                    raise TrainerLost(reason, retries) from exc
                raise _LostBeforeStart(reason) from exc
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause
                if isinstance(cause, _LOST):
                    reason = f"the Ray worker or node went away: {type(cause).__name__}"
                    log.write(log_path)
                    raise TrainerLost(reason, retries) from exc
                if isinstance(cause, PrepareError):
                    raise PrepareError(f"on a Ray node: {cause}") from exc
                raise
            began = True
            kind = item[0]
            if kind == "events":
                for event in item[1]:
                    log.add(event)
                    emit(event)
            elif kind == "done":
                result, log_bytes = item[1], item[2]
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log_path.write_bytes(log_bytes)
                return replace(result, log_path=log_path, pid=None)

    def _cancel(self, stream: Any, log_path: Path, log: _StreamedLog, started: float) -> RunResult:
        """Cancel the run's task and wait until it has ended (the node kills the run, then removes its folder),
        at most CANCEL_WAIT_S; the run is "interrupted" either way. The stream is not read once cancelled: Ray
        calls a cancelled stream finished while its task still runs, and then `next()`, `next_ready()` and
        `is_finished()` wait for the task's end (seen: until the run's own deadline, when the cancel did not
        reach the task)."""
        cancelled_at = time.monotonic()
        with contextlib.suppress(Exception):
            ray.cancel(stream)
        while time.monotonic() - cancelled_at < CANCEL_WAIT_S:
            ended, _ = ray.wait([stream.completed()], timeout=0.2, fetch_local=False)
            if ended:
                break
        return log.interrupted(log_path, started)

    def trial(self, request: RunRequest, stop: threading.Event) -> str | None:
        return None  # no probes on a cluster (see can_probe): the run itself says it crashed

    def reap(self, pid: int) -> bool:
        """A Ray run has no process on the driver (a node sweeps what dead drivers left: `sweep_orphans`); a
        local run of an earlier session died with its engine (`setpriv --pdeathsig`)."""
        del pid
        return False

    def close(self) -> None:
        """Shut down the Ray instance started here ("local"), or disconnect from the cluster."""
        if not self._closed:
            self._closed = True
            ray.shutdown()
            if self._own_token:  # Ray set the mode for this token: a cluster joined later brings its own
                os.environ.pop("RAY_AUTH_TOKEN", None)
                os.environ.pop("RAY_AUTH_MODE", None)


class _LostBeforeStart(Exception):
    """The task's worker or node went away before the run sent anything: safe to submit again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _StreamedLog:
    """The log lines the driver has seen, bounded: the run's log when the node's own never comes back."""

    def __init__(self, cap_bytes: int) -> None:
        self.lines: list[str] = []
        self.size = 0
        self.cap = cap_bytes
        self.dropped = 0

    def add(self, event: Event) -> None:
        if not isinstance(event, LogLine):
            return
        if event.replace and self.lines:
            self.size -= len(self.lines.pop().encode())
        size = len(event.text.encode()) + 1
        if self.size + size > self.cap:
            self.dropped += 1
            return
        self.lines.append(event.text)
        self.size += size

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(line + "\n" for line in self.lines)
        if self.dropped:
            text += f"[... {self.dropped} lines over the log cap not kept ...]\n"
        path.write_text(text, encoding="utf-8")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.lines[-lines:])[-8192:]

    def interrupted(self, log_path: Path, started: float) -> RunResult:
        self.write(log_path)
        return _result(log_path, Outcome.INTERRUPTED, "stopped by the user", started, self.tail())


def _result(log_path: Path, outcome: Outcome, reason: str, started: float, tail: str = "") -> RunResult:
    """A result the driver makes itself (the node's never came)."""
    return RunResult.without_judge(outcome, reason, time.monotonic() - started, log_path, tail)


# ---- on the node -----------------------------------------------------------------------------------------


class _Relay:
    """An EventSink on the node: holds events until the task sends them, at most MAX_PENDING_EVENTS."""

    def __init__(self, exp_id: int) -> None:
        self.exp_id = exp_id
        self.lock = threading.Lock()
        self.events: list[Event] = []
        self.dropped = 0

    def __call__(self, event: Event) -> None:
        with self.lock:
            if len(self.events) < MAX_PENDING_EVENTS:
                self.events.append(event)
            else:
                self.dropped += 1

    def take(self) -> list[Event]:
        with self.lock:
            events, self.events = self.events, []
            if self.dropped:
                note = f"[{self.dropped} lines not streamed: the driver fell behind; run.log keeps them]"
                events.append(LogLine(exp_id=self.exp_id, text=note))
                self.dropped = 0
        return events


def _train_on_node(job: _Job) -> Iterator[tuple[Any, ...]]:
    """The Ray task: run `job` on this node, yielding ("events", [Event]) batches, then ("done", RunResult, log)."""
    context = ray.get_runtime_context()
    node_id = context.get_node_id()
    gpus = context.get_accelerator_ids().get("GPU", [])
    relay = _Relay(job.request.exp_id)
    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["done"] = _run_here(job, node_id, gpus, relay, stop)
        except BaseException as exc:  # handed to the task's thread, which raises it to the driver
            outcome["error"] = exc

    worker = threading.Thread(target=work, name=f"run-{job.request.exp_id}", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(EVENT_BATCH_S)
            if context.is_canceled():
                # Ray's cancel raises KeyboardInterrupt here with `_thread.interrupt_main()`, which does nothing
                # in a worker whose SIGINT is ignored (inherited from a driver started in the background by a
                # script): seen, the stop then waited for the run's own deadline.
                return
            if events := relay.take():
                yield ("events", events)
        if events := relay.take():
            yield ("events", events)
        if "error" in outcome:
            raise outcome["error"]
        result, log = outcome["done"]
        yield ("done", result, log)
    finally:
        # Cancelled (a KeyboardInterrupt here, or seen above) or the driver went away: the runner kills the run.
        stop.set()
        worker.join(CANCEL_WAIT_S)


def _run_here(
    job: _Job, node_id: str, gpus: list[str], emit: EventSink, stop: threading.Event
) -> tuple[RunResult, bytes]:
    """Write the harness into this node's folder and train the request in a sandbox of this node's own; the
    result and the log."""
    request = job.request
    root = node_root()
    harness_dir = root / "harness" / _harness_key(job.harness_hashes)
    for name, data in job.harness.items():
        if not (harness_dir / name).is_file():
            harness_dir.mkdir(parents=True, exist_ok=True)
            staged = harness_dir / f".{name}.{job.token}"
            staged.write_bytes(data)
            staged.replace(harness_dir / name)
    python = job.config.python if job.config.python and shutil.which(job.config.python) else sys.executable
    sandbox = Sandbox(
        harness=harness_dir,
        harness_hashes=job.harness_hashes,
        scratch_root=root / "scratch",
        config=job.config,
        env={k: v for k, v in job.env.items() if k != "CUDA_VISIBLE_DEVICES"},  # Ray assigns this run's GPU
        emit=emit,
        python=python,
        containment_cap=job.containment,
        warm_judge=False,
        log_root=root / "logs",
        prepare=lambda here: _prepared(root, here),
        warn_partial=False,
    )
    where = f"node {node_id[:8]}" + (f", GPU {','.join(gpus)}" if gpus else "")
    level = sandbox.containment.level
    emit(Info(message=f"[ray] #{request.exp_id} trains on {where}; runs contained: {level}"))
    sandbox.prepared()  # before this node's orphans are swept: the lock orders the workers
    sweep_orphans(root)
    log_path = sandbox.spec(request, job.token).log_path
    try:
        result = sandbox.run(request, emit, stop, tag=job.token)
        log = read_regular(log_path, job.config.log_cap_bytes + 2**20)
    finally:
        with contextlib.suppress(OSError):
            log_path.unlink()
        sandbox.close()
    return result, log


def _harness_key(hashes: Mapping[str, str]) -> str:
    """One SHA-256 for a whole harness, from its files' names and hashes: the name of its copy on a node."""
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def node_root() -> Path:
    """Where runs of Ray tasks live on this machine: the frozen harness by hash, what preparing the data found
    (by harness, cache and environment), and each run's scratch folder and log (by a token of its own, removed
    after the run). Shared by the Ray nodes on one machine (tests start several): data is prepared once."""
    return paths.data_dir() / "ray-runs"


def sweep_orphans(root: Path) -> list[str]:
    """Kill and remove what runs of dead drivers on this machine left under `root` (a driver killed with -9 takes
    its Ray instance and the runs' supervisors along, but not always the runs' folders, or a run that outlived
    its worker); the names removed. Runs of drivers on other machines, or alive, are left alone."""
    host = socket.gethostname()
    removed = []
    for folder in ("scratch", "logs"):
        for entry in sorted((root / folder).glob("*@*")):
            owner = entry.name.rsplit("@", 1)[1].removesuffix(".judge").removesuffix(".log")
            owner_host, _, pid = owner.rpartition(".")
            if owner_host != host or not pid.isdigit() or psutil.pid_exists(int(pid)):
                continue
            if entry.is_dir():
                for proc in psutil.process_iter():
                    with contextlib.suppress(psutil.Error, OSError):
                        if Path(proc.cwd()).is_relative_to(entry):
                            kill_stale_run(proc.pid, entry)
                remove_tree(entry)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            removed.append(entry.name)
    return removed


def _prepared(root: Path, sandbox: Sandbox) -> Prepared:
    """The data prepared for runs on this node, once per harness, cache and environment (a file lock: every
    worker of the node waits for the first)."""
    folder = root / "prepared"
    folder.mkdir(parents=True, exist_ok=True)
    identity = f"{_harness_key(sandbox.harness_hashes or {})}\0{sandbox.cache}\0{sorted(sandbox.env.items())}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:24]
    marker = folder / f"{key}.json"
    with (folder / f"{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file():
            return Prepared.from_told(json.loads(marker.read_text(encoding="utf-8")))
        scratch = root / f"prepare-{key}"
        try:
            prepared = prepare_for_runs(
                sandbox.harness,
                scratch,
                python=sandbox.python,
                env=sandbox.env,
                containment=sandbox.containment,
                emit=sandbox.emit,
                harness_hashes=sandbox.harness_hashes,
            )
        finally:
            remove_tree(scratch)
        staged = marker.with_suffix(".tmp")
        staged.write_text(json.dumps(prepared.told()), encoding="utf-8")
        staged.replace(marker)
        return prepared


__all__ = ["LOCAL", "RayTrainers", "loopback_only", "node_root", "sweep_orphans"]
