"""The judging client: what a run handed over goes to a clean judge process, whose number is the only score.

The run's claims and exported model are read as small regular files (`handover`) and copied into a folder the run
never saw; there `agent/sandbox/judge.py`, a `python -I` process that imports the workspace's frozen harness
(prepare.py, corpus.py and metric.py, each checked against its recorded SHA-256) and never train.py, and
measures val_bpb (checking causality as it scores). `WarmJudge` keeps one such process per workspace
(torch imported once, a forked child per model), `JudgePool` one per run judged at once. `prepare_for_runs` runs the harness once, outside any run, to
build the data cache and learn which files training must not read.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from agent import paths
from agent.events import EventSink, Info
from agent.sandbox.containment import Containment, contain
from agent.sandbox.handover import (
    HarnessChanged,
    UnsafeFile,
    copy_regular,
    frozen_harness,
    read_json_object,
    write_harness,
)
from agent.sandbox.output import CappedOutput
from agent.sandbox.process import (
    fresh_folder,
    group_rss,
    kill_group,
    private_caches,
    remove_tree,
    scrub_environment,
    supervise,
)
from agent.sandbox.spec import (
    CLAIMS_FILE,
    EXPORT_FILE,
    MAX_CLAIMS_BYTES,
    Outcome,
    PrepareError,
    RunSpec,
)

JUDGE_SCRIPT = Path(__file__).with_name("judge.py")
_CODE = JUDGE_SCRIPT.parent
"""The folder the judge script lives in: kept in sight of contained judges (a checkout under /tmp)."""
SHOWN_MEASURES = ("eval_tokens", "eval_bytes", "num_params", "block_size", "export_seconds", "fingerprint")
"""What the judge measured that a run's summary shows (besides val_bpb; a probe's fingerprint: `probe`)."""


@dataclass(frozen=True)
class Judged:
    """The judge's word on one hand-over: the run's outcome, its val_bpb (ok only) and why not."""

    outcome: Outcome
    val_bpb: float | None = None
    reason: str = ""
    measured: dict[str, Any] = field(default_factory=dict)
    """What the judge measured besides val_bpb (eval tokens and bytes, parameters, a probe's fingerprint)."""

    @classmethod
    def refused(cls, reason: str, outcome: Outcome = Outcome.INVALID) -> Judged:
        return cls(outcome, None, reason[:500])


def judged(result: dict[str, Any]) -> Judged:
    """The verdict in the judge's result file."""
    value = result.get("val_bpb")
    if result.get("status") != "ok" or not isinstance(value, int | float):
        reason = f"the judge refused the model: {result.get('reason') or 'no val_bpb'}"
        return Judged(Outcome.INVALID, None, reason[:500], result)
    if not math.isfinite(value):
        return Judged(Outcome.NAN, None, f"val_bpb is {value}", result)
    return Judged(Outcome.OK, float(value), "", result)


class WarmJudge:
    """The judge kept warm for a workspace: one contained, long-lived `judge.py serve` process that imports torch
    and the frozen harness (`harness_hashes`: each file's SHA-256 recorded at init) once and forks a fresh
    child to score each model, so a run does not pay the judge's start-up (~2 s: torch, the first
    `torch.export.load`). Requests are files in its folder (the only place it may write), the reply one line
    on its stdout. Any trouble (it died, hit the deadline or the memory cap, was stopped) kills it; the next
    score starts a new one. It ends by itself when the engine's end of its stdin closes (the engine exited, or
    was killed)."""

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
        harness_hashes: Mapping[str, str] | None = None,
    ) -> None:
        self.workspace, self.root, self.python = workspace, root, python
        self.harness_hashes = harness_hashes
        self.env, self.containment, self.readable, self.tmp_mb = dict(env), containment, readable, tmp_mb
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()
        """Held while one model is scored: the server answers one request after another (runs in parallel)."""
        self.started = 0
        """How many servers were started (tests and the bench read it)."""

    @contextlib.contextmanager
    def lease(self) -> Iterator[WarmJudge]:
        """This judge, for one model at a time (its server answers one request after another)."""
        with self.lock:
            yield self

    def folder(self, name: str) -> Path:
        """A fresh request folder inside the judge's own."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        folder = self.root / name
        fresh_folder(folder)
        return folder

    def _start(self) -> None:
        self.close()
        fresh_folder(self.root)
        write_harness(frozen_harness(self.workspace, self.harness_hashes), self.root)
        argv = [self.python, "-I", str(JUDGE_SCRIPT), "serve", str(self.root)]
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
        env = scrub_environment(os.environ) | self.env | private_caches(self.root) | {"PYTHONUNBUFFERED": "1"}
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
            if memory_mb is not None and group_rss(proc.pid, known) > memory_mb * 2**20:
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


class Judges(Protocol):
    """Where a run's model is judged: `lease()` lends a warm judge for one model (a `WarmJudge`, or a
    `JudgePool`'s)."""

    def lease(self) -> contextlib.AbstractContextManager[WarmJudge]: ...


class JudgePool:
    """Warm judges for the runs of one machine, one per model judged at once: a run leases one for its hand-over,
    so a model slow to score holds its own judge, never the verdicts of the other trainers. A judge is started
    when every one is busy (folders `judge`, `judge-2`, ...) and kept warm for the next run."""

    def __init__(self, make: Callable[[Path], WarmJudge], root: Path) -> None:
        self._make, self._root = make, root
        self._lock = threading.Lock()
        self._idle: list[WarmJudge] = []
        self._all: list[WarmJudge] = []
        self._closed = False

    @contextlib.contextmanager
    def lease(self) -> Iterator[WarmJudge]:
        with self._lock:
            if self._idle:
                judge = self._idle.pop()
            else:
                name = "judge" if not self._all else f"judge-{len(self._all) + 1}"
                judge = self._make(self._root / name)
                self._all.append(judge)
        try:
            with judge.lease():
                yield judge
        finally:
            with self._lock:
                closed = self._closed
                if not closed:
                    self._idle.append(judge)
            if closed:
                judge.close()

    @property
    def started(self) -> int:
        """How many judge servers were started, in all (tests and the bench read it)."""
        with self._lock:
            return sum(judge.started for judge in self._all)

    def close(self) -> None:
        """Stop the idle judges; a leased one stops when its run gives it back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for judge in idle:
            judge.close()


def judge_handover(
    spec: RunSpec,
    judge_dir: Path,
    env: dict[str, str],
    output: CappedOutput,
    stop: threading.Event,
    containment: Containment | None,
    warm: WarmJudge | None = None,
) -> Judged:
    """Collect what the run handed over (claims, exported model) as regular files, and have the judge score it
    in a folder the run never saw (the warm judge's, if there is one)."""
    if warm is not None:
        try:
            judge_dir = warm.folder(spec.scratch.name)
        except HarnessChanged as exc:
            return Judged.refused(f"not judged: {exc}")
    else:
        fresh_folder(judge_dir)
    scratch_fd = os.open(spec.scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        claims = read_json_object(Path(CLAIMS_FILE), MAX_CLAIMS_BYTES, dir_fd=scratch_fd)
        if claims.get("export", "ok") != "ok":
            return Judged.refused(f"the model could not be exported: {str(claims['export'])[:300]}")
        copy_regular(Path(EXPORT_FILE), judge_dir / EXPORT_FILE, spec.model_cap_mb * 2**20, scratch_fd)
    except FileNotFoundError as exc:
        missing = Path(exc.filename or "").name or "a file"
        return Judged.refused(f"the run left no {missing}: train.py must end with evaluate_and_report")
    except (UnsafeFile, ValueError, UnicodeDecodeError) as exc:
        return Judged.refused(f"the run's hand-over is refused: {exc}"[:300])
    finally:
        os.close(scratch_fd)
    claims["judge_deadline_s"] = spec.judge_deadline_s  # the engine's word, not the run's
    (judge_dir / CLAIMS_FILE).write_text(json.dumps(claims), encoding="utf-8")
    out = judge_dir / "result.json"
    if warm is not None:
        code, trouble = warm.score(judge_dir, spec.judge_deadline_s, stop, spec.memory_mb)
        try:
            if trouble == "interrupted":
                return Judged.refused("the judge was stopped", Outcome.INTERRUPTED)
            if trouble:
                return Judged.refused(trouble)
            verdict = _verdict(out, claims, code, output)
            output.prefix = "[judge] "  # the warm judge's own lines go to its log: say the verdict here
            line = f"{verdict.outcome} val_bpb {verdict.val_bpb} {verdict.reason}".rstrip()
            output.feed(line.encode() + b"\n", eof=True)
            return verdict
        finally:
            remove_tree(judge_dir)
    # The harness the judge imports is the workspace's frozen copy (hashes checked), never one the run could edit.
    try:
        write_harness(frozen_harness(spec.workspace, spec.harness_hashes), judge_dir)
    except HarnessChanged as exc:
        return Judged.refused(f"not judged: {exc}")
    argv = [
        spec.python,
        "-I",
        str(JUDGE_SCRIPT),
        "score",
        str(judge_dir),
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
    ended = supervise(
        argv,
        cwd=judge_dir,
        env=env | private_caches(judge_dir),
        output=output,
        stop=stop,
        deadline_s=spec.judge_deadline_s,
        memory_mb=spec.memory_mb,
        contained=containment is not None and containment.full,
    )
    if ended.killed_for == "interrupted":
        return Judged.refused("the judge was stopped", Outcome.INTERRUPTED)
    if ended.killed_for:
        return Judged.refused(f"the judge hit its {ended.killed_for}")
    return _verdict(out, claims, ended.returncode, output)


def _verdict(out: Path, claims: dict[str, Any], exit_code: int | None, output: CappedOutput) -> Judged:
    """The verdict in the judge's result file (what it measured included)."""
    try:
        result = read_json_object(out, MAX_CLAIMS_BYTES)
    except (OSError, UnsafeFile, ValueError, UnicodeDecodeError) as exc:
        last = next((line.strip() for line in reversed(output.tail) if line.strip()), "")
        return Judged.refused(f"the judge failed (exit {exit_code}): {last or exc}"[:300])
    if isinstance(claims.get("export_seconds"), int | float):
        result["export_seconds"] = claims["export_seconds"]  # the run's word: shown, never decisive
    return judged(result)


@dataclass(frozen=True)
class Prepared:
    """The data prepared for runs: its folder (what runs and judges load: AUTORESEARCH_DATA), what of the cache
    a run reads (that folder, the CPU's measured peak), and the paths training must not read (the validation
    split, the corpus). A harness that does not say where its data is (`data` None) has its runs see the cache."""

    data: Path | None
    hidden: tuple[Path, ...]
    readable: tuple[Path, ...] = ()

    @classmethod
    def from_told(cls, told: Mapping[str, Any]) -> Prepared:
        """What `judge.py prepare` (or a node's record of it: `told`) wrote, as JSON."""
        data = told.get("data")
        hidden, readable = (
            tuple(Path(p) for p in told.get(key, []) if isinstance(p, str)) for key in ("hidden", "readable")
        )
        return cls(Path(data) if isinstance(data, str) and data else None, hidden, readable)

    def told(self) -> dict[str, Any]:
        """As JSON, for `from_told`."""
        return {
            "data": str(self.data) if self.data is not None else None,
            "hidden": [str(p) for p in self.hidden],
            "readable": [str(p) for p in self.readable],
        }


def named_corpus(env: Mapping[str, str]) -> Path | None:
    """The corpus the user named (AUTORESEARCH_CORPUS in `env`), where it exists."""
    corpus = Path(env.get("AUTORESEARCH_CORPUS") or "").expanduser()
    return corpus if corpus.name and corpus.exists() else None


def prepare_for_runs(
    workspace: Path,
    scratch_root: Path,
    *,
    python: str,
    env: Mapping[str, str],
    containment: Containment | None,
    emit: EventSink,
    harness_hashes: Mapping[str, str] | None = None,
    timeout_s: float = 1800.0,
) -> Prepared:
    """Run the workspace's frozen harness (its files checked against `harness_hashes`) once, outside any run, to
    build the data cache (the only time the cache is written) and measure what the harness needs. It sees the
    corpus (AUTORESEARCH_CORPUS) wherever it is, even under /tmp; training will not."""
    folder = scratch_root / "prepare"
    fresh_folder(folder)
    try:
        try:
            write_harness(frozen_harness(workspace, harness_hashes), folder)
        except HarnessChanged as exc:
            raise PrepareError(str(exc)) from None
        cache = Path(env.get("AUTORESEARCH_CACHE") or paths.cache_dir())
        cache.mkdir(parents=True, exist_ok=True)
        env = {**env, "AUTORESEARCH_CACHE": str(cache)}
        out = folder / "prepared.json"
        argv = [python, "-I", str(JUDGE_SCRIPT), "prepare", str(folder), str(out)]
        full_env = scrub_environment(os.environ) | dict(env) | {"PYTHONUNBUFFERED": "1"}
        if containment is not None:  # the user's corpus stays in sight wherever it is (under /tmp too)
            corpus = named_corpus(full_env)
            seen = [_CODE, *([corpus] if corpus is not None else [])]
            argv = contain(argv, containment, cwd=folder, writable=[folder, cache], readable=seen)
        proc = subprocess.run(
            argv, cwd=folder, env=full_env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        for line in proc.stderr.splitlines():
            if line.startswith("[prepare]"):
                emit(Info(message=line))
        if proc.returncode != 0:
            lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
            raise PrepareError(lines[-1] if lines else f"exit code {proc.returncode}")
        return Prepared.from_told(read_json_object(out, MAX_CLAIMS_BYTES))
    except subprocess.TimeoutExpired:
        raise PrepareError(f"preparing the data took over {timeout_s:.0f} s") from None
    finally:
        remove_tree(folder)
