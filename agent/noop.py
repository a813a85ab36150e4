"""No wasted runs: a static check that an edit cannot change the computation, and a few-step seeded probe
whose fingerprint (the exported model's logits, bit for bit) says whether a candidate computes what its parent
does, or crashes, in seconds instead of a run.

The engine asks `static_noop(parent, candidate)` first (milliseconds: same syntax tree once comments,
docstrings, spelling of values and unused definitions are set aside). Otherwise it probes the candidate
(`probe`): K optimizer steps of the real train.py on the real harness, contained like a run, with the budget's
clock made of steps so that the same code gives the same numbers; the clean judge hashes the exported model's
logits on a fixed input. A probe that crashed (`Probe.settles`) is the experiment's outcome already. Otherwise
the parent's probe (same seed and environment; once per parent: `ProbeCache`, `probe_key`) and
`same_computation` say whether it is a no-op; anything else (no fingerprint, a timeout) means: train it.

A probe sees K steps only: a change whose effect starts later (a branch on the step number, a clip threshold
the first gradients do not reach) reads as the same computation. The K steps sample the whole learning-rate
schedule (see `prepare.Budget`), so changes to warm-up, decay and cool-down are seen.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import io
import operator
import threading
import time
import tokenize
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.containment import Containment
from agent.events import Event, EventSink
from agent.runner import (
    HARNESS_FILE,
    MAX_SOURCE_BYTES,
    HarnessChanged,
    RunSpec,
    UnsafeFile,
    WarmJudge,
    frozen_harness,
    read_regular,
    run_training,
)

PROBE_STEPS = 4
"""Optimizer steps of a probe: the schedule at 0, 1/3, 2/3 and its end; each costs ~0.1 s on the default model."""
PROBE_STEPS_ENV = "AUTORESEARCH_PROBE_STEPS"
"""The harness's probe knob (nanogpt/prepare.py): set by the runner's environment only, never the run's."""
_CONTAINMENT_FAILED = "the run's containment could not be set up"
"""The runner's reason for a crash before anything ran (agent/runner.py `classify`): not the code's fault."""


# ------------------------------------------------------------------------------------------------ static


def static_noop(parent_text: str, new_text: str) -> str | None:
    """Why the new train.py cannot compute anything the parent does not, or None when it may.

    Equal once comments and formatting (the syntax tree), docstrings and bare constants, how a value is written
    (`1e-3` and `0.001`; `2 * 64` and `128`) and module-level constants or plain functions nothing reads are set
    aside. A file that does not parse is never a no-op (the run's crash is its result).
    """
    if parent_text == new_text:
        return "no-op: train.py is unchanged"
    try:
        parent, new = ast.parse(parent_text), ast.parse(new_text)
    except (SyntaxError, ValueError):
        return None
    if ast.dump(parent) == ast.dump(new):
        if respelled := _respelled(parent_text, new_text):
            return f"no-op: the same values written differently ({respelled})"
        return "no-op: only comments or formatting changed"
    parent, new = _StripDocstrings().visit(parent), _StripDocstrings().visit(new)
    if ast.dump(parent) == ast.dump(new):
        return "no-op: only docstrings, comments or formatting changed"
    parent, new = _FoldConstants().visit(parent), _FoldConstants().visit(new)
    if ast.dump(parent) == ast.dump(new):
        respelled = _respelled(parent_text, new_text)
        return "no-op: the same values written differently" + (f" ({respelled})" if respelled else "")
    parent_dead, new_dead = _unused_definitions(parent), _unused_definitions(new)
    if _dump_without(parent, parent_dead) == _dump_without(new, new_dead):
        changed = sorted(
            name
            for name in parent_dead.keys() | new_dead.keys()
            if parent_dead.get(name, (None, ""))[1] != new_dead.get(name, (None, ""))[1]
        )
        return f"no-op: only definitions nothing reads changed ({', '.join(changed)})"
    return None


def _code_tokens(text: str) -> list[tokenize.TokenInfo]:
    """The tokens that are code: no comments, no line breaks or indentation (the syntax trees hold those)."""
    layout = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    try:
        return [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type not in layout]
    except (tokenize.TokenError, SyntaxError):
        return []


def _respelled(parent_text: str, new_text: str, most: int = 3) -> str:
    """'1e-3 for 0.001, …': the literals written differently, where one token replaces one token."""
    old, new = _code_tokens(parent_text), _code_tokens(new_text)
    matcher = difflib.SequenceMatcher(None, [t.string for t in old], [t.string for t in new], autojunk=False)
    pairs = [
        f"{new[j1].string} for {old[i1].string}"
        for tag, i1, i2, j1, j2 in matcher.get_opcodes()
        if tag == "replace" and i2 - i1 == j2 - j1 == 1 and old[i1].type in (tokenize.NUMBER, tokenize.STRING)
    ]
    return ", ".join(pairs[:most]) + (", …" if len(pairs) > most else "")


class _StripDocstrings(ast.NodeTransformer):
    """Drops statements that do nothing: a bare constant (a docstring, `...`) and `pass` beside others."""

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        for name in ("body", "orelse", "finalbody"):
            body = getattr(node, name, None)
            if isinstance(body, list) and body and all(isinstance(s, ast.stmt) for s in body):
                kept = [s for s in body if not _does_nothing(s)]
                setattr(node, name, kept or ([ast.Pass()] if name == "body" else []))
        return node


def _does_nothing(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Pass) or (
        isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
    )


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _number(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int | float | complex)
        and not isinstance(node.value, bool)
    )


class _FoldConstants(ast.NodeTransformer):
    """Arithmetic on number literals replaced by its value, as Python computes it (`2 * 64` -> `128`)."""

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        op = _BINARY.get(type(node.op))
        if op is None or not (_number(node.left) and _number(node.right)):
            return node
        left, right = node.left.value, node.right.value  # type: ignore[attr-defined]
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 2**64):
            return node  # no huge numbers from a proposal
        try:
            value = op(left, right)
        except (ArithmeticError, ValueError):
            return node
        return ast.Constant(value=value)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        op = _UNARY.get(type(node.op))
        if op is None or not _number(node.operand):
            return node
        return ast.Constant(value=op(node.operand.value))  # type: ignore[attr-defined]


_DYNAMIC_NAMES = frozenset({"globals", "vars", "locals", "eval", "exec", "getattr", "__import__", "compile"})


def _unused_definitions(tree: ast.Module) -> dict[str, tuple[list[ast.stmt], str]]:
    """Module-level definitions nothing reads, whose running cannot fail or act: `NAME = <literal>` and plain
    functions (no decorators, annotations or non-literal defaults). By name: the statements and their dump.
    None at all when the file may read its globals by name (globals(), getattr, eval, sys.modules, …)."""
    read: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if node.id in _DYNAMIC_NAMES:
                return {}
            if not isinstance(node.ctx, ast.Store):
                read.add(node.id)
        elif isinstance(node, ast.Attribute) and (
            node.attr == "__dict__"
            or (node.attr == "modules" and isinstance(node.value, ast.Name) and node.value.id == "sys")
        ):
            return {}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            modules = (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            )
            if any(m.split(".")[0] in ("__main__", "inspect") for m in modules):
                return {}
        elif isinstance(node, ast.Global | ast.Nonlocal):
            read.update(node.names)
    found: dict[str, tuple[list[ast.stmt], str]] = {}
    for statement in tree.body:
        name = _pure_definition(statement)
        if name is not None and name not in read:
            statements, dump = found.get(name, ([], ""))
            found[name] = ([*statements, statement], dump + ast.dump(statement))
    return found


def _pure_definition(statement: ast.stmt) -> str | None:
    """The name a statement defines, if running it can only bind that name."""
    if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
        target = statement.targets[0]
        if isinstance(target, ast.Name) and _literal(statement.value):
            return target.id
    if (
        isinstance(statement, ast.AnnAssign)
        and isinstance(statement.target, ast.Name)
        and statement.value is not None
        and _literal(statement.value)
        and _literal(statement.annotation, names=True)
    ):
        return statement.target.id
    if isinstance(statement, ast.FunctionDef) and not statement.decorator_list and statement.returns is None:
        args = statement.args
        every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
        defaults = [*args.defaults, *(d for d in args.kw_defaults if d is not None)]
        if all(a is None or a.annotation is None for a in every) and all(_literal(d) for d in defaults):
            return statement.name
    return None


def _literal(node: ast.expr, names: bool = False) -> bool:
    """A literal (numbers, strings, tuples, lists, sets, dicts of them): evaluating it cannot fail or act."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return all(_literal(e, names) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None and _literal(k, names) for k in node.keys) and all(
            _literal(v, names) for v in node.values
        )
    return names and isinstance(node, ast.Name) and node.id in ("int", "float", "str", "bool")


def _dump_without(tree: ast.Module, dead: dict[str, tuple[list[ast.stmt], str]]) -> str:
    drop = {id(s) for statements, _ in dead.values() for s in statements}
    return ast.dump(ast.Module(body=[s for s in tree.body if id(s) not in drop], type_ignores=[]))


# ------------------------------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class Probe:
    """How a probe of a train.py ended, and its fingerprint when it trained all its steps."""

    outcome: str
    """ok (fingerprint set), crash, nan, oom, timeout, invalid, interrupted, inconclusive (it ran, but there is
    no fingerprint to compare: fewer steps, or train.py handed over no probe claims) or unsupported (the
    workspace's prepare.py predates probes: nothing ran)."""
    fingerprint: str | None
    """SHA-256 (hex) of the exported model's logits on the judge's fixed input, after `steps` steps."""
    reason: str
    """Why it is not ok: the error line of a crash, the judge's or the runner's word."""
    seconds: float
    """Wall seconds of the probe: start-up, the steps, export and the judge."""
    steps: int
    log_tail: str = ""
    log_path: Path | None = None

    @property
    def settles(self) -> bool:
        """The probe crashed the way the full run would (the same code on the same batches): record the crash,
        do not train. Not a NaN: the probe's steps sample the schedule's peak, where the run warms up first;
        not memory: the machine's may be short only for now."""
        return self.outcome == "crash" and not self.reason.startswith(_CONTAINMENT_FAILED)


def probe(
    spec: RunSpec,
    emit: EventSink | None = None,
    *,
    steps: int = PROBE_STEPS,
    stop: threading.Event | None = None,
    on_start: Callable[[int], None] | None = None,
    containment: Containment | None = None,
    judge: WarmJudge | None = None,
) -> Probe:
    """Run `spec` as a probe: `steps` optimizer steps, seeded by `spec.seed`, contained and judged like a run
    (`run_training`: the same folders, log, limits and budget, which only bound it), and fingerprinted.

    Give the parent's probe the same spec but for its train.py (`train_source`), exp_id and paths: the seed,
    budget and environment must match for fingerprints to compare (`probe_key`).
    """
    if steps < 1:
        raise ValueError("a probe takes at least one step")
    started = time.monotonic()
    try:
        harness = frozen_harness(spec.workspace, spec.harness_sha256)
    except (OSError, UnsafeFile, HarnessChanged) as exc:
        return Probe("unsupported", None, f"no harness to probe with: {exc}"[:300], 0.0, steps)
    if PROBE_STEPS_ENV.encode() not in harness:
        return Probe("unsupported", None, f"this workspace's {HARNESS_FILE} predates probes", 0.0, steps)
    result = run_training(
        replace(spec, env={**spec.env, PROBE_STEPS_ENV: str(steps)}),
        emit or _ignore,
        stop=stop,
        on_start=on_start,
        containment=containment,
        judge=judge,
    )
    seconds = time.monotonic() - started
    fingerprint = result.summary.get("fingerprint")
    outcome, reason = result.outcome, result.reason
    if isinstance(fingerprint, str) and fingerprint:
        outcome, reason = "ok", ""
    else:
        fingerprint = None
        if outcome == "ok":
            outcome, reason = (
                "inconclusive",
                "scored, not fingerprinted: train.py handed over no probe claims",
            )
        elif outcome == "invalid" and "no fingerprint" in reason:
            outcome = "inconclusive"
    return Probe(outcome, fingerprint, reason, seconds, steps, result.log_tail, result.log_path)


def _ignore(event: Event) -> None:
    pass


def same_computation(parent: Probe, candidate: Probe, parent_id: int) -> str | None:
    """The experiment's reason when both probes trained the same steps to the same fingerprint, else None."""
    if parent.outcome != "ok" or candidate.outcome != "ok" or parent.steps != candidate.steps:
        return None
    if parent.fingerprint is None or parent.fingerprint != candidate.fingerprint:
        return None
    return f"no-op: same computation as #{parent_id} in {candidate.steps} probe steps"


def probe_key(spec: RunSpec, steps: int = PROBE_STEPS) -> str:
    """What a probe's fingerprint depends on, hashed: train.py, the harness, seed, steps, budget, environment."""
    source = spec.train_source
    if source is None:
        source = read_regular(spec.workspace / spec.script, MAX_SOURCE_BYTES)
    digest = hashlib.sha256(source)
    digest.update(
        repr((spec.harness_sha256, spec.seed, steps, spec.budget, sorted(spec.env.items()))).encode()
    )
    return digest.hexdigest()


class ProbeCache:
    """Probes of parents by `probe_key`: each probed once (while it is asked for twice at the same time, the
    second asker waits for the first); only fingerprinted probes are kept, the newest `size`."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._keys: dict[str, threading.Lock] = {}
        self._probes: OrderedDict[str, Probe] = OrderedDict()

    def get(self, key: str, run: Callable[[], Probe]) -> Probe:
        """The cached probe for `key`, or `run()`'s (kept when it has a fingerprint)."""
        with self._lock:
            key_lock = self._keys.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._probes:
                    self._probes.move_to_end(key)
                    return self._probes[key]
            found = run()
            with self._lock:
                self._keys.pop(key, None)
                if found.fingerprint is not None:
                    self._probes[key] = found
                    while len(self._probes) > self.size:
                        self._probes.popitem(last=False)
            return found
