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
from agent.events import Event, EventSink, Info
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


def code_key(train_py: str, params: list[Param]) -> str:
    """A short name for the code the constants are searched in: train.py without the searched constants'
    lines. A kept change of searched values keeps it; a kept code change (or a change of a constant not
    searched) makes another, and the study is re-based on the new best."""
    searched = {p.constant.lineno for p in params}
    lines = [line for n, line in enumerate(train_py.split("\n"), start=1) if n not in searched]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:8]


def configured(
    train_py: str, block: Block, params: list[Param], values: Any, check: bool = True
) -> tuple[str, tuple[Edit, ...], list[str]] | None:
    """train.py with each parameter set to `values[name]`: (the new text, the edits, the changes in words, as
    `NAME old -> new`); None when it breaks a shape constraint (`check`) or cannot be written."""
    lines = train_py.split("\n")
    per_line: dict[int, list[tuple[tuple[int, int], str]]] = {}
    changed: dict[str, object] = {}
    shown = []
    for p in params:
        text = p.written(values[p.name])
        now = _element_text(p, lines[p.constant.lineno - 1])
        if text == now:
            continue
        span = p.constant.spans[p.index or 0]
        per_line.setdefault(p.constant.lineno, []).append((span, text))
        shown.append(f"{_label(p)} {now} -> {text}")
        if p.index is None:
            changed[p.constant.name] = ast.literal_eval(text)
    if not per_line:  # the values train.py has
        return train_py, (), []
    if check and constraint_problems(block.values_with(changed)):
        return None
    try:
        edits = line_edits(train_py, {n: replace_spans(lines[n - 1], r) for n, r in per_line.items()})
        return apply_edits(train_py, edits), edits, shown
    except EditError:
        return None


def _element_text(param: Param, line: str) -> str:
    """The text the parameter's value has in its line now (a tuple's element, or the whole value)."""
    start, end = param.constant.spans[param.index or 0]
    return line.encode("utf-8")[start:end].decode("utf-8")


class OptunaSearch:
    """A Proposer that proposes the configurations an Optuna sampler (TPE or CMA-ES) asks for, and tells it how
    each one did. `storage` is the SQLite file the study lives in (in the workspace)."""

    def __init__(
        self, sampler: str, storage: Path, seed: int | None = None, sigma0: float | None = None
    ) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: one of {', '.join(SAMPLERS)}")
        self.name = sampler
        self.model_name: str | None = shown_name(sampler)
        self.storage, self.seed = storage, seed
        self.sigma0 = sigma0
        """CMA-ES's first step size, as a share of each range (None: Optuna's 1/6)."""
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
            ready = self._ready(context, emit)
            if ready is None:
                return None
            study, params, block, decided = ready
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

    def _ready(
        self, context: ProposalContext, emit: EventSink
    ) -> tuple[Any, list[Param], Block, dict[str, HistoryRow]] | None:
        """The study for context.train_py's constants, told every result decided since: (study, parameters,
        block, decided rows by train.py hash); None, said, when there is nothing to search."""
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
        return study, params, block, decided

    def state(self, context: ProposalContext, emit: EventSink, last: int = 10, top: int = 5) -> str:
        """The study as a model reads it (`optimiser_state`); '' when there is nothing to search."""
        with self._lock:
            ready = self._ready(context, emit)
            if ready is None:
                return ""
            study, params, _block, _decided = ready
            return optimiser_state(SAMPLERS[self.name], study, params, last, top)

    def adopt(self, proposal: Proposal, context: ProposalContext) -> bool:
        """Make another proposer's proposal a trial of the study, when it only moves searched constants to
        values inside their ranges: its result is told like the sampler's own (and shown in its state).
        Whether it did."""
        new_text = proposal.train_py
        if new_text is None:
            return False
        try:
            after = read_block(new_text)
        except SyntaxError:
            return False
        with self._lock:
            ready = self._ready(context, _quiet)
            if ready is None:
                return False
            study, params, _block, _decided = ready
            if code_key(new_text, params) != code_key(context.train_py, params):
                return False  # a code change: not a point of this space
            values = {c.name: c.value for c in after.constants}
            fixed = {}
            for param in params:
                value = _internal(param, values.get(param.constant.name))
                if value is None or not param.distribution._contains(
                    param.distribution.to_internal_repr(value)
                ):
                    return False
                fixed[param.name] = value
            study.enqueue_trial(fixed)
            trial = study.ask({p.name: p.distribution for p in params})
            self._asked.add(trial.number)
            trial.set_user_attr("proposer", proposal.proposer)
            trial.set_user_attr("train_hash", file_hash(new_text))
            return True

    # ---- the study --------------------------------------------------------------------------------------

    def _open(
        self, params: list[Param], context: ProposalContext, emit: EventSink
    ) -> tuple[Any, list[Param]]:
        """The study for these constants and the parameters with its ranges: the ranges are drawn around the
        values the study began with and kept (a keep moves the values, not the space). A new study begins with
        the current values as its first trial, told the best's number without a run."""
        import optuna
        from optuna.distributions import distribution_to_json, json_to_distribution

        key = f"{space_key(params)}-{code_key(context.train_py, params)}"
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
                # CMA-ES starts from the shipped values, not the ranges' middle: x0 and sigma0, deprecated in
                # Optuna 4.9, are kept through 5.x (the version pinned).
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    sampler = optuna.samplers.CmaEsSampler(
                        x0={p.name: p.shipped for p in params},
                        sigma0=self.sigma0,
                        seed=seed,
                        warn_independent_sampling=False,
                    )
            study = optuna.create_study(
                study_name=name, storage=storage, sampler=sampler, load_if_exists=True
            )
            if name not in trials:
                searched = ", ".join(p.name for p in params)
                why = "a new study"
                if self._key:
                    same_space = self._key.split("-")[0] == key.split("-")[0]
                    why = (
                        "the code changed (a kept change no constant expresses): a new study from the best"
                        if same_space
                        else "the constants changed: a new study"
                    )
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

        found = configured(context.train_py, block, params, trial.params, check)
        if found is None:
            study.tell(trial.number, state=TrialState.FAIL)
            return None
        source, edits, shown = found
        digest = file_hash(source)
        if digest in context.tried_hashes or not edits:  # told what it is known to give, not trained again
            row = decided.get(digest)
            value = context.best_bpb if not edits else row.val_bpb if row is not None else None
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


def _quiet(event: Event) -> None:
    pass


def _internal(param: Param, value: object) -> Any:
    """A constant's value as its parameter holds it (`Param.written`'s inverse); None where it has none."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if param.index is not None:
        if not isinstance(value, tuple) or len(value) <= param.index:
            return None
        value = value[param.index]
    if isinstance(param.distribution, CategoricalDistribution):
        return value if isinstance(value, bool) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if param.name.startswith("log2("):
        if not isinstance(value, int) or value < 1 or value & (value - 1):
            return None
        return value.bit_length() - 1
    if param.name.startswith("1-"):
        return 1.0 - float(value)
    if isinstance(param.distribution, IntDistribution):
        return value if isinstance(value, int) else None
    return float(value)


def _label(param: Param) -> str:
    return param.constant.name if param.index is None else f"{param.constant.name}[{param.index}]"


def _configuration(trial: Any, params: list[Param]) -> str:
    """The constants a trial sets that differ from train.py now (`shipped`: the best's values), as NAME=value in
    train.py's units."""
    moved = [
        f"{_label(p)}={p.written(trial.params[p.name])}"
        for p in params
        if p.name in trial.params and p.written(trial.params[p.name]) != p.written(p.shipped)
    ]
    return ", ".join(moved) or "the values train.py has now"


def optimiser_state(label: str, study: Any, params: list[Param], last: int = 10, top: int = 5) -> str:
    """What a model is shown of a study, in the constants' own units: per constant the best trial's value,
    where the best quarter of the trials lie and the range searched; the best configurations; the last trials
    with their outcomes (the model's own marked)."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE and t.value is not None), key=lambda t: t.value
    )
    failed = sum(1 for t in trials if t.state == TrialState.FAIL)
    lines = [
        f"# The optimiser's state: {label} (Optuna) over {len(params)} constants of train.py, "
        f"{len(done)} trials scored, {failed} failed (crashed, or broke a shape constraint)"
    ]
    if done:
        quarter = done[: max(top, len(done) // 4)]
        lines.append(
            "Per constant: the best trial's value; the best quarter of the trials (median, low..high); the range searched."
        )
        for p in params:
            values = sorted(t.params[p.name] for t in quarter if p.name in t.params)
            if not values or p.name not in done[0].params:
                continue
            dist = p.distribution
            searched = (
                "/".join(p.written(c) for c in dist.choices)
                if isinstance(dist, CategoricalDistribution)
                else f"{p.written(dist.low)}..{p.written(dist.high)}"
            )
            spread = (
                f"{p.written(values[len(values) // 2])} ({p.written(values[0])}..{p.written(values[-1])})"
            )
            lines.append(
                f"- {_label(p)}: best {p.written(done[0].params[p.name])}; best quarter {spread}; searched {searched}"
            )
        lines.append(
            f"The best {min(top, len(done))} configurations (val_bpb: the values they set that train.py does not have now):"
        )
        lines.extend(f"- {t.value:.4f}: {_configuration(t, params)}" for t in done[:top])
    if trials:
        lines.append(f"The last {min(last, len(trials))} trials, oldest first:")
        for t in trials[-last:]:
            said = (
                f"{t.value:.4f}"
                if t.state == TrialState.COMPLETE and t.value is not None
                else "failed"
                if t.state == TrialState.FAIL
                else "running"
            )
            whose = " (the model's)" if t.user_attrs.get("proposer") not in (None, "tpe", "cmaes") else ""
            lines.append(f"- trial {t.number}{whose}: {said}: {_configuration(t, params)}")
    return "\n".join(lines) + "\n"
