"""Classical control arms: TPE and CMA-ES from Optuna, proposing whole configurations of train.py's constants.

The search space is read from the constants block of the current best train.py, as random search reads it
(`random_search.read_block`, `movable`): a log scale for rates, decays and 1 - beta, powers of two for
contexts, batches and head sizes, integers for layers, heads and widths (multiples of 16), a choice for
switches; logging and infrastructure constants stay put (`space`). The shipped values are the study's first
trial (the baseline's number, told without a run). Each proposal sets every searched constant to the sampler's
next configuration, as edits of the assignment lines; a configuration that breaks a shape constraint or gives a
train.py already tried is told at once (failed, or the number it already has) and the sampler asked again.

The study lives in the workspace as an ordinary Optuna storage (SQLite, `optuna-dashboard` opens it): each trial
holds the SHA-256 of the train.py it proposed, and is told the engine's judged result when that experiment is
decided (its val_bpb; a crash, timeout, OOM, NaN or invalid run as a failed trial; a no-op the best's number). A
resumed session continues the study; a trial asked but never recorded (a kill -9 in between) is proposed again,
not lost and not repeated.
"""

from __future__ import annotations

import ast
import hashlib
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.edits import EditError, apply_edits, file_hash
from agent.events import EventSink, Info
from agent.proposals import Edit, HistoryRow, Proposal, ProposalContext
from agent.researcher.random_search import (
    BATCH,
    BETA,
    BETAS,
    CLIP,
    CONTEXT,
    COUNT,
    DECAY,
    DROPOUT,
    FRACTION,
    HEAD_SIZE,
    HEADS,
    INTEGER,
    KV_HEADS,
    LAYERS,
    NUMBER,
    RATE,
    ROPE,
    SWITCH,
    WIDTH,
    Block,
    Constant,
    Kind,
    constraint_problems,
    format_float,
    line_edits,
    movable,
    read_block,
    replace_spans,
    sig2,
)

SAMPLERS = {"tpe": "TPE", "cmaes": "CMA-ES"}
"""The samplers, by the name `--proposer` takes, and how they are shown."""
STUDY_FILE = "optuna.sqlite3"
"""The studies' storage, in the workspace's state folder (`Workspace.state_dir`)."""
MAX_ASKS = 200
"""Configurations asked per proposal before the search gives up (each broke a constraint or was tried)."""
RESUMED_SEED_STRIDE = 1_000_003
"""A resumed study's sampler is seeded with --seed + this x its trials so far."""
RANGE = 10.0
"""A log-scale constant is searched within this factor of its shipped value (within its kind's bounds)."""
TOLD = {"crash", "timeout", "oom", "nan", "invalid", "vetoed", "rejected"}
"""Statuses told as a failed trial (vetoed and rejected: the user's or the engine's no)."""


@dataclass(frozen=True)
class Param:
    """One searched parameter: a constant (or one element of a tuple of betas) and how it is searched."""

    name: str
    """The parameter's name in the study: the constant's, `log2(NAME)` or `1-NAME[i]`."""
    constant: Constant
    index: int | None
    """The element of a tuple constant it sets; None: the whole value."""
    distribution: Any
    """An optuna distribution."""
    shipped: Any
    """Its value in train.py now, as the distribution holds it (the shipped value when the study begins)."""
    style: str
    """How the constant was written when the study began (`2e-3`, `0.03`): every trial writes its floats so, and
    the same configuration is the same train.py whatever the best is by then."""

    def written(self, value: Any) -> str:
        """The constant's new text (or its element's) for a value the sampler gave."""
        name = self.name
        if name.startswith("log2("):
            return str(2 ** int(value))
        if name.startswith("1-"):
            return format(1.0 - sig2(float(value)), ".6g")  # 1 - beta, two significant digits: 0.979
        if isinstance(value, bool | int):
            return str(value)
        return format_float(sig2(float(value)), self.style)


def shown_name(sampler: str) -> str:
    """How a sampler is named where a model's name would be (header, model picker, ledger): `TPE (Optuna)`."""
    return f"{SAMPLERS[sampler]} (Optuna)"


def _log_range(value: float, low: float, high: float) -> tuple[float, float]:
    return max(low, value / RANGE), min(high, value * RANGE)


def _param(constant: Constant, kind: Kind) -> list[Param]:
    """The parameters a constant of `kind` is searched as (none where its value leaves no range)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = constant.value
    name = constant.name

    def one(distribution: Any, shipped: Any, pname: str = name, index: int | None = None) -> list[Param]:
        return [Param(pname, constant, index, distribution, shipped, constant.text)]

    if kind is SWITCH:
        return one(CategoricalDistribution([False, True]), bool(value))
    if kind is BETAS:
        assert isinstance(value, tuple)
        found = []
        for i, beta in enumerate(value):
            low, high = _log_range(1.0 - float(beta), 1e-3, 0.5)
            found += one(FloatDistribution(low, high, log=True), 1.0 - float(beta), f"1-{name}[{i}]", i)
        return found
    assert isinstance(value, int | float) and not isinstance(value, bool)
    if kind is BETA:
        low, high = _log_range(1.0 - float(value), 1e-3, 0.5)
        return one(FloatDistribution(low, high, log=True), 1.0 - float(value), f"1-{name}")
    if kind in (DROPOUT, DECAY) or (kind is FRACTION and value == 0):
        high = 0.5 if kind is DROPOUT else 0.2 if kind is FRACTION else min(1.0, max(0.3, 4.0 * float(value)))
        return one(FloatDistribution(0.0, high), float(value))
    if kind in (FRACTION, RATE, CLIP, ROPE, NUMBER):
        bounds = {FRACTION: (1e-3, 0.95), RATE: (1e-6, 1.0), CLIP: (0.05, 20.0), ROPE: (100.0, 1e7)}
        low, high = _log_range(float(value), *bounds.get(kind, (1e-12, 1e12)))
        return one(FloatDistribution(low, high, log=True), float(value)) if low < high else []
    assert isinstance(value, int)
    if kind in (CONTEXT, BATCH, KV_HEADS, HEAD_SIZE):
        if value < 1 or value & (value - 1):
            return []  # not a power of two: left as it is
        exponent = value.bit_length() - 1
        low = {CONTEXT: 3, BATCH: 0, KV_HEADS: 0, HEAD_SIZE: 3}[kind]
        return one(IntDistribution(max(low, exponent - 2), exponent + 2), exponent, f"log2({name})")
    if kind is WIDTH:
        if value % 16:
            return []
        low, high = max(16, value // 4 // 16 * 16), value * 4
        return one(IntDistribution(low, high, step=16), value)
    if kind in (LAYERS, HEADS):
        return one(IntDistribution(1, max(4, 2 * value)), value)
    if kind in (COUNT, INTEGER) and value >= 1:
        return one(IntDistribution(max(1, value // 10), value * 10, log=True), value)
    return []


def space(block: Block, switches: bool = True) -> list[Param]:
    """What is searched of a train.py's constants block, in file order, with ranges around its values. CMA-ES
    leaves the switches as they are (`switches=False`): it has no categorical dimension, and Optuna would draw
    them at random beside it."""
    found = movable(block)
    return [
        param
        for constant, kind in found
        if switches or kind is not SWITCH
        for param in _param(constant, kind)
    ]


def space_key(params: list[Param]) -> str:
    """A short name for a search space: the names it searches (a constant added or removed makes another)."""
    return hashlib.sha256("\n".join(p.name for p in params).encode()).hexdigest()[:12]


def _element_text(param: Param, line: str) -> str:
    """The text the parameter's value has in its line now (a tuple's element, or the whole value)."""
    start, end = param.constant.spans[param.index or 0]
    return line.encode("utf-8")[start:end].decode("utf-8")


class OptunaSearch:
    """A Proposer that proposes the configurations an Optuna sampler (TPE or CMA-ES) asks for, and tells it how
    each one did. `storage` is the SQLite file the study lives in (in the workspace)."""

    def __init__(self, sampler: str, storage: Path, seed: int | None = None) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: one of {', '.join(SAMPLERS)}")
        self.name = sampler
        self.model_name: str | None = shown_name(sampler)
        self.storage, self.seed = storage, seed
        self._lock = threading.Lock()
        self._study: Any = None
        self._key = ""
        self._asked: set[int] = set()
        """Trials this process proposed: one another (dead) process asked and never recorded is asked again."""

    def propose(self, context: ProposalContext, emit: EventSink, cancel: threading.Event) -> Proposal | None:
        """The sampler's next configuration, as edits of context.train_py, after telling it every result the
        engine decided since. None, with a word why, when train.py has nothing to search or MAX_ASKS
        configurations in a row were tried or broke a constraint."""
        with self._lock:
            try:
                block = read_block(context.train_py)
            except SyntaxError as exc:
                emit(Info(message=f"{self.name}: train.py does not parse ({exc.msg}); nothing to search"))
                return None
            params = space(block, switches=self.name != "cmaes")
            if not params:
                emit(Info(message=f"{self.name}: train.py has no constant it can search"))
                return None
            study, params = self._open(params, context, emit)
            decided = {row.train_hash: row for row in context.history if row.train_hash}
            self._tell(study, decided, context.best_bpb)
            check = not constraint_problems(block.values)
            for _ in range(MAX_ASKS):
                if cancel.is_set():
                    return None
                trial = self._next_trial(study, params, set(decided) | context.tried_hashes)
                proposal = self._proposal(study, trial, params, block, context, decided, check)
                if proposal is not None:
                    return proposal
        emit(
            Info(message=f"{self.name}: {MAX_ASKS} configurations in a row were tried or broke a constraint")
        )
        return None

    # ---- the study --------------------------------------------------------------------------------------

    def _open(
        self, params: list[Param], context: ProposalContext, emit: EventSink
    ) -> tuple[Any, list[Param]]:
        """The study for these constants and the parameters with its ranges: the ranges are drawn around the
        values the study began with and kept (a keep moves the values, not the space). A new study begins with
        the current values as its first trial, told the best's number without a run."""
        import optuna
        from optuna.distributions import distribution_to_json, json_to_distribution

        key = space_key(params)
        name = f"{self.name}-{key}"
        if self._study is None or key != self._key:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self.storage.parent.mkdir(parents=True, exist_ok=True)
            storage = f"sqlite:///{self.storage}"
            trials = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}
            # A resumed study's sampler is seeded past its trials: it does not draw its first ones again.
            seed = None if self.seed is None else self.seed + RESUMED_SEED_STRIDE * trials.get(name, 0)
            if self.name == "tpe":
                sampler: Any = optuna.samplers.TPESampler(seed=seed)
            else:
                # CMA-ES starts from the shipped values, not the ranges' middle: x0, deprecated in Optuna 4.9,
                # is kept through 5.x (the version pinned).
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    sampler = optuna.samplers.CmaEsSampler(
                        x0={p.name: p.shipped for p in params}, seed=seed, warn_independent_sampling=False
                    )
            study = optuna.create_study(
                study_name=name, storage=storage, sampler=sampler, load_if_exists=True
            )
            if name not in trials:
                searched = ", ".join(p.name for p in params)
                why = "the constants changed: a new study" if self._key else "a new study"
                emit(Info(message=f"{self.name}: {why} '{name}' in {self.storage} over {searched}"))
                study.set_user_attr("space", {p.name: distribution_to_json(p.distribution) for p in params})
                study.set_user_attr("styles", {p.name: p.style for p in params})
                if context.best_bpb is not None:
                    study.add_trial(
                        optuna.trial.create_trial(
                            params={p.name: p.shipped for p in params},
                            distributions={p.name: p.distribution for p in params},
                            value=context.best_bpb,
                            user_attrs={"train_hash": file_hash(context.train_py)},
                        )
                    )
            self._study, self._key = study, key
        stored, styles = (self._study.user_attrs.get(attr, {}) for attr in ("space", "styles"))
        kept = [
            replace(p, distribution=json_to_distribution(stored[p.name]), style=styles.get(p.name, p.style))
            if p.name in stored
            else p
            for p in params
        ]
        return self._study, kept

    def _tell(self, study: Any, decided: dict[str, HistoryRow], best_bpb: float | None) -> None:
        """Tell every running trial whose experiment the engine decided (`decided`, by train.py hash) its result."""
        from optuna.trial import TrialState

        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            row = decided.get(trial.user_attrs.get("train_hash", ""))
            if row is None or row.status == "interrupted":
                continue  # in flight, waiting, or to run again
            if row.status == "noop" and best_bpb is not None:
                study.tell(trial.number, best_bpb)  # the same computation as the best
            elif row.status in TOLD or row.val_bpb is None:
                study.tell(trial.number, state=TrialState.FAIL)
            else:
                study.tell(trial.number, row.val_bpb)

    def _next_trial(self, study: Any, params: list[Param], known: set[str]) -> Any:
        """A trial asked before and never recorded (its train.py not among the `known` ones: a kill between the
        two), else a new one."""
        import optuna
        from optuna.trial import TrialState

        for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen.number not in self._asked and frozen.user_attrs.get("train_hash") not in known:
                self._asked.add(frozen.number)
                return optuna.trial.Trial(study, frozen._trial_id)
        trial = study.ask({p.name: p.distribution for p in params})
        self._asked.add(trial.number)
        return trial

    def _proposal(
        self,
        study: Any,
        trial: Any,
        params: list[Param],
        block: Block,
        context: ProposalContext,
        decided: dict[str, HistoryRow],
        check: bool,
    ) -> Proposal | None:
        """The trial's configuration as a proposal, or None after telling the study why not (a broken
        constraint: failed; a train.py tried before: its number; the best's own values: the best's number)."""
        from optuna.trial import TrialState

        lines = context.train_py.split("\n")
        per_line: dict[int, list[tuple[tuple[int, int], str]]] = {}
        changed: dict[str, object] = {}
        shown = []
        for p in params:
            text = p.written(trial.params[p.name])
            now = _element_text(p, lines[p.constant.lineno - 1])
            if text == now:
                continue
            span = p.constant.spans[p.index or 0]
            per_line.setdefault(p.constant.lineno, []).append((span, text))
            label = p.constant.name if p.index is None else f"{p.constant.name}[{p.index}]"
            shown.append(f"{label} {now} -> {text}")
            if p.index is None:
                changed[p.constant.name] = ast.literal_eval(text)
        edits: tuple[Edit, ...] = ()
        if not per_line:  # the best's own configuration
            source = context.train_py
        elif check and constraint_problems(block.values_with(changed)):
            study.tell(trial.number, state=TrialState.FAIL)
            return None
        else:
            try:
                edits = line_edits(
                    context.train_py, {n: replace_spans(lines[n - 1], r) for n, r in per_line.items()}
                )
                source = apply_edits(context.train_py, edits)
            except EditError:
                study.tell(trial.number, state=TrialState.FAIL)
                return None
        digest = file_hash(source)
        if digest in context.tried_hashes or not per_line:  # told what it is known to give, not trained again
            row = decided.get(digest)
            value = context.best_bpb if not per_line else row.val_bpb if row is not None else None
            if value is None:
                study.tell(trial.number, state=TrialState.FAIL)
            else:
                study.tell(trial.number, value)
            return None
        trial.set_user_attr("train_hash", digest)
        described = ", ".join(shown)
        return Proposal(
            description=f"{self.name} #{trial.number}: {described}",
            edits=edits,
            reasoning=f"{SAMPLERS[self.name]} (Optuna) trial {trial.number} of study {study.study_name}: {described}.",
            proposer=self.name,
            model=self.model_name,
            seed=self.seed,
            train_py=source,
            base_hash=file_hash(context.train_py),
        )
