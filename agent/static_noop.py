"""No wasted runs, statically: whether an edit cannot change the computation, in milliseconds.

Equal once comments and formatting (the syntax tree), docstrings and bare constants, how a value is written
(`1e-3` and `0.001`; `2 * 64` and `128`) and module-level constants or plain functions nothing reads are set
aside: such a candidate is recorded as a no-op instead of trained. What this cannot see, a probe may
(`agent.sandbox.probe`: a few seeded steps whose fingerprint is compared with the parent's).
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import io
import tokenize

from agent.trainpy import Number, assignment, evaluate


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


def normal_form(text: str) -> str | None:
    """A train.py's identity once comments, formatting, docstrings, how values are written and definitions
    nothing reads are set aside (what `static_noop` sets aside), as a SHA-256; None when it does not parse.
    Two files with the same normal form compute the same thing: the second is the first experiment again."""
    try:
        tree = _FoldConstants().visit(_StripDocstrings().visit(ast.parse(text)))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    return hashlib.sha256(_dump_without(tree, _unused_definitions(tree)).encode()).hexdigest()


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


class _FoldConstants(ast.NodeTransformer):
    """Arithmetic on number literals replaced by its value, as Python computes it (`2 * 64` -> `128`)."""

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        return _folded(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        return _folded(node)


def _folded(node: ast.BinOp | ast.UnaryOp) -> ast.AST:
    """The node's value as a literal where its operands are literals (folded already), else the node."""
    operands = (node.left, node.right) if isinstance(node, ast.BinOp) else (node.operand,)
    if not all(isinstance(operand, ast.Constant) for operand in operands):
        return node  # an operand that did not fold: this cannot either
    try:
        value = evaluate(node)
    except ValueError:
        return node
    return ast.Constant(value=value) if isinstance(value, Number) else node


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
    if (assigned := assignment(statement)) is not None:
        name, value = assigned
        annotation = statement.annotation if isinstance(statement, ast.AnnAssign) else None
        if _inert(value) and (annotation is None or _inert(annotation, names=True)):
            return name
    if isinstance(statement, ast.FunctionDef) and not statement.decorator_list and statement.returns is None:
        args = statement.args
        every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
        defaults = [*args.defaults, *(d for d in args.kw_defaults if d is not None)]
        if all(a is None or a.annotation is None for a in every) and all(_inert(d) for d in defaults):
            return statement.name
    return None


def _inert(node: ast.expr, names: bool = False) -> bool:
    """A literal (numbers, strings, tuples, lists, sets, dicts of them): evaluating it cannot fail or act."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return all(_inert(e, names) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None and _inert(k, names) for k in node.keys) and all(
            _inert(v, names) for v in node.values
        )
    return names and isinstance(node, ast.Name) and node.id in ("int", "float", "str", "bool")


def _dump_without(tree: ast.Module, dead: dict[str, tuple[list[ast.stmt], str]]) -> str:
    drop = {id(s) for statements, _ in dead.values() for s in statements}
    return ast.dump(ast.Module(body=[s for s in tree.body if id(s) not in drop], type_ignores=[]))
