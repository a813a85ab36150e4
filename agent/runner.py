"""The sandboxed runner: one `train.py` run, contained, streamed, capped, and scored by a separate judge.

The run executes in a fresh scratch folder holding copies of `train.py` and `prepare.py`, never in the
workspace. Where Linux namespaces allow (`agent.containment`), the filesystem is read-only except that folder
and a private /tmp, the validation split is unreadable, the run has its own PID namespace (every process dies
with it, the engine is invisible) and no network; it runs without capabilities (`setpriv`), under
RLIMIT_AS/RLIMIT_FSIZE, a resident-memory watchdog, a cap on its folder and a deadline that kills its whole
process group. Its output is stored capped (head and tail).

The number is not the run's: the run only hands over its model, exported (`model.pt2`), and its claims
(`claims.json`). Both are read as small regular files only (no FIFO, link or device can hang or fool the
engine) and copied into a folder the run never saw, where `agent/judge.py` — a clean `python -I` process that
imports the workspace's frozen `prepare.py`, never `train.py` — probes causality and measures val_bpb.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import select
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import psutil

from agent import paths
from agent.containment import SETUP_FAILED, Containment, contain
from agent.events import EventSink, Info, LogLine, StepMetric
from agent.summary import find_fail, parse_progress, parse_summary

OUTCOMES = ("ok", "crash", "timeout", "oom", "nan", "invalid", "interrupted")
EXPORT_FILE = "model.pt2"
"""What the run hands over: its model as a `torch.export` program (nanogpt/prepare.py writes it)."""
CLAIMS_FILE = "claims.json"
"""What the run says it spent; checked by the judge, never the score."""
HARNESS_FILE = "prepare.py"
JUDGE_SCRIPT = Path(__file__).with_name("judge.py")
_CODE = JUDGE_SCRIPT.parent
"""The folder the judge script lives in: kept in sight of contained judges (a checkout under /tmp)."""
CONTAINMENT_FAILED = SETUP_FAILED
"""Exit status of the containment's setup stage when a namespace or mount step failed (nothing ran)."""
_CONTAINMENT_ERROR = "autoresearch containment:"
_JUDGED_FIELDS = ("eval_tokens", "eval_bytes", "num_params", "block_size", "export_seconds", "fingerprint")
"""What the judge measured that the summary shows (besides val_bpb; a probe's fingerprint: agent/noop.py)."""
MAX_SOURCE_BYTES = 4 * 1024 * 1024
MAX_CLAIMS_BYTES = 256 * 1024
MAX_LINE_BYTES = 64 * 1024
"""A longer run of output without a newline is cut into lines of this size."""
TAIL_LINES = 400
"""Lines kept in memory to find the summary block and the traceback."""
LOG_TAIL_LINES = 40
"""Lines of output stored with the experiment (the traceback tail of a crash)."""
TERM_GRACE_S = 3.0
"""Seconds between SIGTERM and SIGKILL of the run's process group."""
_MEMORY_POLL_S = 0.5
_DISK_POLL_S = 2.0
_BUDGET_POLL_S = 0.2
STOP_SIGNAL = signal.SIGUSR1
"""Tells a run that its budget is spent (nanogpt/prepare.py's Budget stops training on it)."""
_OOM_TEXT = re.compile(
    r"MemoryError|out of memory|OutOfMemoryError|Cannot allocate memory|std::bad_alloc", re.IGNORECASE
)
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
# Sets the rlimits and ignores the stop signal, then becomes the real interpreter: no preexec_fn, which is unsafe
# in a threaded engine.
_LAUNCHER = (
    "import os,resource,signal,sys\n"
    # Ignored (which survives exec) until the harness installs its handler: a stop that comes during
    # start-up must not kill the run; the harness's own clock then stops it at the first step.
    "signal.signal(signal.SIGUSR1,signal.SIG_IGN)\n"
    "a,f=int(sys.argv[1]),int(sys.argv[2])\n"
    "if a>0: resource.setrlimit(resource.RLIMIT_AS,(a,a))\n"
    "if f>0: resource.setrlimit(resource.RLIMIT_FSIZE,(f,f))\n"
    "resource.setrlimit(resource.RLIMIT_CORE,(0,0))\n"
    "os.execv(sys.argv[3],sys.argv[3:])\n"
)


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs: its sources, its folder, which seed and budget, and its limits."""

    workspace: Path
    """Where train.py and the frozen prepare.py are copied from; the run never sees this folder."""
    scratch: Path
    """The run's own folder, made fresh (its only writable place); removed after the judge has scored."""
    exp_id: int
    seed: int
    log_path: Path
    deadline_s: float
    """Hard wall-clock limit from start to kill: budget + evaluation + grace."""
    budget: str | None = None
    budget_limit: tuple[str, float] | None = None
    """("time", wall seconds) or ("cpu", CPU seconds of the run's processes): measured here, from outside
    the run, from its start; when spent the run is told to stop (STOP_SIGNAL) and must hand over within
    `handover_s`. None: the run's own count decides (a FLOPs budget) and only the deadline bounds it."""
    handover_s: float = 30.0
    """Seconds a run may take after its budget is spent to stop, export its model and exit."""
    memory_mb: int | None = None
    """Cap on the summed resident memory of the process group; None: no watchdog."""
    address_space_mb: int | None = None
    """RLIMIT_AS of the run; None: unlimited."""
    file_size_mb: int = 8192
    """RLIMIT_FSIZE: the largest file the run may write."""
    scratch_cap_mb: int = 16384
    """The most the run's folder may hold; past it the run is killed."""
    model_cap_mb: int = 8192
    """The largest exported model the judge accepts."""
    tmp_mb: int = 1024
    """Size of the run's private /tmp (with namespaces)."""
    hidden: tuple[Path, ...] = ()
    """Files training must not read (the validation split); only the judge reads them."""
    readable: tuple[Path, ...] = ()
    """Folders the run and the judge read (the data cache), kept in sight read-only wherever they are."""
    judge_deadline_s: float = 300.0
    harness_sha256: str | None = None
    """The frozen prepare.py's SHA-256 (recorded at init): the judge imports nothing else."""
    log_cap_bytes: int = 4 * 1024 * 1024
    network: bool = False
    python: str = "python3"
    script: str = "train.py"
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment (after scrubbing), e.g. AUTORESEARCH_CACHE."""
    device_memory_from_summary: bool = False
    """On CUDA the harness's max_memory_allocated is the figure; on CPU the runner's own measurement."""
    train_source: bytes | None = None
    """The train.py to run (a candidate's text at its commit); None: the workspace's file. With several runs in
    flight the workspace holds the best train.py, not the one each run trains."""


@dataclass(frozen=True)
class RunResult:
    """How a run ended. `val_bpb` is the judge's number, set only when the outcome is ok."""

    outcome: str
    val_bpb: float | None
    reason: str
    seconds: float
    """The training process's wall time (the judge's is apart)."""
    exit_code: int | None
    summary: dict[str, Any]
    peak_memory_mb: float | None
    log_tail: str
    log_path: Path
    truncated: bool
    pid: int | None
    judge_seconds: float = 0.0
    """Seconds the judge took (load, probe, score), apart from the run's own."""
    budget_spent: float | None = None
    """What the run spent of an enforced budget, by the runner's measure (wall or CPU seconds)."""

    @classmethod
    def without_judge(
        cls,
        outcome: str,
        reason: str,
        seconds: float,
        log_path: Path,
        log_tail: str = "",
        summary: dict[str, Any] | None = None,
    ) -> RunResult:
        """A result made where no judged run of this machine's runner stands behind it (a probe that settled
        the experiment, a remote run that never reported): no score, no exit code, no memory figure."""
        return cls(
            outcome=outcome,
            val_bpb=None,
            reason=reason,
            seconds=seconds,
            exit_code=None,
            summary=summary or {},
            peak_memory_mb=None,
            log_tail=log_tail,
            log_path=log_path,
            truncated=False,
            pid=None,
        )


def scrub_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The parts of `environ` a training run needs: no proxies, no tokens, keys or passwords."""
    kept: dict[str, str] = {}
    for name, value in environ.items():
        if name in _PASS_NAMES or name.startswith(_PASS_PREFIXES):
            if _SECRET.search(name) and not name.startswith("AUTORESEARCH_"):
                continue
            kept[name] = value
    return kept


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


def _group_rss(pid: int, known: dict[int, psutil.Process]) -> int:
    """Summed resident bytes of `pid` and its descendants; remembers the descendants in `known`."""
    total = 0
    for proc in _tree(pid, known):
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


class _Output:
    """Splits the child's bytes into lines, writes the capped log, keeps the tail and emits events."""

    def __init__(self, spec: RunSpec, emit: EventSink) -> None:
        self.spec = spec
        self.emit = emit
        self.file = spec.log_path.open("w", encoding="utf-8", errors="replace")
        self.pending = b""
        self.prev_cr = False
        self.cr_line: str | None = None
        """A `\\r` progress line not yet final: written to the log only if nothing overwrites it."""
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.fail_line: str | None = None
        tail_budget = min(spec.log_cap_bytes // 4, 256 * 1024)
        self.head_budget = spec.log_cap_bytes - tail_budget
        self.tail_budget = tail_budget
        self.written = 0
        self.truncated = False
        self.dropped = 0
        self.file_tail: deque[str] = deque()
        self.file_tail_bytes = 0
        self.prefix = ""
        """Set for the judge's lines: they are shown and stored, never parsed as the run's progress or FAIL."""

    def feed(self, data: bytes, eof: bool = False) -> None:
        self.pending += data
        buf = self.pending
        start = 0
        while True:
            cut = min((i for i in (buf.find(b"\n", start), buf.find(b"\r", start)) if i >= 0), default=-1)
            if cut < 0:
                if len(buf) - start > MAX_LINE_BYTES:
                    self._line(buf[start : start + MAX_LINE_BYTES], cr=False)
                    start += MAX_LINE_BYTES
                    continue
                break
            if buf[cut : cut + 1] == b"\r":
                if cut + 1 == len(buf) and not eof:
                    break  # a \r at the end of a chunk may be the start of \r\n
                if buf[cut + 1 : cut + 2] == b"\n":
                    self._line(buf[start:cut], cr=False)
                    start = cut + 2
                    continue
                self._line(buf[start:cut], cr=True)
            else:
                self._line(buf[start:cut], cr=False)
            start = cut + 1
        self.pending = buf[start:]
        if eof:
            if self.pending:
                self._line(self.pending, cr=False)
                self.pending = b""
            if self.cr_line is not None:
                self._write(self.cr_line)
                self.cr_line = None

    def _line(self, raw: bytes, cr: bool) -> None:
        text = raw.decode("utf-8", errors="replace")
        if self.prefix and text:
            text = self.prefix + text
        if not text:
            if not cr and self.prev_cr:
                # A newline after a \r line: the progress line stays on screen, it is final.
                if self.cr_line is not None:
                    self._write(self.cr_line)
                    self.cr_line = None
                self.prev_cr = False
            return  # a bare \r (tqdm starts lines with one) overwrites nothing yet
        replace = self.prev_cr
        self.prev_cr = cr
        if replace and self.tail:
            self.tail[-1] = text[:4096]
        else:
            self.tail.append(text[:4096])
        if self.fail_line is None and not self.prefix and text.lstrip().startswith("FAIL"):
            self.fail_line = text.strip()
        if cr:
            self.cr_line = text
        else:
            self.cr_line = None
            self._write(text)
        if not self.truncated:
            self.emit(LogLine(exp_id=self.spec.exp_id, text=text, replace=replace))
        if not self.prefix and (progress := parse_progress(text)):
            self.emit(
                StepMetric(
                    exp_id=self.spec.exp_id,
                    step=progress.step,
                    loss=progress.loss,
                    tokens_per_s=progress.tokens_per_s,
                )
            )

    def _write(self, text: str) -> None:
        line = text + "\n"
        size = len(line.encode("utf-8", errors="replace"))
        if not self.truncated and self.written + size <= self.head_budget:
            self.file.write(line)
            self.written += size
            return
        if not self.truncated:
            self.truncated = True
            self.emit(
                LogLine(
                    exp_id=self.spec.exp_id,
                    text=f"[output over the log cap of {self.spec.log_cap_bytes} bytes: "
                    "run.log keeps the first part and the last lines]",
                )
            )
        size = min(size, self.tail_budget)
        self.file_tail.append(line[: self.tail_budget])
        self.file_tail_bytes += size
        while self.file_tail_bytes > self.tail_budget and self.file_tail:
            dropped = self.file_tail.popleft()
            dropped_size = len(dropped.encode("utf-8", errors="replace"))
            self.file_tail_bytes -= dropped_size
            self.dropped += dropped_size

    def close(self) -> None:
        if self.truncated:
            self.file.write(f"[... {self.dropped} bytes of output dropped: over the log cap ...]\n")
            self.file.writelines(self.file_tail)
        self.file.close()

    def log_tail(self) -> str:
        text = "\n".join(list(self.tail)[-LOG_TAIL_LINES:])
        return text[-8192:]


class UnsafeFile(Exception):
    """A file a run left for the engine that is not a small regular file; the message says what it is."""


def read_regular(path: Path, limit: int, dir_fd: int | None = None) -> bytes:
    """The bytes of `path` if it is a regular file of at most `limit` bytes; else UnsafeFile.

    Opened without following a symbolic link and without blocking (a FIFO cannot hang the engine), checked
    with fstat on the open descriptor (no race between the check and the read).
    """
    fd = _open_regular(path, limit, dir_fd)
    try:
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise UnsafeFile(f"{path.name} grew past the {limit:,}-byte limit while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _open_regular(path: Path, limit: int, dir_fd: int | None) -> int:
    """A read descriptor of `path` if it is a regular file of at most `limit` bytes (UnsafeFile otherwise)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(f"{path.name} is a symbolic link") from None
        raise UnsafeFile(f"{path.name} cannot be opened: {exc.strerror}") from None
    info = os.fstat(fd)
    problem = ""
    if not stat.S_ISREG(info.st_mode):
        problem = f"{path.name} is not a regular file ({_file_kind(info.st_mode)})"
    elif info.st_size > limit:
        problem = f"{path.name} is {info.st_size:,} bytes, over the {limit:,}-byte limit"
    if problem:
        os.close(fd)
        raise UnsafeFile(problem)
    return fd


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_json_object(path: Path, limit: int, dir_fd: int | None = None) -> dict[str, Any]:
    """A small JSON object from a file a run could have tampered with; UnsafeFile/ValueError say why not."""
    data = json.loads(read_regular(path, limit, dir_fd).decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


def classify(
    exit_code: int | None,
    tail: list[str],
    fail_line: str | None,
) -> tuple[str, str] | None:
    """Outcome and reason of a training process that ended badly by itself; None when it exited cleanly."""
    if fail_line is not None:
        return "nan", fail_line
    if exit_code == 0:
        return None
    setup_failed = next((line for line in tail if line.startswith(_CONTAINMENT_ERROR)), None)
    if exit_code == CONTAINMENT_FAILED and setup_failed:
        return "crash", f"the run's containment could not be set up: {setup_failed}"[:300]
    text = "\n".join(tail[-60:])
    if exit_code == -signal.SIGKILL or _OOM_TEXT.search(text):
        why = "killed by SIGKILL (the kernel's OOM killer?)" if exit_code == -signal.SIGKILL else ""
        return "oom", why or "out of memory"
    last = next((line.strip() for line in reversed(tail) if line.strip()), "")
    return "crash", f"exit code {exit_code}: {last}"[:300]


def judged(result: dict[str, Any]) -> tuple[str, float | None, str]:
    """Outcome, val_bpb and reason from the judge's result."""
    value = result.get("val_bpb")
    if result.get("status") != "ok" or not isinstance(value, int | float):
        return "invalid", None, f"the judge refused the model: {result.get('reason') or 'no val_bpb'}"[:500]
    if not math.isfinite(value):
        return "nan", None, f"val_bpb is {value}"
    return "ok", float(value), ""


def build_command(spec: RunSpec, containment: Containment | None, argv: list[str] | None = None) -> list[str]:
    """argv of a run: [containment | setpriv: no capabilities] python -S -c LAUNCHER <limits> python train.py."""
    address_space = (spec.address_space_mb or 0) * 1024 * 1024
    file_size = spec.file_size_mb * 1024 * 1024
    program = argv or [spec.python, spec.script]
    command = [spec.python, "-S", "-c", _LAUNCHER, str(address_space), str(file_size), *program]
    if not _fully(containment) and (setpriv := _drop_capabilities()) is not None:
        command = [*setpriv, *command]  # full containment drops them itself
    if containment is None:
        return command
    return contain(
        command,
        containment,
        cwd=spec.scratch,
        writable=[spec.scratch],
        readable=spec.readable,
        hidden=spec.hidden,
        tmp_mb=spec.tmp_mb,
        network=spec.network,
    )


def _fully(containment: Containment | None) -> bool:
    """Whether runs get the namespaces (and so the init that reports signals as 128 + N and forwards SIGUSR1)."""
    return containment is not None and containment.level == "full"


@lru_cache(maxsize=1)
def _drop_capabilities() -> tuple[str, ...] | None:
    """`setpriv` that drops every capability and sets no_new_privs, when we run as root; None otherwise."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or not setpriv:
        return None
    return (setpriv, "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--")


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
class _Ended:
    """How a supervised process ended."""

    returncode: int | None
    killed_for: str
    seconds: float
    peak_rss: int
    pid: int
    budget_spent: float | None = None


def _supervise(
    argv: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    output: _Output,
    stop: threading.Event,
    deadline_s: float,
    memory_mb: int | None,
    scratch: Path | None = None,
    scratch_cap_mb: int | None = None,
    on_start: Callable[[int], None] | None = None,
    contained: bool = False,
    budget_limit: tuple[str, float] | None = None,
    handover_s: float = 30.0,
) -> _Ended:
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
        while True:
            now = time.monotonic()
            if budget_limit is not None and now >= next_budget and proc.poll() is None:
                next_budget = now + _BUDGET_POLL_S
                mode, amount = budget_limit
                spent = now - started if mode == "time" else _tree_cpu_seconds(proc.pid, known)
                if told_at is None and spent >= amount:
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
                rss = _group_rss(proc.pid, known)
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
    if contained and returncode is not None and returncode > 128 and returncode != CONTAINMENT_FAILED:
        returncode = -(returncode - 128)  # the namespace's init reports a death by signal N as 128 + N
    return _Ended(returncode, killed_for, seconds, peak_rss, proc.pid, spent)


def _tree_cpu_seconds(pid: int, known: dict[int, psutil.Process]) -> float:
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


def _drain(fd: int, output: _Output) -> None:
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


def _fresh_folder(path: Path) -> None:
    if path.exists() or path.is_symlink():
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)
        else:
            path.unlink()
    path.mkdir(parents=True)


def run_training(
    spec: RunSpec,
    emit: EventSink,
    stop: threading.Event | None = None,
    on_start: Callable[[int], None] | None = None,
    containment: Containment | None = None,
    judge: WarmJudge | None = None,
) -> RunResult:
    """Train `train.py` once in a fresh scratch folder under the limits of `spec`, then have the judge score
    the model it exported. Blocks until both end, a limit is hit, or `stop` is set.

    `on_start(pid)` is called once the training process exists (the engine records the pid so a restarted
    engine can clean up after a kill -9). `containment` is normally `containment.probe()`; None runs plainly.
    """
    stop = stop or threading.Event()
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    judge_dir = spec.scratch.with_name(spec.scratch.name + ".judge")
    _fresh_folder(spec.scratch)
    for name in (spec.script, HARNESS_FILE):
        source = spec.train_source if name == spec.script else None
        if source is None:
            source = read_regular(spec.workspace / name, MAX_SOURCE_BYTES)
        (spec.scratch / name).write_bytes(source)
    env = _run_environment(spec)
    output = _Output(spec, emit)
    contained = _fully(containment)
    try:
        env["AUTORESEARCH_CLOCK_START"] = f"{time.time():.6f}"  # the budget's clock, shared with the run
        training = _supervise(
            build_command(spec, containment),
            cwd=spec.scratch,
            env=env,
            output=output,
            stop=stop,
            deadline_s=spec.deadline_s,
            memory_mb=spec.memory_mb,
            scratch=spec.scratch,
            scratch_cap_mb=spec.scratch_cap_mb,
            on_start=on_start,
            contained=contained,
            budget_limit=spec.budget_limit,
            handover_s=spec.handover_s,
        )
        tail = list(output.tail)
        summary = parse_summary(tail) or {}
        judge_seconds = 0.0
        if training.killed_for:
            outcome, val_bpb, reason = training.killed_for, None, _kill_reason(spec, training.killed_for)
            if outcome in ("disk", "overrun"):
                outcome = "invalid"
        elif bad := classify(training.returncode, tail, output.fail_line):
            (outcome, reason), val_bpb = bad, None
        else:
            started = time.monotonic()
            with judge.lock if judge is not None else contextlib.nullcontext():  # one model at a time
                outcome, val_bpb, reason, verdict = _judge(
                    spec, judge_dir, env, output, stop, containment, judge
                )
            judge_seconds = time.monotonic() - started
            summary.update({k: verdict[k] for k in _JUDGED_FIELDS if k in verdict})
            summary["val_bpb"] = val_bpb if val_bpb is not None else f"invalid ({reason[:60]})"
    finally:
        output.close()
        for folder in (spec.scratch, judge_dir):
            remove_tree(folder)
    if training.budget_spent is not None:
        summary["budget_spent"] = round(training.budget_spent, 2)
    peak = summary.get("peak_memory_mb") if spec.device_memory_from_summary else None
    peak_memory_mb = float(peak) if isinstance(peak, float) else (training.peak_rss / 2**20 or None)
    if peak_memory_mb is not None:
        summary["peak_memory_mb"] = round(peak_memory_mb, 1)
    return RunResult(
        outcome=outcome,
        val_bpb=val_bpb,
        reason=reason,
        seconds=training.seconds,
        exit_code=training.returncode,
        summary=summary,
        peak_memory_mb=peak_memory_mb,
        log_tail=output.log_tail(),
        log_path=spec.log_path,
        truncated=output.truncated,
        pid=training.pid,
        judge_seconds=judge_seconds,
        budget_spent=training.budget_spent,
    )


def _kill_reason(spec: RunSpec, killed_for: str) -> str:
    return {
        "interrupted": "stopped by the user",
        "timeout": f"killed at the {spec.deadline_s:.0f} s deadline",
        "oom": f"resident memory above the {spec.memory_mb} MB cap",
        "disk": f"the run's folder grew past the {spec.scratch_cap_mb} MB cap",
        "overrun": f"still running {spec.handover_s:.0f} s after its budget was spent: a run must stop when told "
        "and hand over its model",
    }[killed_for]


def _run_environment(spec: RunSpec) -> dict[str, str]:
    env = scrub_environment(os.environ)
    env.update(spec.env)
    env.update(
        {
            "AUTORESEARCH_SEED": str(spec.seed),
            "OMP_WAIT_POLICY": "PASSIVE",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    env.pop("AUTORESEARCH_RESULT_FILE", None)
    env.update(_private_caches(spec.scratch))
    if spec.budget is not None:
        env["AUTORESEARCH_BUDGET"] = spec.budget
    else:
        env.pop("AUTORESEARCH_BUDGET", None)
    return env


def _private_caches(folder: Path) -> dict[str, str]:
    """Caches a process may write (torch.compile's, libraries'): inside its own folder, gone with it."""
    cache = folder / ".cache"
    return {
        "XDG_CACHE_HOME": str(cache),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
    }


class WarmJudge:
    """The judge kept warm for a workspace: one contained, long-lived `judge.py serve` process that imports
    torch and the frozen harness once and forks a fresh child to score each model, so a run does not pay the
    judge's start-up (~2 s: torch, the first `torch.export.load`). Requests are files in its folder (the only
    place it may write), the reply one line on its stdout. Any trouble (it died, hit the deadline or the memory
    cap, was stopped) kills it; the next score starts a new one. It ends by itself when the engine's end of its
    stdin closes (the engine exited, or was killed)."""

    def __init__(
        self,
        workspace: Path,
        root: Path,
        *,
        python: str,
        env: Mapping[str, str],
        containment: Containment | None,
        readable: tuple[Path, ...] = (),
        tmp_mb: int = 1024,
        harness_sha256: str | None = None,
    ) -> None:
        self.workspace, self.root, self.python = workspace, root, python
        self.harness_sha256 = harness_sha256
        self.env, self.containment, self.readable, self.tmp_mb = dict(env), containment, readable, tmp_mb
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()
        """Held while one model is scored: the server answers one request after another (runs in parallel)."""
        self.started = 0
        """How many servers were started (tests and the bench read it)."""

    def folder(self, name: str) -> Path:
        """A fresh request folder inside the judge's own."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        folder = self.root / name
        _fresh_folder(folder)
        return folder

    def _start(self) -> None:
        self.close()
        _fresh_folder(self.root)
        harness = self.root / HARNESS_FILE
        harness.write_bytes(frozen_harness(self.workspace, self.harness_sha256))
        argv = [self.python, "-I", str(JUDGE_SCRIPT), "serve", str(harness)]
        if self.containment is not None:
            argv = contain(
                argv,
                self.containment,
                cwd=self.root,
                writable=[self.root],
                readable=[*self.readable, _CODE],
                tmp_mb=self.tmp_mb,
                stdin=True,
            )
        env = (
            scrub_environment(os.environ) | self.env | _private_caches(self.root) | {"PYTHONUNBUFFERED": "1"}
        )
        with (self.root.parent / f"{self.root.name}.log").open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.root,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        self.started += 1

    def score(
        self, folder: Path, deadline_s: float, stop: threading.Event, memory_mb: int | None
    ) -> tuple[int | None, str]:
        """Score folder/model.pt2 (with folder/claims.json) into folder/result.json: (the scoring child's exit
        code, "") or (None, why there is none)."""
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        request = {"model": str(folder / EXPORT_FILE), "claims": str(folder / CLAIMS_FILE)}
        request["out"] = str(folder / "result.json")
        try:
            proc.stdin.write((json.dumps(request) + "\n").encode())
            proc.stdin.flush()
        except OSError:
            self.close()
            return None, "the judge had stopped"
        started = time.monotonic()
        known: dict[int, psutil.Process] = {}
        fd = proc.stdout.fileno()
        while True:
            if stop.is_set():
                self.close()
                return None, "interrupted"
            if time.monotonic() - started > deadline_s:
                self.close()
                return None, f"the judge hit its {deadline_s:.0f} s deadline"
            if memory_mb is not None and _group_rss(proc.pid, known) > memory_mb * 2**20:
                self.close()
                return None, f"the judge's memory went above the {memory_mb} MB cap"
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                line = proc.stdout.readline()
                if not line:
                    self.close()
                    return None, f"the judge died ({self._log_tail()})"
                try:
                    return int(json.loads(line)["exit"]), ""
                except (ValueError, KeyError, TypeError):
                    self.close()
                    return None, "the judge answered garbage"

    def _log_tail(self) -> str:
        try:
            lines = (self.root.parent / f"{self.root.name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        return next((line.strip() for line in reversed(lines) if line.strip()), "no output")

    def close(self) -> None:
        """Stop the server and everything it started."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        kill_group(proc.pid, grace_s=0.5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


def _judge(
    spec: RunSpec,
    judge_dir: Path,
    env: dict[str, str],
    output: _Output,
    stop: threading.Event,
    containment: Containment | None,
    warm: WarmJudge | None = None,
) -> tuple[str, float | None, str, dict[str, Any]]:
    """Collect what the run handed over (claims, exported model) as regular files, and have the judge score it
    in a folder the run never saw (the warm judge's, if there is one). Outcome, val_bpb, reason and the
    judge's result."""
    if warm is not None:
        try:
            judge_dir = warm.folder(spec.scratch.name)
        except HarnessChanged as exc:
            return "invalid", None, f"not judged: {exc}", {}
    else:
        _fresh_folder(judge_dir)
    scratch_fd = os.open(spec.scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        claims = read_json_object(Path(CLAIMS_FILE), MAX_CLAIMS_BYTES, dir_fd=scratch_fd)
        if claims.get("export", "ok") != "ok":
            return "invalid", None, f"the model could not be exported: {str(claims['export'])[:300]}", {}
        _copy_regular(Path(EXPORT_FILE), judge_dir / EXPORT_FILE, spec.model_cap_mb * 2**20, scratch_fd)
    except FileNotFoundError as exc:
        missing = Path(exc.filename or "").name or "a file"
        return "invalid", None, f"the run left no {missing}: train.py must end with evaluate_and_report", {}
    except (UnsafeFile, ValueError, UnicodeDecodeError) as exc:
        return "invalid", None, f"the run's hand-over is refused: {exc}"[:300], {}
    finally:
        os.close(scratch_fd)
    (judge_dir / CLAIMS_FILE).write_text(json.dumps(claims), encoding="utf-8")
    out = judge_dir / "result.json"
    if warm is not None:
        code, trouble = warm.score(judge_dir, spec.judge_deadline_s, stop, spec.memory_mb)
        try:
            if trouble:
                outcome = "interrupted" if trouble == "interrupted" else "invalid"
                return outcome, None, "the judge was stopped" if outcome == "interrupted" else trouble, {}
            verdict = _verdict(out, claims, code, output)
            output.prefix = "[judge] "  # the warm judge's own lines go to its log: say the verdict here
            output.feed(f"{verdict[0]} val_bpb {verdict[1]} {verdict[2]}".rstrip().encode() + b"\n", eof=True)
            return verdict
        finally:
            remove_tree(judge_dir)
    # The harness the judge imports is the workspace's frozen copy (hash checked), never the one the run could edit.
    try:
        (judge_dir / HARNESS_FILE).write_bytes(frozen_harness(spec.workspace, spec.harness_sha256))
    except HarnessChanged as exc:
        return "invalid", None, f"not judged: {exc}", {}
    argv = [
        spec.python,
        "-I",
        str(JUDGE_SCRIPT),
        "score",
        str(judge_dir / HARNESS_FILE),
        str(judge_dir / EXPORT_FILE),
        str(judge_dir / CLAIMS_FILE),
        str(out),
    ]
    if containment is not None:
        argv = contain(
            argv,
            containment,
            cwd=judge_dir,
            writable=[judge_dir],
            readable=[*spec.readable, _CODE],
            tmp_mb=spec.tmp_mb,
        )
    output.prefix = "[judge] "
    ended = _supervise(
        argv,
        cwd=judge_dir,
        env=env | _private_caches(judge_dir),
        output=output,
        stop=stop,
        deadline_s=spec.judge_deadline_s,
        memory_mb=spec.memory_mb,
        contained=_fully(containment),
    )
    if ended.killed_for:
        what = (
            "the judge was stopped"
            if ended.killed_for == "interrupted"
            else f"the judge hit its {ended.killed_for}"
        )
        return ("interrupted" if ended.killed_for == "interrupted" else "invalid"), None, what, {}
    return _verdict(out, claims, ended.returncode, output)


def _verdict(
    out: Path, claims: dict[str, Any], exit_code: int | None, output: _Output
) -> tuple[str, float | None, str, dict[str, Any]]:
    """Outcome, val_bpb, reason and result from the judge's result file."""
    try:
        verdict = read_json_object(out, MAX_CLAIMS_BYTES)
    except (OSError, UnsafeFile, ValueError, UnicodeDecodeError) as exc:
        last = next((line.strip() for line in reversed(output.tail) if line.strip()), "")
        return "invalid", None, f"the judge failed (exit {exit_code}): {last or exc}"[:300], {}
    if isinstance(claims.get("export_seconds"), int | float):
        verdict["export_seconds"] = claims["export_seconds"]  # the run's word: shown, never decisive
    return (*judged(verdict), verdict)


class HarnessChanged(Exception):
    """The workspace's frozen prepare.py no longer has the SHA-256 recorded at init."""


def frozen_harness(workspace: Path, expected_sha256: str | None) -> bytes:
    """The workspace's prepare.py, refused (HarnessChanged) unless it has the recorded SHA-256: the judge must
    never import a harness a run (one without full containment) could have rewritten."""
    data = read_regular(workspace / HARNESS_FILE, MAX_SOURCE_BYTES)
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise HarnessChanged(f"{HARNESS_FILE} in {workspace} is not the frozen harness any more")
    return data


def _copy_regular(name: Path, target: Path, limit: int, dir_fd: int) -> None:
    """Copy a regular file of at most `limit` bytes out of the run's folder (UnsafeFile otherwise)."""
    fd = _open_regular(name, limit, dir_fd)
    try:
        copied = 0
        with target.open("wb") as fh:
            while chunk := os.read(fd, 1 << 20):
                copied += len(chunk)
                if copied > limit:
                    raise UnsafeFile(f"{name} grew past the {limit:,}-byte limit while being copied")
                fh.write(chunk)
    finally:
        os.close(fd)


class PrepareError(Exception):
    """The harness could not prepare the data for runs; the message says why."""


def prepare_for_runs(
    workspace: Path,
    scratch_root: Path,
    *,
    python: str,
    env: Mapping[str, str],
    containment: Containment | None,
    emit: EventSink,
    timeout_s: float = 1800.0,
) -> tuple[Path, ...]:
    """Run the workspace's frozen harness once, outside any run, to build the data cache (the only time the
    cache is written) and measure what the harness needs; returns the files training must not read."""
    folder = scratch_root / "prepare"
    _fresh_folder(folder)
    try:
        (folder / HARNESS_FILE).write_bytes(read_regular(workspace / HARNESS_FILE, MAX_SOURCE_BYTES))
        cache = Path(env.get("AUTORESEARCH_CACHE") or paths.cache_dir())
        cache.mkdir(parents=True, exist_ok=True)
        env = {**env, "AUTORESEARCH_CACHE": str(cache)}
        out = folder / "prepared.json"
        argv = [python, "-I", str(JUDGE_SCRIPT), "prepare", str(folder / HARNESS_FILE), str(out)]
        if containment is not None:
            argv = contain(argv, containment, cwd=folder, writable=[folder, cache], readable=[_CODE])
        full_env = scrub_environment(os.environ) | dict(env) | {"PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(
            argv, cwd=folder, env=full_env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        for line in proc.stderr.splitlines():
            if line.startswith("[prepare]"):
                emit(Info(message=line))
        if proc.returncode != 0:
            lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
            raise PrepareError(lines[-1] if lines else f"exit code {proc.returncode}")
        prepared = read_json_object(out, MAX_CLAIMS_BYTES)
        return tuple(Path(p) for p in prepared.get("hidden", []) if isinstance(p, str))
    except subprocess.TimeoutExpired:
        raise PrepareError(f"preparing the data took over {timeout_s:.0f} s") from None
    finally:
        remove_tree(folder)


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


__all__ = [
    "OUTCOMES",
    "PrepareError",
    "RunResult",
    "UnsafeFile",
    "WarmJudge",
    "RunSpec",
    "build_command",
    "classify",
    "find_fail",
    "group_members",
    "kill_group",
    "kill_stale_run",
    "prepare_for_runs",
    "read_json_object",
    "read_regular",
    "run_training",
    "scrub_environment",
]
