"""The frozen metric: what only the judge imports. It scores a run's exported model; it never runs train.py.

The agent never edits this file and a run never sees it: the judge (agent/sandbox/judge.py) imports it, with the
frozen prepare.py it builds on, from a folder the run never saw, each file's SHA-256 checked against the one
recorded at the workspace's init.

- val_bpb (`evaluate_bpb`): bits per byte over the first EVAL_TOKENS validation targets, whatever the block
  size; summed cross-entropy over the UTF-8 bytes those targets cover, counted from each token's byte string.
- Refusals (`judge`): a model whose logits see later tokens or the other windows of its batch, that returns the
  wrong shape, or that was paid for with fewer parameters or FLOPs than the exported program has
  (`count_parameters`), is `invalid`, with the reason. Causality and row independence are checked inside the
  scoring, on scored batches drawn at random per call, against twins made of real windows (`evaluate_bpb`):
  nothing tells a check from a score.
- Only data reaches the judge (`check_archive`, `check_graph`): an archive with a pickled entry (a weight or
  constant marked `use_pickle`, a custom object, sample inputs that need more than torch's weights-only loader)
  or an entry of any other kind is refused before torch loads it (torch would unpickle it, running its code in
  the judge); a graph may call aten operators only (no custom or higher-order ops), and its state that is not
  a parameter (buffers, constants) is capped at MAX_STATE_BYTES.
- The judge's time (`forward_flops`): a model whose forwards could not be scored within the judge's deadline, even
  at this machine's peak FLOPs, is refused before it runs.
- Probes: a probe's model gets a fingerprint of its logits (`fingerprint`), never a score.
- `prepare_for_runs`: what the engine runs once before contained runs (the data, the CPU's peak FLOPs).

By hand: `python metric.py model.pt2` scores an exported model as the judge does.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import operator
import os
import re
import sys
import zipfile
from typing import Any

import numpy as np
import torch
from corpus import cache_dir, corpus_sources
from prepare import EXPORT_FILE, model_logits, peak_flops, prepare

EVAL_TOKENS = 1 << 17
"""Validation tokens scored per evaluation (fewer if the split is smaller)."""
MAX_STATE_BYTES = 4 * 2**20
"""What a model may hold besides its parameters (buffers, constants): a rotary table for a long context fits; a
copy of the validation text stored to be looked up does not."""
ARCHIVE_ENTRY = re.compile(
    r"^[^/]+/(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt"
    r"|data/weights/(weight_\d+|model_weights_config\.json)"
    r"|data/constants/(tensor_\d+|model_constants_config\.json))$"
)
"""The entries `torch.export.save` writes for one model of plain tensors; anything else (a custom or opaque
object, extra files, another model, compiled code) is refused."""
MAX_ARCHIVE_ENTRIES = 100_000
TWINS = {"causal": 4, "rows": 2}
"""Scored batches per judge call compared with a twin of each kind (`evaluate_bpb`); which ones, and where the
causal twins cut, is drawn afresh per call. Four causal twins of 32 windows cut at 128 distinct positions: every
position of the default 128-token block, every call."""


# -------------------------------------------------------------------------------------------------- val_bpb


class Refused(Exception):
    """A model the judge will not score; the message says why (it becomes the verdict's reason)."""


@torch.no_grad()
def evaluate_bpb(
    model: torch.nn.Module,
    val: np.ndarray,
    token_bytes: np.ndarray,
    block_size: int,
    batch_size: int = 32,
    device: str = "cpu",
    max_tokens: int = EVAL_TOKENS,
    rng: np.random.Generator | None = None,
) -> tuple[float, int, int]:
    """Bits per byte of `model` on the first `max_tokens` predicted validation tokens, whatever `block_size`.

    Summed cross-entropy (nats) / (ln 2 x the UTF-8 bytes those target tokens cover). Windows of `block_size`
    tokens, not overlapping, from the start of the split; when `block_size` does not divide the count, one last
    window ends at the last target and only its new targets count. Returns (val_bpb, tokens, bytes); the sum
    runs over windows in the split's order, so the order they are scored in does not change a bit of it.

    With `rng` (the judge's, drawn afresh per call) the checks are part of the scoring and look like it: the
    windows are scored in a random order, always in full batches of real windows (a short last batch is filled
    with other windows, not counted), and TWINS[kind] scored batches, drawn at random, are each compared with a
    twin of that kind (`_causal_twin`, `_rows_twin`), itself a batch of real windows. A model that fails a
    comparison raises Refused. The model cannot tell a twin from a scored batch, nor which batches are checked.
    """
    n_targets = min(max_tokens, val.size - 1)
    if n_targets < block_size:
        raise ValueError("the validation split is shorter than one block")
    n_full = n_targets // block_size
    starts = [i * block_size for i in range(n_full)]  # each window's first token; its targets follow by one
    skips = [0] * n_full  # positions whose targets were counted in the window before
    if rest := n_targets - n_full * block_size:
        starts.append(n_targets - block_size)
        skips.append(block_size - rest)
    n_windows = len(starts)
    tokens = torch.from_numpy(val[: n_targets + 1].astype(np.int64))
    lengths = torch.from_numpy(token_bytes)
    positions = torch.arange(block_size)
    start_of = torch.tensor(starts)
    skip_of = torch.tensor(skips)
    nats_of = np.zeros(n_windows)  # summed per window, added up in the split's order at the end
    if rng is None:
        batches = [np.arange(i, min(i + batch_size, n_windows)) for i in range(0, n_windows, batch_size)]
        checked: dict[str, np.ndarray] = {}
    else:
        order = rng.permutation(n_windows)
        if short := -n_windows % batch_size:  # fill the last batch with full windows; they are not counted
            order = np.concatenate([order, rng.choice(n_full, short) + n_windows])
        batches = list(order.reshape(-1, batch_size))
        checked = {
            kind: rng.choice(len(batches), min(n, len(batches)), replace=False) for kind, n in TWINS.items()
        }
        # each causal twin cuts its rows at the next distinct positions of one permutation
        cuts = iter(np.resize(rng.permutation(max(1, block_size - 1)), (TWINS["causal"], batch_size)))

    def windows(ids: np.ndarray) -> torch.Tensor:  # (B, T+1) tokens; an id past the windows is a filler
        which = torch.from_numpy(np.asarray(ids))
        first = torch.where(which < n_windows, start_of[which % n_windows], (which - n_windows) * block_size)
        return tokens[first[:, None] + torch.arange(block_size + 1)]

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        with _autocast(device):
            logits = model_logits(model, x.to(device)).float()
        expected = (*x.shape, token_bytes.size)
        if tuple(logits.shape) != expected:
            shape = tuple(logits.shape)
            raise Refused(f"the model returns {shape} for {tuple(x.shape)} inputs, not {expected} logits")
        return logits

    was_training = model.training
    model.eval()
    try:
        for number, ids in enumerate(batches):
            window = windows(ids)
            x, y = window[:, :-1], window[:, 1:]
            logits = logits_of(x)
            for kind in (kind for kind, chosen in checked.items() if number in chosen):
                assert rng is not None  # checks are drawn with it
                donors = windows(_donors(ids, n_full, rng))[:, :-1]
                twin, kept = (
                    _causal_twin(x, donors, next(cuts)) if kind == "causal" else _rows_twin(x, donors, rng)
                )
                if moved := _moved(logits, logits_of(twin), kept, device):
                    diff, row = moved
                    if kind == "causal":  # its own later tokens, or those of the rows beside it?
                        alone = torch.where(torch.arange(len(ids))[:, None] == row, twin, x)
                        only_row = kept & (torch.arange(len(ids))[:, None] == row)
                        if not _moved(logits, logits_of(alone), only_row, device):
                            kind = "rows"
                    raise Refused(TWIN_FAILED[kind].format(f"{diff:.3g}"))
            nats = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), y.reshape(-1).to(logits.device), reduction="none"
            ).view(len(ids), block_size)
            counted = ids < n_windows
            scored = torch.from_numpy(ids[counted])
            mask = positions[None, :] >= skip_of[scored][:, None]
            row_nats = (nats[torch.from_numpy(counted).to(nats.device)].double().cpu() * mask).sum(dim=1)
            nats_of[scored.numpy()] = row_nats.numpy()
    finally:
        model.train(was_training)
    counted_targets = positions[None, :] >= skip_of[:, None]
    targets = tokens[start_of[:, None] + 1 + positions][counted_targets]
    total_bytes = int(lengths[targets].sum())
    return float(nats_of.sum()) / (math.log(2) * total_bytes), int(counted_targets.sum()), total_bytes


def _donors(ids: np.ndarray, n_full: int, rng: np.random.Generator) -> np.ndarray:
    """One other full window per row, drawn from outside the batch where the split allows: the twin's text."""
    pool = np.setdiff1d(np.arange(n_full), ids)
    return rng.choice(pool if pool.size else np.arange(n_full), len(ids))


def _causal_twin(
    x: torch.Tensor, donors: torch.Tensor, cuts: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """A twin whose row i keeps its tokens up to position cuts[i] and takes the rest from another real window (its
    same positions): a causal model's logits up to the cut do not change. Returns (twin, the positions whose
    logits must not change)."""
    kept = torch.arange(x.size(1))[None, :] <= torch.from_numpy(cuts)[:, None]
    return torch.where(kept, x, donors), kept


def _rows_twin(
    x: torch.Tensor, donors: torch.Tensor, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A twin that keeps about half the rows, drawn at random, and replaces the others with other windows: a
    model whose rows do not see each other gives the kept rows the same logits. (A batch's windows may hold each
    other's targets, so a model that mixed rows could read them.) Returns (twin, the positions that must not
    change)."""
    rows, block = x.shape
    keep = rng.permutation(rows) < rows // 2  # none for a batch of one: no other row to change
    kept = torch.from_numpy(keep)[:, None].expand(rows, block)
    return torch.where(kept, x, donors), kept


TWIN_FAILED = {
    "causal": "non-causal: logits changed by {} when only the tokens after them changed",
    "rows": "rows not independent: changing some windows of a batch moved the logits of the others by {}",
}


def _moved(
    logits: torch.Tensor, twin: torch.Tensor, kept: torch.Tensor, device: str
) -> tuple[float, int] | None:
    """How far the twin's logits at the `kept` positions moved from the scored batch's, and in which row, if past
    the tolerance (bf16 on CUDA, float32 on CPU) or not finite; None if they did not move."""
    kept = kept.to(logits.device)
    if not kept.any():
        return None
    # equal infinities do not differ; NaN differs from everything
    gap = torch.where((twin == logits) | ~kept[..., None], 0.0, (twin - logits).abs())
    per_row = torch.nan_to_num(gap.amax(dim=(1, 2)), nan=math.inf)
    row = int(per_row.argmax())
    diff = per_row[row].item()
    scale = 1.0 + torch.nan_to_num(logits[kept], nan=0.0, posinf=0.0, neginf=0.0).abs().max().item()
    if math.isfinite(diff) and diff <= (2e-2 if device == "cuda" else 1e-4) * scale:
        return None
    return diff, row


def _autocast(device: str) -> Any:
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ---------------------------------------------------------------------------------------------------- judge


class _Program(torch.nn.Module):
    """An exported program as a module `evaluate_bpb` can call: the logits alone, and .eval() a no-op."""

    inner: Any

    def __init__(self, program_module: Any) -> None:
        super().__init__()
        object.__setattr__(self, "inner", program_module)  # not a submodule: exported modules refuse .train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return model_logits(self.inner, x)


def _user_input_shape(program: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
    """Shape and dtype of the program's one user input, or None if it takes anything else."""
    names = list(program.graph_signature.user_inputs)
    if len(names) != 1:
        return None
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == names[0]:
            value = node.meta.get("val")
            if value is None or not all(isinstance(d, int) for d in value.shape):
                return None
            return tuple(int(d) for d in value.shape), value.dtype
    return None


def count_parameters(program: Any) -> int:
    """Parameters of an exported program, each tensor once (tied weights share storage)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for name in program.graph_signature.parameters:
        tensor = program.state_dict[name]
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key not in seen:
            seen.add(key)
            total += tensor.numel()
    return total


def check_archive(model_path: str | os.PathLike[str]) -> str | None:
    """Why the exported archive is refused before torch loads it, or None: it must hold data only. torch 2.x
    unpickles (`weights_only=False`) any weight or constant marked `use_pickle`, custom objects, and sample inputs
    its weights-only loader refuses; unpickling runs whatever code the pickle names."""
    try:
        with zipfile.ZipFile(model_path) as archive:
            entries = archive.infolist()
            if len(entries) > MAX_ARCHIVE_ENTRIES:
                return f"the archive holds {len(entries)} entries"
            for entry in entries:
                if not ARCHIVE_ENTRY.match(entry.filename):
                    return f"the archive holds {entry.filename!r}: only a model's graph and plain tensors are judged"
            names = {entry.filename.split("/", 1)[1]: entry.filename for entry in entries}
            for config in (
                "data/weights/model_weights_config.json",
                "data/constants/model_constants_config.json",
            ):
                if config not in names:
                    continue
                payloads = json.loads(archive.read(names[config])).get("config", {})
                pickled = sorted(name for name, meta in payloads.items() if meta.get("use_pickle", True))
                if pickled:
                    return f"pickled tensors in the archive ({', '.join(pickled[:3])}): only plain tensors are judged"
            if "data/sample_inputs/model.pt" in names:
                data = archive.read(names["data/sample_inputs/model.pt"])
                if data:
                    try:
                        torch.load(io.BytesIO(data), weights_only=True)
                    except Exception as exc:
                        return f"the archive's sample inputs are not plain tensors ({type(exc).__name__})"
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        return f"not a readable archive: {type(exc).__name__}: {exc}"[:300]
    return None


def check_graph(program: Any) -> str | None:
    """Why the loaded program is refused before it runs, or None: aten operators only (no custom or
    higher-order ops: they could run anything, or branch on what they see), no state it writes (a model that
    remembered its calls could tell a check's twin from the batch before it), and at most MAX_STATE_BYTES of
    state that is not a parameter. Writing in place to its own intermediate tensors is allowed."""
    held_from_outside = set()  # the parameters, buffers, constants and the input, and views of them
    for node in program.graph.nodes:
        if node.op == "placeholder":
            held_from_outside.add(node)
        if node.op in ("placeholder", "output"):
            continue
        target = node.target
        if node.op != "call_function":
            return f"the graph has a {node.op} node ({target}): only calls of aten operators are judged"
        if target is operator.getitem:
            if node.args[0] in held_from_outside:
                held_from_outside.add(node)
            continue
        if not (isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"):
            return f"the graph calls {target}: only aten operators are judged"
        schema = target._schema
        for index, argument in enumerate(schema.arguments):
            value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
            values = value if isinstance(value, list | tuple) else [value]
            held = [
                item.name for item in values if isinstance(item, torch.fx.Node) and item in held_from_outside
            ]
            if not held:
                continue
            if argument.alias_info is not None and argument.alias_info.is_write:
                return f"the graph writes to {held[0]} ({target}): a judged model is a function of its input"
            if any(result.alias_info is not None for result in schema.returns):  # a view of it
                held_from_outside.add(node)
    mutated = program.graph_signature.buffers_to_mutate | program.graph_signature.user_inputs_to_mutate
    if mutated:  # a functional graph says so in its signature
        names = ", ".join(sorted(mutated.values())[:3])
        return f"the graph changes its state ({names}): a judged model is a function of its input"
    parameters = set(program.graph_signature.parameters)
    state = [tensor for name, tensor in program.state_dict.items() if name not in parameters]
    state += [value for value in program.constants.values() if isinstance(value, torch.Tensor)]
    held = sum(tensor.numel() * tensor.element_size() for tensor in state)
    if held > MAX_STATE_BYTES:
        return f"the model holds {held:,} bytes besides its parameters, over the {MAX_STATE_BYTES:,}-byte cap"
    return None


MATMULS = {
    "mm": 0,
    "bmm": 0,
    "matmul": 0,
    "linear": 0,
    "addmm": 1,
    "baddbmm": 1,
    "addbmm": 1,
    "addmv": 1,
    "mv": 0,
}
"""Products whose FLOPs are 2 x output elements x the inner dimension: the index of the operand that has it last."""
CUBIC = frozenset(
    {"cholesky", "cholesky_inverse", "cholesky_solve", "inverse", "pinverse", "triangular_solve", "lu_solve"}
    | {"svd", "qr", "geqrf", "det", "logdet", "slogdet", "matrix_exp", "matrix_power", "lstsq"}
)
"""Operators that cost about n^3 per n x n matrix (2 x input elements x its last dimension, at least)."""


def forward_flops(program: Any) -> float:
    """A floor on the FLOPs of one forward of the exported program, from its graph's shapes (no tensor math):
    products count 2 x output elements x the inner dimension (matmuls, linear, convolutions, attention, einsum),
    matrix factorisations and solves n^3 per matrix, every other operator one FLOP per element it reads or
    writes. The graph has no loops (higher-order ops are refused), so running it costs this at least."""
    total = 0.0
    for node in program.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = node.target.overloadpacket.__name__.lstrip("_")
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        out = sum(math.prod(v.shape) for v in _values(node))
        if name in MATMULS and len(node.args) > MATMULS[name]:
            inner = _shape(node.args[MATMULS[name]])
            total += 2.0 * out * (inner[-1] if inner else 1)
        elif "attention" in name and len(args) >= 3:  # q (..., L, E) @ k (..., S, E)^T, then @ v (..., S, Ev)
            keys = _shape(args[1])
            total += 2.0 * (keys[-2] if len(keys) >= 2 else 1) * (math.prod(_shape(args[0])) + out)
        elif (
            name.startswith(("convolution", "conv1d", "conv2d", "conv3d", "conv_transpose"))
            and len(args) >= 2
        ):
            total += 2.0 * out * math.prod(_shape(args[1])[1:])  # weight (out, in / groups, *kernel)
        elif name == "einsum" and isinstance(node.args[0], str) and len(node.args) > 1:
            total += _einsum_flops(node.args[0], list(node.args[1]))
        elif (name in CUBIC or name.startswith("linalg_")) and args:
            matrix = _shape(args[0])
            total += 2.0 * math.prod(matrix) * (matrix[-1] if matrix else 1)
        else:
            total += max([out, *(math.prod(_shape(a)) for a in args)])
    return total


def _values(node: Any) -> list[torch.Tensor]:
    """The tensors an fx node stands for (its outputs), from its fake-tensor metadata."""
    meta = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    values = meta if isinstance(meta, list | tuple) else [meta]
    return [v for v in values if isinstance(v, torch.Tensor)]


def _shape(node: Any) -> tuple[int, ...]:
    values = _values(node)
    return tuple(int(d) for d in values[0].shape) if values else ()


def _einsum_flops(equation: str, operands: list[Any]) -> float:
    """2 x the product of every index's size (and the broadcast `...` dimensions): a naive contraction."""
    sizes: dict[str, int] = {}
    broadcast = 1
    for subscripts, operand in zip(
        equation.replace(" ", "").split("->")[0].split(","), operands, strict=False
    ):
        dims, letters = _shape(operand), subscripts.replace("...", "")
        if "..." in subscripts:
            head, extra = subscripts.index("..."), len(dims) - len(letters)
            broadcast = max(broadcast, math.prod(dims[head : head + extra]))
            dims = dims[:head] + dims[head + extra :]
        for letter, size in zip(letters, dims, strict=False):
            sizes[letter] = max(sizes.get(letter, 1), size)
    return 2.0 * broadcast * math.prod(sizes.values())


def _load_program(model_path: str | os.PathLike[str], result: dict[str, Any]) -> tuple[Any, int, int] | None:
    """The exported program and its (batch, block_size) input, or None with result["reason"] saying why not;
    sets result["block_size"]. The archive is checked before it is loaded, the graph before it runs."""
    if refused := check_archive(model_path):
        result["reason"] = f"the exported model is refused: {refused}"[:500]
        return None
    try:
        program = torch.export.load(str(model_path))
    except Exception as exc:
        result["reason"] = f"the exported model cannot be loaded: {type(exc).__name__}: {exc}"[:500]
        return None
    if refused := check_graph(program):
        result["reason"] = f"the exported model is refused: {refused}"[:500]
        return None
    signature = _user_input_shape(program)
    if signature is None or len(signature[0]) != 2 or signature[1] != torch.long:
        result["reason"] = "the exported model must take one int64 (batch, block_size) tensor of token ids"
        return None
    (batch, block_size), _ = signature
    result["block_size"] = block_size
    return program, batch, block_size


def judge(model_path: str | os.PathLike[str], claims: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score an exported model: val_bpb over the first EVAL_TOKENS validation targets, checked as it is scored
    (`evaluate_bpb`), and self-checks of the run's claims. Returns the result the engine trusts (status ok, or
    invalid and the reason).

    Runs in the judge process, which imports neither train.py nor anything the run could write. A probe's model
    (its claims name its probe steps) gets a fingerprint instead (`fingerprint`), never a score.
    """
    claims = claims or {}
    if claims.get("probe_steps") is not None:
        return fingerprint(model_path, claims)
    result: dict[str, Any] = {
        "status": "invalid",
        "reason": "",
        "val_bpb": None,
        "eval_tokens": 0,
        "eval_bytes": 0,
        "num_params": None,
        "block_size": None,
    }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = prepare()
    loaded = _load_program(model_path, result)
    if loaded is None:
        return result
    program, batch, block_size = loaded
    n_params = count_parameters(program)
    result["num_params"] = n_params
    claimed = claims.get("num_params")
    if isinstance(claimed, int) and claimed < n_params:
        result["reason"] = (
            f"the run charged its budget for {claimed:,} parameters but the exported model has {n_params:,}"
        )
        return result
    flops, tokens = claims.get("train_flops"), claims.get("tokens")
    if (
        isinstance(flops, int | float)
        and isinstance(tokens, int)
        and flops < 6.0 * n_params * tokens * (1 - 1e-9)
    ):
        result["reason"] = (
            f"the run claims {flops:.3e} training FLOPs, less than 6 x {n_params:,} parameters x {tokens:,} tokens"
        )
        return result
    n_targets = min(EVAL_TOKENS, data.val.size - 1)
    if not 0 < block_size <= n_targets:
        result["reason"] = f"block_size {block_size} does not fit the {n_targets:,} validation targets"
        return result
    if refused := _too_slow(
        program, batch, -(-n_targets // block_size), claims.get("judge_deadline_s"), device
    ):
        result["reason"] = refused
        return result
    scorer = _Program(program.module())
    rng = np.random.default_rng(int.from_bytes(os.urandom(16)))  # not the run's to know: drawn per call
    try:
        bpb, tokens, nbytes = evaluate_bpb(
            scorer, data.val, data.token_bytes, block_size, batch_size=batch, device=device, rng=rng
        )
    except Refused as refused:
        result["reason"] = str(refused)[:500]
        return result
    except Exception as exc:
        result["reason"] = f"the exported model failed on validation data: {type(exc).__name__}: {exc}"[:500]
        return result
    expected_bytes = int(data.token_bytes[data.val[1 : n_targets + 1].astype(np.int64)].sum())
    if tokens != n_targets or nbytes != expected_bytes:
        result["reason"] = f"evaluated {tokens} tokens / {nbytes} bytes, not {n_targets} / {expected_bytes}"
        return result
    if not math.isfinite(bpb):
        result["reason"] = "val_bpb is not finite"
        return result
    result.update(status="ok", val_bpb=round(bpb, 6), eval_tokens=tokens, eval_bytes=nbytes)
    return result


def _too_slow(program: Any, batch: int, n_windows: int, deadline_s: Any, device: str) -> str | None:
    """Why scoring the program could not end within the judge's deadline (the engine's `judge_deadline_s`, from
    the parent's judging), even at this machine's peak FLOPs, or None. Checked before it runs: a forward made
    to be slow (say, thousands of products that leave the logits as they were) costs a glance at its graph."""
    if not isinstance(deadline_s, int | float) or deadline_s <= 0:
        return None
    forwards = -(-n_windows // batch) + sum(TWINS.values()) + 1  # every batch, the twins, a causal re-try
    flops = forward_flops(program)
    seconds = forwards * flops / peak_flops(device)
    if seconds <= deadline_s:
        return None
    return (
        f"too slow to judge: {forwards} forwards of {flops:.3g} FLOPs take {seconds:.0f} s at this machine's "
        f"peak, past the judge's {deadline_s:.0f} s deadline (ten times the parent's judging)"
    )


def fingerprint(model_path: str | os.PathLike[str], claims: dict[str, Any]) -> dict[str, Any]:
    """A probe's verdict: the SHA-256 of the exported model's logits on a fixed input, bit for bit; no score.

    The input is the program's own fixed (batch, block_size) shape filled with the first validation tokens
    (repeated if the split is shorter). Two probes of the same computation (train.py, seed, steps) give the
    same digest; a change to any weight, or to the model's code, gives another. Status `probe`: the runner
    records it as not scored, so a run that claims to be a probe only loses its score.
    """
    result: dict[str, Any] = {
        "status": "probe",
        "reason": "a probe's model is fingerprinted, never scored",
        "val_bpb": None,
        "fingerprint": None,
        "block_size": None,
    }
    steps, done = claims.get("probe_steps"), claims.get("probe_steps_done")
    if done != steps:
        result["reason"] = f"the probe ended after {done} of {steps} steps: no fingerprint"
        return result
    loaded = _load_program(model_path, result)
    if loaded is None:
        return result
    program, batch, block_size = loaded
    val = prepare().val
    tokens = np.resize(val, batch * block_size) if val.size else np.zeros(batch * block_size, dtype=np.uint16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.from_numpy(tokens.astype(np.int64)).reshape(batch, block_size).to(device)
    try:
        with torch.no_grad():
            logits = model_logits(program.module(), x).detach().cpu().contiguous()
    except Exception as exc:
        result["reason"] = f"the exported model failed on a fixed input: {type(exc).__name__}: {exc}"[:500]
        return result
    digest = hashlib.sha256(f"{tuple(logits.shape)} {logits.dtype}\n".encode())
    digest.update(logits.reshape(-1).view(torch.uint8).numpy().tobytes())
    result["fingerprint"] = digest.hexdigest()
    return result


def prepare_for_runs() -> dict[str, Any]:
    """What the engine does once before contained runs: build the data cache, measure the CPU peak, and say
    where the prepared data is (`data`: what runs and judges load), what else of the cache a run reads
    (`readable`: the CPU peak) and what training must not read (`hidden`: the validation split, which only the
    judge reads, and the corpus it was cut from)."""
    data = prepare()
    readable = [str(data.folder)]
    if not torch.cuda.is_available():
        torch.set_num_threads(os.cpu_count() or 1)
        peak_flops("cpu")
        if (measured := cache_dir() / "peak_flops_cpu.json").is_file():
            readable.append(str(measured))
    sources = corpus_sources(os.environ.get("AUTORESEARCH_CORPUS") or None)
    hidden = [str(data.folder / "val.bin"), *map(str, sources)]
    return {"data": str(data.folder), "readable": readable, "hidden": hidden}


def format_bpb(result: dict[str, Any]) -> str:
    """The summary's val_bpb field: six decimals, or why there is no number."""
    if result["val_bpb"] is None:
        reason = result["reason"].split(":")[0] or "invalid"
        return f"invalid ({reason})"
    return f"{result['val_bpb']:.6f}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print(
            f"usage: python metric.py MODEL  (an exported {EXPORT_FILE}, scored as the judge does)",
            file=sys.stderr,
        )
        return 2
    result = judge(args[0])
    print(f"val_bpb: {format_bpb(result)}" + (f" ({result['reason']})" if result["reason"] else ""))
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
