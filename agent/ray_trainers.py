"""Trainers on a Ray cluster: each run is a Ray task that runs the same sandboxed runner on the node it lands on.

`RayTrainers(address, trainers, device)` implements `agent.trainers.Trainer`. `address` is "local" (a Ray instance
started in this process, every server bound to 127.0.0.1, dashboard and usage stats off), or Ray's own "auto" or a
cluster ADDRESS. Each run ships the candidate's train.py and the workspace's frozen prepare.py (hash checked on
the driver) with the task; on the node they are written to a node-local folder, the data is prepared once per
node and harness (`agent.runner.prepare_for_runs`, behind a file lock), containment is probed there, and
`agent.runner.run_training` trains and judges as on this machine. Log lines, step metrics and the node's info
lines stream back to the driver while the run trains (a Ray streaming generator, batched, bounded); the driver
writes the run's log at `spec.log_path` and gets the RunResult. Ledger and git never leave the driver.

Failures: the user's code crashing is an outcome of the run (the runner's), never retried. A worker or node lost
before the run started is retried here (`max_retries`, counted); lost once it had started, `run` raises
`TrainerLost` (the engine records the run interrupted and re-queues the experiment). Ray's own task retries are
off: a retried streaming task replays into the same stream (items deduplicated by index), which would splice two
runs' logs and results. `stop` cancels the task: Ray raises KeyboardInterrupt in it, which sets the runner's stop
event on the node (the run's process group is killed there), and `run` returns outcome "interrupted".

This is the only module that imports `ray`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import secrets
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
from agent.containment import (
    FULL_SUMMARY,
    LEVELS,
    NETWORK_SUMMARY,
    NONE_SUMMARY,
    Containment,
    probe,
)
from agent.events import Event, EventSink, Info, LogLine
from agent.runner import (
    HARNESS_FILE,
    MAX_SOURCE_BYTES,
    HarnessChanged,
    PrepareError,
    RunResult,
    RunSpec,
    frozen_harness,
    kill_stale_run,
    prepare_for_runs,
    read_regular,
    remove_tree,
    run_training,
)
from agent.trainers import TrainerLost

LOCAL = "local"
LOOPBACK = "127.0.0.1"
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
_SUMMARIES = {"full": FULL_SUMMARY, "network": NETWORK_SUMMARY, "none": NONE_SUMMARY}
_DRIVER = f"{socket.gethostname()}.{os.getpid()}"


@dataclass(frozen=True)
class _Job:
    """What a run's task carries to its node."""

    spec: RunSpec
    """The driver's spec: its paths are the driver's; the node makes its own."""
    train: bytes
    harness: bytes
    harness_sha256: str
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
        containment_level: str | None = None,
        cpus_per_run: float | None = None,
        resources: Mapping[str, float] | None = None,
        max_retries: int = 2,
    ) -> None:
        """Start (address "local") or join (Ray's "auto" or an ADDRESS) a Ray cluster for `trainers` runs at once.

        `containment_level` caps the containment a node gives a run; `cpus_per_run`: the CPUs a run asks for
        (on "local" CPU: this machine's cores shared among the trainers; otherwise 1); `resources`: custom Ray
        resources each run also asks for (e.g. {"trainer": 1}: only nodes started with that resource train);
        `max_retries`: how often a run lost before it started is submitted again.
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
                os.environ["RAY_AUTH_TOKEN"] = _TOKEN
                self._own_token = True
            with loopback_only(), _quiet_token_notice():
                ray.init(
                    address="local",  # never join a cluster found on this machine (RAY_ADDRESS, `ray start`)
                    _node_ip_address=LOOPBACK,
                    num_cpus=max(1, round(self.cpus_per_run * self.slots)),
                    include_dashboard=False,
                    object_store_memory=OBJECT_STORE_MB * 2**20,
                    **quiet,
                )
            return f"local, {LOOPBACK}"
        target = _cluster_address(address)
        with loopback_only() if _is_loopback(target) else contextlib.nullcontext():
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
        spec: RunSpec,
        emit: EventSink,
        stop: threading.Event,
        on_start: Callable[[int], None] | None,
    ) -> RunResult:
        """Train `spec` as a Ray task and return its result; see `agent.trainers.Trainer.run`. A remote run has
        no local process: `on_start` is not called."""
        del slot, on_start  # Ray places runs; the run's pid is the node's
        started = time.monotonic()
        try:
            harness = frozen_harness(spec.workspace, spec.harness_sha256)
        except HarnessChanged as exc:
            spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            spec.log_path.write_text(f"not run: {exc}\n", encoding="utf-8")
            return _result(spec, "invalid", f"not judged: {exc}", started)
        train = spec.train_source
        if train is None:
            train = read_regular(spec.workspace / spec.script, MAX_SOURCE_BYTES)
        job = _Job(
            spec=spec,
            train=train,
            harness=harness,
            harness_sha256=spec.harness_sha256 or hashlib.sha256(harness).hexdigest(),
            token=f"{uuid.uuid4().hex[:12]}@{_DRIVER}",
            containment=self.containment_level,
        )
        retries = 0
        while True:
            log = _StreamedLog(spec.log_cap_bytes)
            stream = self._submit(job)
            try:
                return self._follow(stream, spec, emit, stop, log, started, retries)
            except _LostBeforeStart as lost:
                if retries >= self.max_retries:
                    log.write(spec.log_path)
                    raise TrainerLost(lost.reason, retries) from lost.__cause__
                retries += 1
                emit(
                    Info(
                        message=f"#{spec.exp_id}: {lost.reason}; submitted again ({retries}/{self.max_retries})"
                    )
                )

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
        spec: RunSpec,
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
                return self._cancel(stream, spec, log, started)
            ready, _ = ray.wait([stream], timeout=0.2)
            if not ready:
                continue
            try:
                item = ray.get(next(stream))
            except StopIteration:
                log.write(spec.log_path)
                raise TrainerLost("the Ray task ended without a result", retries) from None
            except ray.exceptions.TaskCancelledError:
                log.write(spec.log_path)
                raise TrainerLost("the Ray task was cancelled from outside", retries) from None
            except ray.exceptions.OutOfMemoryError as exc:
                # Ray's memory monitor killed the worker: the node ran short of memory while this run trained.
                log.write(spec.log_path)
                return _result(spec, "oom", f"killed by Ray's memory monitor: {_first_line(exc)}", started)
            except _LOST as exc:
                reason = f"the Ray worker or node went away: {type(exc).__name__}: {_first_line(exc)}"
                if began:
                    log.write(spec.log_path)
                    raise TrainerLost(reason, retries) from exc
                raise _LostBeforeStart(reason) from exc
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause
                if isinstance(cause, _LOST):
                    reason = f"the Ray worker or node went away: {type(cause).__name__}"
                    log.write(spec.log_path)
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
                spec.log_path.parent.mkdir(parents=True, exist_ok=True)
                spec.log_path.write_bytes(log_bytes)
                return replace(result, log_path=spec.log_path, pid=None)

    def _cancel(self, stream: Any, spec: RunSpec, log: _StreamedLog, started: float) -> RunResult:
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
        return log.interrupted(spec, started)

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

    def interrupted(self, spec: RunSpec, started: float) -> RunResult:
        self.write(spec.log_path)
        return _result(spec, "interrupted", "stopped by the user", started, self.tail())


def _result(spec: RunSpec, outcome: str, reason: str, started: float, tail: str = "") -> RunResult:
    """A result the driver makes itself (the node's never came)."""
    return RunResult.without_judge(outcome, reason, time.monotonic() - started, spec.log_path, tail)


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")[:300]


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cluster_address(address: str) -> str:
    """host:port of the cluster `address` names ("auto": the one Ray finds on this machine), a loopback host
    kept as it is (Ray alone would swap it for this machine's routable address)."""
    from ray._private import services  # Ray's own reading of "auto"; see loopback_only

    with loopback_only():
        found = services.canonicalize_bootstrap_address(address)
    if found is None:
        raise RuntimeError(f"no Ray cluster found at {address!r} (start one with `ray start --head`)")
    return str(found)


_TOKEN = secrets.token_hex(32)


"""The token a local instance requires of every client (Ray turns token authentication on for a new local
instance): one random token per process, in the environment its processes inherit (Ray alone would generate
one and save it in ~/.ray/auth_token)."""


@contextlib.contextmanager
def _quiet_token_notice() -> Iterator[None]:
    """Ray logs a warning that token authentication is on: it is, by design, and the cockpit's screen is not
    the place to say so."""
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        yield
    finally:
        notice.setLevel(level)


_DEAD_PROXY = f"http://{LOOPBACK}:9"
"""A closed loopback port (discard): where Ray's own HTTP requests go instead of the network."""


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """While Ray starts (or joins a cluster at a loopback address): Ray on 127.0.0.1 only, in this process and in
    the processes it starts (they inherit the environment set here; this process's is restored afterwards).

    Two Ray behaviours need it (2.60; tests/test_ray_trainers.py checks every socket is loopback):
    - `_node_ip_address="127.0.0.1"` (or an address 127.0.0.1:PORT) alone is not enough on Linux: Ray replaces a
      loopback address with the machine's routable one ("remotely reachable"), then listens and connects there.
      It keeps the loopback address only where multi-node clusters are off (its Windows/macOS default), which
      RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 says: read when `ray` is imported (in this process the constant is set
      for the time being) and by the processes Ray starts.
    - The head's dashboard process (started even with the dashboard off, for its usage-stats module) asks cloud
      metadata servers (169.254.169.254, metadata.google.internal: a DNS query) which cloud it runs on, usage
      stats off or not. Its HTTP proxy is pointed at a closed loopback port, loopback itself exempt: the requests
      fail on this machine. Training runs never see the proxy (the runner drops *PROXY* variables).
    """
    from ray._private import ray_constants  # the Ray internal this module touches, here only

    overrides = {ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        overrides[name] = _DEAD_PROXY
    for name in ("no_proxy", "NO_PROXY", "no_grpc_proxy"):
        overrides[name] = f"{LOOPBACK},localhost,::1"
    saved_env = {name: os.environ.get(name) for name in overrides}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(overrides)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
    relay = _Relay(job.spec.exp_id)
    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["done"] = _run_here(job, node_id, gpus, relay, stop)
        except BaseException as exc:  # handed to the task's thread, which raises it to the driver
            outcome["error"] = exc

    worker = threading.Thread(target=work, name=f"run-{job.spec.exp_id}", daemon=True)
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
    """Write the sources into this node's folder, prepare the data once, run and judge; the result and the log."""
    spec = job.spec
    root = node_root()
    harness_dir = root / "harness" / job.harness_sha256
    if not (harness_dir / HARNESS_FILE).is_file():
        harness_dir.mkdir(parents=True, exist_ok=True)
        staged = harness_dir / f".{HARNESS_FILE}.{job.token}"
        staged.write_bytes(job.harness)
        staged.replace(harness_dir / HARNESS_FILE)
    containment = _containment(job.containment)
    cache = paths.cache_dir()
    env = {k: v for k, v in spec.env.items() if k != "CUDA_VISIBLE_DEVICES"}  # Ray assigns this run's GPU
    env["AUTORESEARCH_CACHE"] = str(cache)
    python = spec.python if shutil.which(spec.python) else sys.executable
    where = f"node {node_id[:8]}" + (f", GPU {','.join(gpus)}" if gpus else "")
    emit(Info(message=f"[ray] #{spec.exp_id} trains on {where}; runs contained: {containment.level}"))
    hidden = _prepared(root, harness_dir, job.harness_sha256, cache, python, env, containment, emit)
    sweep_orphans(root)
    name = f"{spec.scratch.name}-{job.token}"
    here = replace(
        spec,
        workspace=harness_dir,
        scratch=root / "scratch" / name,
        log_path=root / "logs" / f"{name}.log",
        hidden=hidden,
        readable=(cache,),
        python=python,
        env=env,
        train_source=job.train,
    )
    try:
        result = run_training(here, emit, stop=stop, containment=containment, judge=None)
        log = read_regular(here.log_path, spec.log_cap_bytes + 2**20)
    finally:
        with contextlib.suppress(OSError):
            here.log_path.unlink()
    return result, log


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


def _containment(cap: str | None) -> Containment:
    """What this node allows (probed once per worker process), no more than `cap`."""
    found = probe()
    if cap is None or LEVELS.index(cap) >= LEVELS.index(found.level):
        return found
    return Containment(cap, _SUMMARIES[cap], f"capped at {cap} by the driver")


def _prepared(
    root: Path,
    harness_dir: Path,
    sha: str,
    cache: Path,
    python: str,
    env: dict[str, str],
    containment: Containment,
    emit: EventSink,
) -> tuple[Path, ...]:
    """The files runs must not read, from preparing the data on this node once per harness and cache (a file
    lock: every worker of the node waits for the first)."""
    folder = root / "prepared"
    folder.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{sha}\0{cache}\0{sorted(env.items())}".encode()).hexdigest()[:24]
    marker = folder / f"{key}.json"
    with (folder / f"{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file():
            return tuple(Path(p) for p in json.loads(marker.read_text(encoding="utf-8")))
        scratch = root / f"prepare-{key}"
        try:
            hidden = prepare_for_runs(
                harness_dir, scratch, python=python, env=env, containment=containment, emit=emit
            )
        finally:
            remove_tree(scratch)
        staged = marker.with_suffix(".tmp")
        staged.write_text(json.dumps([str(p) for p in hidden]), encoding="utf-8")
        staged.replace(marker)
        return hidden


__all__ = ["LOCAL", "RayTrainers", "loopback_only", "node_root", "sweep_orphans"]
