"""Process-tree control for runs and judges: a session of their own, output streamed, measured and killed whole.

`supervise` runs a command in its own process group, streams its output, tells it when its budget is spent, and
kills the whole group at the deadline, on a stop, over the memory or folder cap, or when a told-to-stop run does
not end; nothing it started outlives the call, nor the calling thread (`setpriv --pdeathsig`). The measures it
takes from outside (resident memory, CPU seconds, folder size) and the environment a contained process gets
(scrubbed of secrets, caches in its own folder) are here too.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import psutil

from agent.budget import Budget, BudgetMode
from agent.sandbox.containment import SETUP_FAILED
from agent.sandbox.spec import STOP_SIGNAL

TERM_GRACE_S = 3.0
"""Seconds between SIGTERM and SIGKILL of the run's process group."""
_MEMORY_POLL_S = 0.5
_DISK_POLL_S = 2.0
_BUDGET_POLL_S = 0.2
_LOAD_POLL_S = 1.0
_SECRET = re.compile(
    r"TOKEN|SECRET|PASSW|CREDENTIAL|API_?KEY|PRIVATE|AUTH|COOKIE|SESSION|PROXY", re.IGNORECASE
)
_PASS_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "TERM",
        "TZ",
        "TMPDIR",
        "PYTHONPATH",
        "PYTHONHOME",
        "VIRTUAL_ENV",
        "CONDA_PREFIX",
        "LD_LIBRARY_PATH",
        "XDG_CACHE_HOME",
        "XDG_DATA_HOME",
        "XDG_CONFIG_HOME",
        "AUTORESEARCH_HOME",
        "AUTORESEARCH_CACHE",
        "AUTORESEARCH_CORPUS",
    }
)
_PASS_PREFIXES = ("LC_", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "CUDA_", "NVIDIA_", "TORCH_", "PYTORCH_")


class Output(Protocol):
    """Where a supervised process's bytes go (agent.sandbox.output.CappedOutput)."""

    def feed(self, data: bytes, eof: bool = False) -> None: ...


def scrub_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The parts of `environ` a training run needs: no proxies, no tokens, keys or passwords."""
    kept: dict[str, str] = {}
    for name, value in environ.items():
        if name in _PASS_NAMES or name.startswith(_PASS_PREFIXES):
            if _SECRET.search(name) and not name.startswith("AUTORESEARCH_"):
                continue
            kept[name] = value
    return kept


def private_caches(folder: Path) -> dict[str, str]:
    """Caches a process may write (torch.compile's, libraries'): inside its own folder, gone with it."""
    cache = folder / ".cache"
    return {
        "XDG_CACHE_HOME": str(cache),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
    }


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return members


def kill_group(pgid: int, extra: Iterable[psutil.Process] = (), grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM the process group `pgid` (and `extra` descendants that left it), then SIGKILL what survives.

    `extra` are psutil handles, which refuse to signal a pid that has since been reused by another process.
    """
    procs = list(extra)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while True:
            if not group_members(pgid) and not any(_alive(p) for p in procs):
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tree(pid: int, known: dict[int, psutil.Process]) -> list[psutil.Process]:
    """`pid` and its descendants now (none if it is gone); remembers them in `known`."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    for proc in procs:
        known.setdefault(proc.pid, proc)
    return procs


def group_rss(pid: int, known: dict[int, psutil.Process]) -> int:
    """Summed resident bytes of `pid` and its descendants; remembers the descendants in `known`."""
    total = 0
    for proc in _tree(pid, known):
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


@lru_cache(maxsize=1)
def _dies_with_its_parent() -> tuple[str, ...]:
    """`setpriv --pdeathsig KILL --`: the process is killed when the thread that started it ends (a Ray worker
    lost with its node, an engine killed with -9) instead of training on unsupervised; () where setpriv is
    missing or too old to set it."""
    setpriv = shutil.which("setpriv")
    if not setpriv:
        return ()
    try:
        usage = subprocess.run([setpriv, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return (setpriv, "--pdeathsig", "KILL", "--") if "--pdeathsig" in usage else ()


def _tree_size(folder: Path, limit_entries: int = 100_000) -> int:
    """Bytes in `folder` (not following links); counts entries past `limit_entries` as 1 MiB each."""
    total, seen, stack = 0, 0, [folder]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    seen += 1
                    if seen > limit_entries:
                        total += 1 << 20
                        continue
                    with contextlib.suppress(OSError):
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        else:
                            total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total


def _peak_hwm(known: dict[int, psutil.Process]) -> int:
    """The largest VmHWM (peak resident bytes, not inherited from the engine) among the run's processes."""
    best = 0
    for pid in list(known):
        try:
            with open(f"/proc/{pid}/status", "rb") as fh:
                for line in fh:
                    if line.startswith(b"VmHWM:"):
                        best = max(best, int(line.split()[1]) * 1024)
                        break
        except (OSError, ValueError):
            continue
    return best


@dataclass
class Ended:
    """How a supervised process ended."""

    returncode: int | None
    killed_for: str
    """Why it was killed ("" when it ended by itself): interrupted, timeout, oom, disk or overrun."""
    seconds: float
    peak_rss: int
    pid: int
    budget_spent: float | None = None
    told_s: float | None = None
    """Seconds from its start to when it was told its budget was spent (None: it was not told)."""
    other_load: float | None = None
    """CPU cores other processes of the machine kept busy, on average, while it trained (None: not measured)."""


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (a hypervisor's steal counts: it was not ours)."""
    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


class LoadWatch:
    """What the rest of the machine did while a run trained: the machine's busy CPU seconds less the run's own
    and less this process's (the engine supervising it: its cockpit, its log reading), from a first sample at the
    run's start to the last one before it was told to stop. The run's own work is always subtracted: every
    process it starts is in its tree (the containment's PID namespace); what is left to it is kernel work it
    causes (writeback, reclaim), bounded by its folder and memory caps."""

    MIN_SECONDS = 5.0
    """A shorter window says nothing (a test's budget of seconds, a crash at start-up)."""

    def __init__(self) -> None:
        self._own = psutil.Process()
        self._first: tuple[float, float] | None = None
        self._last: tuple[float, float] | None = None

    def sample(self, run_cpu_seconds: float) -> None:
        with contextlib.suppress(psutil.Error):
            own = self._own.cpu_times()
            taken = (time.monotonic(), _machine_busy_seconds() - own.user - own.system - run_cpu_seconds)
            if self._first is None:
                self._first = taken
            else:
                self._last = taken

    def other_load(self) -> float | None:
        """Mean CPU cores others kept busy between the samples; None over less than MIN_SECONDS."""
        first, last = self._first, self._last
        if first is None or last is None or last[0] - first[0] < self.MIN_SECONDS:
            return None
        return max(0.0, (last[1] - first[1]) / (last[0] - first[0]))


def supervise(
    argv: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    output: Output,
    stop: threading.Event,
    deadline_s: float,
    memory_mb: int | None,
    scratch: Path | None = None,
    scratch_cap_mb: int | None = None,
    on_start: Callable[[int], None] | None = None,
    contained: bool = False,
    budget: Budget | None = None,
    handover_s: float = 30.0,
) -> Ended:
    """Run `argv` in its own session; stream its output; kill its group at the deadline, on `stop`, over the
    memory cap or over the scratch cap; tell it when its budget is spent and kill it if it does not end soon
    after; nothing of it outlives this call, nor the calling thread."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [*_dies_with_its_parent(), *argv],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
    )
    pgid = proc.pid
    known: dict[int, psutil.Process] = {}
    killed_for = ""
    peak_rss = 0
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    ended = started
    try:
        if on_start is not None:
            on_start(proc.pid)
        eof = False
        exited_at: float | None = None
        next_memory = started
        next_disk = started + 1.0
        next_budget = started
        spent: float | None = None
        told_at: float | None = None
        load, next_load = LoadWatch(), started
        while True:
            now = time.monotonic()
            if now >= next_load and told_at is None and proc.poll() is None:
                next_load = now + _LOAD_POLL_S
                load.sample(tree_cpu_seconds(proc.pid, known))
            if budget is not None and now >= next_budget and proc.poll() is None:
                next_budget = now + _BUDGET_POLL_S
                spent = now - started if budget.mode == BudgetMode.TIME else tree_cpu_seconds(proc.pid, known)
                if told_at is None and spent >= budget.amount:
                    told_at = now
                    _tell_stop(proc.pid, contained)
            if stop.is_set():
                killed_for = "interrupted"
            elif now - started > deadline_s:
                killed_for = "timeout"
            elif told_at is not None and now - told_at > handover_s:
                killed_for = "overrun"
            elif now >= next_memory:
                next_memory = now + _MEMORY_POLL_S
                rss = group_rss(proc.pid, known)
                peak_rss = max(peak_rss, rss, _peak_hwm(known))
                if memory_mb is not None and rss > memory_mb * 1024 * 1024:
                    killed_for = "oom"
            if not killed_for and scratch is not None and scratch_cap_mb is not None and now >= next_disk:
                next_disk = now + _DISK_POLL_S
                if _tree_size(scratch) > scratch_cap_mb * 1024 * 1024:
                    killed_for = "disk"
            if killed_for:
                ended = time.monotonic()
                kill_group(pgid, known.values())
                break
            if not eof:
                for _ in selector.select(timeout=0.1):
                    try:
                        data = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if data:
                        output.feed(data)
                    else:
                        eof = True
            if proc.poll() is not None:
                if exited_at is None:
                    exited_at = ended = time.monotonic()
                if eof:
                    break
                # The main process is gone but something still holds its stdout: a leftover child.
                if time.monotonic() - exited_at > 1.0:
                    break
            elif eof:
                # Output closed but the process lives on; wait for it without spinning.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.1)
        # Whatever the end, nothing of the run outlives it: forked children included.
        kill_group(pgid, known.values(), grace_s=0.5 if not killed_for else TERM_GRACE_S)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        _drain(fd, output)
    finally:
        selector.close()
        output.feed(b"", eof=True)
        proc.stdout.close()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait()
    # The run's own time, up to its exit (or kill): the clean-up after it is the engine's overhead.
    seconds = max(0.0, ended - started) if proc.returncode is not None else time.monotonic() - started
    returncode = proc.returncode
    if contained and returncode is not None and returncode > 128 and returncode != SETUP_FAILED:
        returncode = -(returncode - 128)  # the namespace's init reports a death by signal N as 128 + N
    told_s = told_at - started if told_at is not None else None
    return Ended(returncode, killed_for, seconds, peak_rss, proc.pid, spent, told_s, load.other_load())


def tree_cpu_seconds(pid: int, known: dict[int, psutil.Process]) -> float:
    """CPU seconds (user + system) of `pid` and its descendants, finished children included."""
    total = 0.0
    for proc in _tree(pid, known):
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def _tell_stop(pid: int, contained: bool) -> None:
    """Send STOP_SIGNAL to the run's main process: under full containment, its namespace init forwards it
    (the outer `unshare` would die of it); otherwise `pid` is the run itself (exec chain)."""
    with contextlib.suppress(psutil.Error, ProcessLookupError):
        target = psutil.Process(pid)
        if contained:
            target = target.children()[0]
        target.send_signal(STOP_SIGNAL)


def _drain(fd: int, output: Output) -> None:
    """Read what the (now dead) process left in the pipe."""
    for _ in range(1024):
        try:
            data = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            return
        if not data:
            return
        output.feed(data)


def remove_tree(folder: Path) -> None:
    """Remove a folder a run wrote, whatever modes it left on it (a folder chmod-ed 000 included)."""

    def unlock_and_retry(function: Callable[..., Any], path: str, _exc: BaseException) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(path), 0o700)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, 0o700)
            function(path)

    if not folder.is_dir() or folder.is_symlink():
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(folder, onexc=unlock_and_retry)
    else:
        shutil.rmtree(folder, onerror=lambda function, path, info: unlock_and_retry(function, path, info[1]))


def fresh_folder(path: Path) -> None:
    if path.exists() or path.is_symlink():
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)
        else:
            path.unlink()
    path.mkdir(parents=True)


def kill_stale_run(pid: int, scratch_root: Path) -> bool:
    """Kill the process group of a run left behind by a killed engine, if `pid` is still that run (a group
    leader working in a folder under `scratch_root`)."""
    try:
        proc = psutil.Process(pid)
        if not Path(proc.cwd()).resolve().is_relative_to(scratch_root.resolve()) or os.getpgid(pid) != pid:
            return False
    except (psutil.Error, OSError):
        return False
    kill_group(pid, [proc])
    return True
