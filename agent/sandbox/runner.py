"""The sandboxed runner: one `train.py` run, contained, streamed, capped, and scored by a separate judge.

The run executes in a fresh scratch folder holding copies of `train.py`, `prepare.py` and `corpus.py` (the part of
the frozen harness it imports; never metric.py, which only the judge imports), never in the workspace. Where Linux
namespaces allow (`agent.sandbox.containment`), the filesystem is read-only except that folder and a private
/tmp, the validation split is unreadable, the run has its own PID namespace (every process dies with it, the
engine is invisible) and no network; it runs without capabilities (`setpriv`), under RLIMIT_AS/RLIMIT_FSIZE, a
resident-memory watchdog, a cap on its folder and a deadline that kills its whole process group
(`agent.sandbox.process`). Its output is stored capped (`agent.sandbox.output`).

The number is not the run's: the run only hands over its model, exported (`model.pt2`), and its claims
(`claims.json`), which the judge scores in a folder the run never saw (`agent.sandbox.judging`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from functools import lru_cache

from agent.events import EventSink
from agent.sandbox.containment import SETUP_FAILED, Containment, contain
from agent.sandbox.handover import read_regular
from agent.sandbox.judging import SHOWN_MEASURES, Judged, Judges, judge_handover
from agent.sandbox.output import CappedOutput
from agent.sandbox.process import fresh_folder, private_caches, remove_tree, scrub_environment, supervise
from agent.sandbox.spec import HANDOVER_MIN_S, MAX_SOURCE_BYTES, RUN_FILES, Outcome, RunResult, RunSpec
from agent.sandbox.summary import parse_summary

CONTAINMENT_FAILED = SETUP_FAILED
"""Exit status of the containment's setup stage when a namespace or mount step failed (nothing ran)."""
_CONTAINMENT_ERROR = "autoresearch containment:"
_OOM_TEXT = re.compile(
    r"MemoryError|out of memory|OutOfMemoryError|Cannot allocate memory|std::bad_alloc", re.IGNORECASE
)
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


def classify(exit_code: int | None, tail: list[str], fail_line: str | None) -> Judged | None:
    """The verdict on a training process that ended badly by itself (no score); None when it exited cleanly."""
    if fail_line is not None:
        return Judged(Outcome.NAN, None, fail_line)
    if exit_code == 0:
        return None
    setup_failed = next((line for line in tail if line.startswith(_CONTAINMENT_ERROR)), None)
    if exit_code == CONTAINMENT_FAILED and setup_failed:
        return Judged(Outcome.CRASH, None, f"the run's containment could not be set up: {setup_failed}"[:300])
    text = "\n".join(tail[-60:])
    if exit_code == -signal.SIGKILL or _OOM_TEXT.search(text):
        why = "killed by SIGKILL (the kernel's OOM killer?)" if exit_code == -signal.SIGKILL else ""
        return Judged(Outcome.OOM, None, why or "out of memory")
    last = next((line.strip() for line in reversed(tail) if line.strip()), "")
    return Judged(Outcome.CRASH, None, f"exit code {exit_code}: {last}"[:300])


def build_command(spec: RunSpec, containment: Containment | None, argv: list[str] | None = None) -> list[str]:
    """argv of a run: [containment | setpriv: no capabilities] python -S -c LAUNCHER <limits> python train.py."""
    address_space = (spec.address_space_mb or 0) * 1024 * 1024
    file_size = spec.file_size_mb * 1024 * 1024
    program = argv or [spec.python, spec.script]
    command = [spec.python, "-S", "-c", _LAUNCHER, str(address_space), str(file_size), *program]
    if not (containment is not None and containment.full) and (setpriv := _drop_capabilities()) is not None:
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
        only=spec.visible,
        tmp_mb=spec.tmp_mb,
        network=spec.network,
    )


@lru_cache(maxsize=1)
def _drop_capabilities() -> tuple[str, ...] | None:
    """`setpriv` that drops every capability and sets no_new_privs, when we run as root; None otherwise."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or not setpriv:
        return None
    return (setpriv, "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--")


def run_training(
    spec: RunSpec,
    emit: EventSink,
    stop: threading.Event | None = None,
    on_start: Callable[[int], None] | None = None,
    containment: Containment | None = None,
    judge: Judges | None = None,
) -> RunResult:
    """Train `train.py` once in a fresh scratch folder under the limits of `spec`, then have the judge score
    the model it exported. Blocks until both end, a limit is hit, or `stop` is set.

    `on_start(pid)` is called once the training process exists (the engine records the pid so a restarted
    engine can clean up after a kill -9). `containment` is normally `containment.probe()`; None runs plainly.
    `judge`: the warm judges to lease one from (None: a judge process per run).
    """
    stop = stop or threading.Event()
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    judge_dir = spec.scratch.with_name(spec.scratch.name + ".judge")
    fresh_folder(spec.scratch)
    for name in (spec.script, *RUN_FILES):
        source = spec.train_source if name == spec.script else None
        if source is None:
            source = read_regular(spec.workspace / name, MAX_SOURCE_BYTES)
        (spec.scratch / name).write_bytes(source)
    env = _run_environment(spec)
    output = CappedOutput(spec, emit)
    contained = containment is not None and containment.full
    try:
        env["AUTORESEARCH_CLOCK_START"] = f"{time.time():.6f}"  # the budget's clock, shared with the run
        training = supervise(
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
            budget=spec.budget if spec.budget.measured_outside else None,
            handover_s=spec.handover_s,
        )
        tail = list(output.tail)
        summary = parse_summary(tail) or {}
        judge_seconds = 0.0
        if training.killed_for:
            verdict = Judged(_KILLED[training.killed_for], None, _kill_reason(spec, training.killed_for))
        elif bad := classify(training.returncode, tail, output.fail_line):
            verdict = bad
        else:
            started = time.monotonic()
            leased = judge.lease() if judge is not None else contextlib.nullcontext()  # a judge of its own
            with leased as warm:
                verdict = judge_handover(spec, judge_dir, env, output, stop, containment, warm)
            judge_seconds = time.monotonic() - started
            summary["judge_seconds"] = round(judge_seconds, 2)  # a child's judge deadline is ten times it
            summary.update({k: verdict.measured[k] for k in SHOWN_MEASURES if k in verdict.measured})
            shown = verdict.val_bpb if verdict.val_bpb is not None else f"invalid ({verdict.reason[:60]})"
            summary["val_bpb"] = shown
    finally:
        output.close()
        for folder in (spec.scratch, judge_dir):
            remove_tree(folder)
    summary.pop("other_load", None)  # measured here only: never what the run printed
    if training.other_load is not None:
        summary["other_load"] = round(training.other_load, 2)
    if training.budget_spent is not None:
        summary["budget_spent"] = round(training.budget_spent, 2)
    if training.told_s is not None:  # measured here, not claimed: its start to the stop, then to its exit
        summary["training_seconds"] = round(training.told_s, 1)
        if not training.killed_for:
            summary["handover_seconds"] = round(max(0.0, training.seconds - training.told_s), 2)
    peak = summary.get("peak_memory_mb") if spec.device_memory_from_summary else None
    peak_memory_mb = float(peak) if isinstance(peak, float) else (training.peak_rss / 2**20 or None)
    if peak_memory_mb is not None:
        summary["peak_memory_mb"] = round(peak_memory_mb, 1)
    return RunResult(
        outcome=verdict.outcome,
        val_bpb=verdict.val_bpb,
        reason=verdict.reason,
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
        killed_for=training.killed_for,
    )


_KILLED = {
    "interrupted": Outcome.INTERRUPTED,
    "timeout": Outcome.TIMEOUT,
    "oom": Outcome.OOM,
    "disk": Outcome.INVALID,
    "overrun": Outcome.INVALID,
}
"""The outcome of a run killed from outside, by why (`process.Ended.killed_for`)."""


def _kill_reason(spec: RunSpec, killed_for: str) -> str:
    return {
        "interrupted": "stopped by the user",
        "timeout": f"killed at the {spec.deadline_s:.0f} s deadline",
        "oom": f"resident memory above the {spec.memory_mb} MB cap",
        "disk": f"the run's folder grew past the {spec.scratch_cap_mb} MB cap",
        "overrun": f"still running {spec.handover_s:.1f} s after its budget was spent: a run must stop when told "
        "and hand over its model (the window: twice the baseline's hand-over, at least "
        f"{HANDOVER_MIN_S:.0f} s)",
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
    env.update(private_caches(spec.scratch))
    env["AUTORESEARCH_BUDGET"] = spec.budget.text  # the one place a budget becomes a string again
    return env
