"""The sandboxed runner: one `train.py` run as a contained child process, streamed, capped and classified.

Containment, for a small model's mistakes rather than an attacker: the run gets its own session and process
group (the whole group is killed at the deadline, SIGTERM then SIGKILL), a resident-memory watchdog and an
address-space rlimit, a cap on stored output, an empty network namespace (`unshare -n`) where the kernel allows
it, and an environment without proxies or credentials. The val_bpb that counts is the one the harness wrote to
the result file; a printed summary that disagrees with it is `invalid`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import psutil

from agent.events import EventSink, LogLine, StepMetric
from agent.summary import find_fail, parse_progress, parse_summary, summary_bpb

OUTCOMES = ("ok", "crash", "timeout", "oom", "nan", "invalid", "interrupted")
MAX_LINE_BYTES = 64 * 1024
"""A longer run of output without a newline is cut into lines of this size."""
TAIL_LINES = 400
"""Lines kept in memory to find the summary block and the traceback."""
LOG_TAIL_LINES = 40
"""Lines of output stored with the experiment (the traceback tail of a crash)."""
TERM_GRACE_S = 3.0
"""Seconds between SIGTERM and SIGKILL of the run's process group."""
_MEMORY_POLL_S = 0.5
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
# Sets the rlimits, then becomes the real interpreter: no preexec_fn, which is unsafe in a threaded engine.
_LAUNCHER = (
    "import os,resource,sys\n"
    "a=int(sys.argv[1])\n"
    "if a>0: resource.setrlimit(resource.RLIMIT_AS,(a,a))\n"
    "resource.setrlimit(resource.RLIMIT_CORE,(0,0))\n"
    "os.execv(sys.argv[2],sys.argv[2:])\n"
)


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs: where, which seed and budget, and its limits."""

    workspace: Path
    exp_id: int
    seed: int
    log_path: Path
    result_path: Path
    deadline_s: float
    """Hard wall-clock limit from start to kill: budget + evaluation + grace."""
    budget: str | None = None
    memory_mb: int | None = None
    """Cap on the summed resident memory of the process group; None: no watchdog."""
    address_space_mb: int | None = None
    """RLIMIT_AS of the run; None: unlimited."""
    log_cap_bytes: int = 4 * 1024 * 1024
    network: bool = False
    python: str = "python3"
    script: str = "train.py"
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment (after scrubbing), e.g. AUTORESEARCH_CACHE."""


@dataclass(frozen=True)
class RunResult:
    """How a run ended. `val_bpb` is the result file's number, set only when the outcome is ok."""

    outcome: str
    val_bpb: float | None
    reason: str
    seconds: float
    exit_code: int | None
    summary: dict[str, Any]
    peak_memory_mb: float | None
    log_tail: str
    log_path: Path
    truncated: bool
    pid: int | None


def scrub_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The parts of `environ` a training run needs: no proxies, no tokens, keys or passwords."""
    kept: dict[str, str] = {}
    for name, value in environ.items():
        if name in _PASS_NAMES or name.startswith(_PASS_PREFIXES):
            if _SECRET.search(name) and not name.startswith("AUTORESEARCH_"):
                continue
            kept[name] = value
    return kept


@lru_cache(maxsize=1)
def network_isolation() -> tuple[str, ...] | None:
    """The command prefix that runs a program without network (`unshare -n`, or `-rn` unprivileged), or None."""
    unshare = shutil.which("unshare")
    if not unshare:
        return None
    for flags in (("-n",), ("-r", "-n")):
        try:
            probe = subprocess.run([unshare, *flags, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return (unshare, *flags, "--")
    return None


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


def _group_rss(pid: int, known: dict[int, psutil.Process]) -> int:
    """Summed resident bytes of `pid` and its descendants; remembers the descendants in `known`."""
    total = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for proc in procs:
        known.setdefault(proc.pid, proc)
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
        if self.fail_line is None and text.lstrip().startswith("FAIL"):
            self.fail_line = text.strip()
        if cr:
            self.cr_line = text
        else:
            self.cr_line = None
            self._write(text)
        if not self.truncated:
            self.emit(LogLine(exp_id=self.spec.exp_id, text=text, replace=replace))
        if progress := parse_progress(text):
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


def _read_result(path: Path) -> tuple[dict[str, Any] | None, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "the harness wrote no result file"
    except (OSError, ValueError) as exc:
        return None, f"the result file is unreadable: {exc}"
    if not isinstance(data, dict):
        return None, "the result file is not a JSON object"
    return data, ""


def classify(
    exit_code: int | None,
    tail: list[str],
    fail_line: str | None,
    result: dict[str, Any] | None,
    result_problem: str,
) -> tuple[str, float | None, str, dict[str, Any]]:
    """Outcome, val_bpb, reason and summary of a run that exited by itself (no deadline, no stop)."""
    summary = parse_summary(tail) or {}
    if fail_line is not None:
        return "nan", None, fail_line, summary
    if exit_code != 0:
        text = "\n".join(tail[-60:])
        if exit_code == -signal.SIGKILL or _OOM_TEXT.search(text):
            why = "killed by SIGKILL (the kernel's OOM killer?)" if exit_code == -signal.SIGKILL else ""
            return "oom", None, why or "out of memory", summary
        last = next((line.strip() for line in reversed(tail) if line.strip()), "")
        return "crash", None, f"exit code {exit_code}: {last}"[:300], summary
    if not summary:
        return "invalid", None, "no `---` summary block in the output", summary
    if result is None:
        return "invalid", None, result_problem, summary
    file_bpb = result.get("val_bpb")
    if result.get("status") != "ok" or not isinstance(file_bpb, int | float):
        return (
            "invalid",
            None,
            f"the harness judged the run invalid: {result.get('reason') or 'no val_bpb'}",
            summary,
        )
    printed = summary_bpb(summary)
    if printed is None:
        return "invalid", None, f"the printed val_bpb is {summary.get('val_bpb')!r}", summary
    if not math.isfinite(file_bpb):
        return "nan", None, f"val_bpb is {file_bpb}", summary
    if abs(printed - float(file_bpb)) > 1e-5:
        return (
            "invalid",
            None,
            f"the printed val_bpb {printed:.6f} disagrees with the harness's result file ({file_bpb:.6f})",
            summary,
        )
    return "ok", float(file_bpb), "", summary


def build_command(spec: RunSpec, isolation: tuple[str, ...] | None) -> list[str]:
    """argv of a run: [unshare -n --] python -S -c LAUNCHER <as-bytes> python train.py."""
    address_space = (spec.address_space_mb or 0) * 1024 * 1024
    command = [spec.python, "-S", "-c", _LAUNCHER, str(address_space), spec.python, spec.script]
    if isolation and not spec.network:
        command = [*isolation, *command]
    return command


def run_training(
    spec: RunSpec,
    emit: EventSink,
    stop: threading.Event | None = None,
    on_start: Callable[[int], None] | None = None,
    isolation: tuple[str, ...] | None = None,
) -> RunResult:
    """Run `train.py` once under the limits of `spec`; blocks until it ends, is killed, or `stop` is set.

    `on_start(pid)` is called once the child exists (the engine records the pid so a restarted engine can
    clean up after a kill -9). `isolation` is the network prefix, normally `network_isolation()`.
    """
    stop = stop or threading.Event()
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        spec.result_path.unlink()
    env = scrub_environment(os.environ)
    env.update(spec.env)
    env.update(
        {
            "AUTORESEARCH_SEED": str(spec.seed),
            "AUTORESEARCH_RESULT_FILE": str(spec.result_path),
            "OMP_WAIT_POLICY": "PASSIVE",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    if spec.budget is not None:
        env["AUTORESEARCH_BUDGET"] = spec.budget
    else:
        env.pop("AUTORESEARCH_BUDGET", None)
    output = _Output(spec, emit)
    started = time.monotonic()
    proc = subprocess.Popen(
        build_command(spec, isolation),
        cwd=spec.workspace,
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
    try:
        if on_start is not None:
            on_start(proc.pid)
        eof = False
        ended = started
        exited_at: float | None = None
        next_memory = started
        while True:
            now = time.monotonic()
            if stop.is_set():
                killed_for = "interrupted"
            elif now - started > spec.deadline_s:
                killed_for = "timeout"
            elif now >= next_memory:
                next_memory = now + _MEMORY_POLL_S
                rss = _group_rss(proc.pid, known)
                peak_rss = max(peak_rss, rss)
                if spec.memory_mb is not None and rss > spec.memory_mb * 1024 * 1024:
                    killed_for = "oom"
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
        output.close()
        proc.stdout.close()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait()
    # The run's own time, up to its exit (or kill): the clean-up after it is the engine's overhead.
    seconds = max(0.0, ended - started) if proc.returncode is not None else time.monotonic() - started
    tail = list(output.tail)
    if killed_for:
        reasons = {
            "interrupted": "stopped by the user",
            "timeout": f"killed at the {spec.deadline_s:.0f} s deadline",
            "oom": f"resident memory above the {spec.memory_mb} MB cap",
        }
        summary = parse_summary(tail) or {}
        outcome, val_bpb, reason = killed_for, None, reasons[killed_for]
    else:
        result, problem = _read_result(spec.result_path)
        outcome, val_bpb, reason, summary = classify(proc.returncode, tail, output.fail_line, result, problem)
    peak = summary.get("peak_memory_mb")
    peak_memory_mb = float(peak) if isinstance(peak, float) else (peak_rss / 2**20 if peak_rss else None)
    return RunResult(
        outcome=outcome,
        val_bpb=val_bpb,
        reason=reason,
        seconds=seconds,
        exit_code=proc.returncode,
        summary=summary,
        peak_memory_mb=peak_memory_mb,
        log_tail=output.log_tail(),
        log_path=spec.log_path,
        truncated=output.truncated,
        pid=proc.pid,
    )


def _drain(fd: int, output: _Output) -> None:
    """Read what the (now dead) run left in the pipe."""
    for _ in range(1024):
        try:
            data = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            return
        if not data:
            return
        output.feed(data)


def kill_stale_run(pid: int, workspace: Path) -> bool:
    """Kill the process group of a run left behind by a killed engine, if `pid` is still that run."""
    try:
        proc = psutil.Process(pid)
        if Path(proc.cwd()).resolve() != workspace.resolve() or os.getpgid(pid) != pid:
            return False
    except (psutil.Error, OSError):
        return False
    kill_group(pid, [proc])
    return True


__all__ = [
    "OUTCOMES",
    "RunResult",
    "RunSpec",
    "build_command",
    "classify",
    "find_fail",
    "group_members",
    "kill_group",
    "kill_stale_run",
    "network_isolation",
    "run_training",
    "scrub_environment",
]
