"""One machine's place for runs: it turns the engine's `RunRequest` into a contained, judged run here.

What it knows is this machine's: how far runs can be contained (probed once), the data prepared for runs and
the files they must not read (once, at the first run: a machine that never trains never prepares), the warm
judges (one per run judged at once), memory limits from this machine's RAM, the deadline from the budget and
this device, the frozen harness's hashes, and the probes that settle a crash or a no-op in seconds. The local
trainers keep one for their slots; a Ray node builds the same for the runs it is sent (`agent.trainers.ray`).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import psutil

from agent import paths
from agent.config import EngineConfig, detect_device
from agent.events import EngineError, EventSink
from agent.sandbox.containment import Containment, in_sight
from agent.sandbox.containment import probe as probe_containment
from agent.sandbox.judging import JudgePool, Prepared, WarmJudge, named_corpus, prepare_for_runs
from agent.sandbox.probe import Probe, ProbeCache, Prober, settle_by_probe
from agent.sandbox.runner import run_training
from agent.sandbox.spec import RunRequest, RunResult, RunSpec, handover_window, judge_deadline

PROBE_GRACE_S = 10.0
"""A probe's deadline: the run's budget (its few steps must fit in it, or the run would not train either) ..."""
PROBE_MIN_DEADLINE_S = 15.0
"""... plus this for start-up and the hand-over, at least this in all (never more than the run's deadline)."""

Prepare = Callable[["Sandbox"], Prepared]
"""How a sandbox prepares the data for runs and learns what they may and must not read (a Ray node's is shared
by its workers, behind a file lock)."""


class Sandbox:
    """Runs on this machine, from a harness folder: each request trained in `scratch_root`, contained, judged."""

    def __init__(
        self,
        *,
        harness: Path,
        harness_hashes: Mapping[str, str] | None,
        scratch_root: Path,
        config: EngineConfig,
        env: Mapping[str, str],
        emit: EventSink,
        python: str | None = None,
        containment_cap: str | None = None,
        warm_judge: bool | None = None,
        log_root: Path | None = None,
        prepare: Prepare | None = None,
        warn_partial: bool = True,
    ) -> None:
        """`harness`: the folder with the frozen harness (prepare.py, corpus.py, metric.py), whose SHA-256s recorded at init
        are `harness_hashes` (by file name; None: unchecked); `env`: the profile's environment for runs; `emit`:
        for what the sandbox itself says (partial containment, preparing the data). `containment_cap` weakens the
        containment probed here; `log_root` keeps logs there instead of at each request's `log_path` (a Ray node
        ships them back)."""
        self.harness, self.harness_hashes = harness, harness_hashes
        self.scratch_root = scratch_root
        self.config = config
        self.device = detect_device()
        self.cuda = self.device.startswith("cuda")
        self.cache = paths.cache_dir()
        self.env = {"AUTORESEARCH_CACHE": str(self.cache), **env}
        self.python = python or config.python or sys.executable
        self.log_root = log_root
        self.emit = emit
        self._cap = containment_cap
        self._warn_partial = warn_partial
        self._warm = config.warm_judge if warm_judge is None else warm_judge
        self._prepare = prepare or _prepare_here
        self._lock = threading.RLock()  # preparing the data asks for the containment
        self._containment: Containment | None = None
        self._prepared: Prepared | None = None
        self._judges: JudgePool | None = None
        self.probes = ProbeCache()
        self.can_probe = config.probe if config.probe is not None else not self.cuda
        """Whether a candidate's first run is probed here first (off on CUDA: each probe would pay
        torch.compile)."""

    @property
    def containment(self) -> Containment:
        """How runs are contained here (probed once); says so once when it is less than full."""
        with self._lock:
            if self._containment is None:
                self._containment = probe_containment().capped(self._cap)
                if self._containment.level != "full" and self._warn_partial:
                    self.emit(
                        EngineError(
                            message=f"runs are contained only partly: {self._containment.summary}",
                            detail=self._containment.detail
                            or "Linux mount, PID and network namespaces (root or unprivileged user namespaces) "
                            "contain a run fully; see the README's threat model",
                        )
                    )
            return self._containment

    def prepared(self) -> Prepared:
        """The data prepared for runs, and what they must not read (once, at the first run)."""
        with self._lock:
            if self._prepared is None:
                self._prepared = self._prepare(self)
            return self._prepared

    def data_env(self) -> dict[str, str]:
        """What tells runs and judges where the prepared data is (they need not find, nor see, the corpus)."""
        data = self.prepared().data
        return {"AUTORESEARCH_DATA": str(data)} if data is not None else {}

    def judges(self) -> JudgePool | None:
        """The warm judges (each started when first needed), or None to start a judge per run."""
        containment = self.containment
        with self._lock:
            if self._judges is None and self._warm:
                self._judges = JudgePool(
                    lambda root: WarmJudge(
                        self.harness,
                        root,
                        python=self.python,
                        env={**self.env, **self.data_env()},
                        containment=containment,
                        readable=(self.cache,),
                        harness_hashes=self.harness_hashes,
                    ),
                    self.scratch_root,
                )
            return self._judges

    def deadline(self, request: RunRequest) -> float:
        """Seconds from a run's start to its kill: training (an estimated budget allows for what the baseline
        measured, times `compute_budget_factor`), then start-up and evaluation, then grace."""
        config = self.config
        if config.deadline_s is not None:
            return config.deadline_s
        seconds, estimated = request.budget.estimate_seconds()
        if estimated:
            seconds = max(seconds, request.observed_training_s or 0.0) * config.compute_budget_factor
        eval_s = config.eval_s if config.eval_s is not None else (240.0 if self.cuda else 60.0)
        return seconds + eval_s + config.grace_s

    def probe_deadline(self, request: RunRequest) -> float:
        """Seconds a probe of `request` may take: its few steps must fit in the run's budget, so a candidate that
        spins, sleeps or floods its output is settled within the budget and PROBE_GRACE_S."""
        seconds, _estimated = request.budget.estimate_seconds()
        return min(self.deadline(request), max(PROBE_MIN_DEADLINE_S, seconds + PROBE_GRACE_S))

    def limits(self) -> tuple[int, int | None]:
        """Resident memory (MB) and address space (MB, None: unlimited) of a run, from this machine's RAM."""
        total_mb = psutil.virtual_memory().total // 2**20
        memory = self.config.memory_mb or int(total_mb * 0.8)
        if self.config.address_space_mb is not None:
            return memory, self.config.address_space_mb or None
        return memory, None if self.cuda else int(total_mb * 2)

    def spec(self, request: RunRequest, tag: str = "", env: Mapping[str, str] | None = None) -> RunSpec:
        """The recipe of `request` on this machine; `tag` sets its folder apart (a Ray run's token)."""
        name = f"{request.exp_id}-{request.n}" + (f"-{tag}" if tag else "")
        log_path = self.log_root / f"{name}.log" if self.log_root is not None else request.log_path
        memory, address = self.limits()
        prepared = self.prepared()
        return RunSpec(
            workspace=self.harness,
            scratch=self.scratch_root / name,
            exp_id=request.exp_id,
            seed=request.seed,
            log_path=log_path,
            deadline_s=self.deadline(request),
            budget=request.budget,
            handover_s=handover_window(
                self.config.handover_s or (60.0 if self.cuda else 10.0), request.observed_handover_s
            ),
            judge_deadline_s=judge_deadline(request.parent_judge_s),
            memory_mb=memory,
            address_space_mb=address,
            hidden=prepared.hidden,
            readable=self._readable(prepared),
            visible=in_sight(self.python, apart=self.harness) if self.containment.full else None,
            harness_hashes=self.harness_hashes,
            log_cap_bytes=self.config.log_cap_bytes,
            network=self.config.network,
            python=self.python,
            env={**self.env, **self.data_env(), **(env or {})},
            device_memory_from_summary=self.cuda,
            train_source=request.train_source.encode("utf-8"),
        )

    def _readable(self, prepared: Prepared) -> tuple[Path, ...]:
        """What of the host a run reads besides its folder: the prepared data; for a workspace whose harness predates
        AUTORESEARCH_DATA (it finds its data from the corpus), the cache and a corpus the user named."""
        if prepared.data is not None:
            return prepared.readable
        corpus = named_corpus({**os.environ, **self.env})
        return (self.cache, *([corpus] if corpus is not None else []))

    def run(
        self,
        request: RunRequest,
        emit: EventSink,
        stop: threading.Event,
        on_start: Callable[[int], None] | None = None,
        *,
        tag: str = "",
        env: Mapping[str, str] | None = None,
    ) -> RunResult:
        """Train `request` here (probed first when it asks and this machine probes) and have it judged."""
        spec = self.spec(request, tag, env)
        containment, judge = self.containment, self.judges()
        if request.probe_against is not None and self.can_probe:
            settled = settle_by_probe(
                replace(spec, deadline_s=self.probe_deadline(request)),
                request.probe_against,
                Prober(self.probes, stop, on_start, containment, judge),
                emit,
            )
            if settled is not None:
                return settled
        return run_training(spec, emit, stop=stop, on_start=on_start, containment=containment, judge=judge)

    def trial(self, request: RunRequest, stop: threading.Event) -> Probe:
        """The probe `request`'s first run would make, made now for its proposer (does it run at all?) and kept
        in the probe cache, so that the run that follows does not probe it again. Nothing of it is shown.

        A crash counts only where the parent (`request.probe_against`, probed once) trains its probe steps: a
        kept train.py that crashes when it sees it is probed would otherwise make every child's trial crash."""
        spec = replace(self.spec(request, "trial"), deadline_s=self.probe_deadline(request))
        prober = Prober(self.probes, stop, None, self.containment, self.judges())
        found = prober(spec)
        parent = request.probe_against
        if found.settles and parent is not None:
            parent_spec = replace(
                spec,
                scratch=spec.scratch.with_name(f"{spec.scratch.name}-parent"),
                log_path=spec.log_path.with_name("parent.log"),
                train_source=parent.train_source.encode("utf-8"),
            )
            if not prober.crashed(found, parent_spec):
                why = f"its parent #{parent.exp_id} crashes in a probe too"
                return replace(found, outcome="inconclusive", reason=why)
        return found

    def close(self) -> None:
        """Stop the warm judges."""
        with self._lock:
            judges, self._judges = self._judges, None
        if judges is not None:
            judges.close()


def _prepare_here(sandbox: Sandbox) -> Prepared:
    """Build the data cache with the frozen harness, outside any run, once per sandbox."""
    return prepare_for_runs(
        sandbox.harness,
        sandbox.scratch_root,
        python=sandbox.python,
        env=sandbox.env,
        containment=sandbox.containment,
        emit=sandbox.emit,
        harness_hashes=sandbox.harness_hashes,
    )
