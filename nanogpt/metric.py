"""The frozen metric: what only the judge imports. It scores a run's exported model; it never runs train.py.

The agent never edits this file and a run never sees it: the judge (agent/sandbox/judge.py) imports it, with the
frozen prepare.py it builds on, from a folder the run never saw, each file's SHA-256 checked against the one
recorded at the workspace's init.

- val_bpb (`evaluate_bpb`): bits per byte over the first EVAL_TOKENS validation targets, whatever the block
  size; summed cross-entropy over the UTF-8 bytes those targets cover, counted from each token's byte string.
- Refusals (`judge`): a model whose logits see later tokens (`check_causal`) or the other windows of its batch
  (`check_rows_independent`), that returns the wrong shape, or that was paid for with fewer parameters or FLOPs
  than the exported program has (`count_parameters`), is `invalid`, with the reason.
- Only data reaches the judge (`check_archive`, `check_graph`): an archive with a pickled entry (a weight or
  constant marked `use_pickle`, a custom object, sample inputs that need more than torch's weights-only loader)
  or an entry of any other kind is refused before torch loads it (torch would unpickle it, running its code in
  the judge); a graph may call aten operators only (no custom or higher-order ops), and its state that is not
  a parameter (buffers, constants) is capped at MAX_STATE_BYTES.
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


# -------------------------------------------------------------------------------------------------- val_bpb


@torch.no_grad()
def evaluate_bpb(
    model: torch.nn.Module,
    val: np.ndarray,
    token_bytes: np.ndarray,
    block_size: int,
    batch_size: int = 32,
    device: str = "cpu",
    max_tokens: int = EVAL_TOKENS,
) -> tuple[float, int, int]:
    """Bits per byte of `model` on the first `max_tokens` predicted validation tokens, whatever `block_size`.

    Summed cross-entropy (nats) / (ln 2 x the UTF-8 bytes those target tokens cover). Windows of `block_size`
    tokens, not overlapping, from the start of the split; when `block_size` does not divide the count, one last
    window ends at the last target and only its new targets count. Returns (val_bpb, tokens, bytes).
    """
    n_targets = min(max_tokens, val.size - 1)
    if n_targets < block_size:
        raise ValueError("the validation split is shorter than one block")
    n_full = n_targets // block_size
    # (start of the window, first position whose target counts)
    windows = [(i * block_size, 0) for i in range(n_full)]
    if rest := n_targets - n_full * block_size:
        windows.append((n_targets - block_size, block_size - rest))
    was_training = model.training
    model.eval()
    tokens = torch.from_numpy(val[: n_targets + 1].astype(np.int64))
    lengths = torch.from_numpy(token_bytes)
    positions = torch.arange(block_size)
    total_nats, total_bytes, total_tokens = 0.0, 0, 0
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        starts = torch.tensor([start for start, _ in chunk])[:, None] + torch.arange(block_size + 1)
        counted = positions[None, :] >= torch.tensor([skip for _, skip in chunk])[:, None]  # (B, T)
        window = tokens[starts]  # (B, T+1)
        x, y = window[:, :-1].to(device), window[:, 1:].to(device)
        with _autocast(device):
            logits = model_logits(model, x)
        nats = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none"
        )
        total_nats += float(nats[counted.reshape(-1).to(nats.device)].sum())
        total_bytes += int(lengths[window[:, 1:][counted]].sum())
        total_tokens += int(counted.sum())
    model.train(was_training)
    return total_nats / (math.log(2) * total_bytes), total_tokens, total_bytes


def _autocast(device: str) -> Any:
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def check_causal(
    model: torch.nn.Module, val: np.ndarray, vocab_size: int, block_size: int, device: str = "cpu"
) -> str | None:
    """None if the model is causal; otherwise why not.

    Changes the tokens after position t in a sample; the logits at positions <= t must not change.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    x = torch.from_numpy(val[: 2 * block_size].astype(np.int64)).reshape(2, block_size).to(device)
    try:
        with _autocast(device):
            base = model_logits(model, x).float()
        for t in sorted({0, block_size // 3, block_size // 2, block_size - 2}):
            if t < 0 or t >= block_size - 1:
                continue
            changed = x.clone()
            noise = torch.randint(0, vocab_size, (2, block_size - t - 1), generator=generator).to(device)
            changed[:, t + 1 :] = noise
            with _autocast(device):
                probe = model_logits(model, changed).float()
            scale = 1.0 + base[:, : t + 1].abs().max().item()
            tolerance = (2e-2 if device == "cuda" else 1e-4) * scale
            diff = (probe[:, : t + 1] - base[:, : t + 1]).abs().max().item()
            if not math.isfinite(diff) or diff > tolerance:
                return f"logits at positions <= {t} changed by {diff:.3g} when later tokens changed"
    finally:
        model.train(was_training)
    return None


@torch.no_grad()
def check_rows_independent(
    model: torch.nn.Module, val: np.ndarray, vocab_size: int, block_size: int, batch: int, device: str = "cpu"
) -> str | None:
    """None if each window's logits depend on that window alone; otherwise why not.

    The windows of a scored batch follow each other in the split, so a model that mixed rows could read a
    window's targets from the next one. Changing one row must leave every other row's logits as they were.
    """
    rows = min(batch, max(2, (val.size - 1) // block_size))
    if rows < 2 or val.size < rows * block_size:
        return None
    x = torch.from_numpy(val[: rows * block_size].astype(np.int64)).reshape(rows, block_size).to(device)
    generator = torch.Generator().manual_seed(4321)
    with _autocast(device):
        base = model_logits(model, x).float()
        changed = x.clone()
        changed[-1] = torch.randint(0, vocab_size, (block_size,), generator=generator).to(device)
        probe = model_logits(model, changed).float()
    scale = 1.0 + base[:-1].abs().max().item()
    diff = (probe[:-1] - base[:-1]).abs().max().item()
    if not math.isfinite(diff) or diff > (2e-2 if device == "cuda" else 1e-4) * scale:
        return f"changing one window moved the logits of the others by {diff:.3g}"
    return None


# ---------------------------------------------------------------------------------------------------- judge


class _FixedBatch(torch.nn.Module):
    """An exported program called with any number of windows: pads to its fixed batch, drops the padding."""

    inner: Any

    def __init__(self, program_module: Any, batch: int) -> None:
        super().__init__()
        object.__setattr__(self, "inner", program_module)  # not a submodule: exported modules refuse .train()
        self.batch = batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.size(0)
        if rows < self.batch:
            x = torch.cat([x, x.new_zeros(self.batch - rows, x.size(1))])
        out = self.inner(x)
        if isinstance(out, tuple | list):
            out = out[0]
        return out[:rows]


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
    higher-order ops: they could run anything, or branch on what they see), and at most MAX_STATE_BYTES of
    state that is not a parameter."""
    for node in program.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        target = node.target
        if node.op != "call_function":
            return f"the graph has a {node.op} node ({target}): only calls of aten operators are judged"
        if target is operator.getitem:
            continue
        if not (isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"):
            return f"the graph calls {target}: only aten operators are judged"
    parameters = set(program.graph_signature.parameters)
    state = [tensor for name, tensor in program.state_dict.items() if name not in parameters]
    state += [value for value in program.constants.values() if isinstance(value, torch.Tensor)]
    held = sum(tensor.numel() * tensor.element_size() for tensor in state)
    if held > MAX_STATE_BYTES:
        return f"the model holds {held:,} bytes besides its parameters, over the {MAX_STATE_BYTES:,}-byte cap"
    return None


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
    """Score an exported model: the causality probe, val_bpb over the first EVAL_TOKENS validation targets,
    and self-checks of the run's claims. Returns the result the engine trusts (status ok or invalid + reason).

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
    scorer = _FixedBatch(program.module(), batch)
    try:
        with torch.no_grad():
            probe = scorer(torch.zeros(1, block_size, dtype=torch.long, device=device))
        if tuple(probe.shape) != (1, block_size, data.vocab_size):
            result["reason"] = (
                f"the exported model returns {tuple(probe.shape)} for (1, {block_size}) inputs, not "
                f"(1, {block_size}, {data.vocab_size}) logits"
            )
            return result
        problem = check_causal(scorer, data.val, data.vocab_size, block_size, device)
        if problem:
            result["reason"] = f"non-causal: {problem}"
            return result
        problem = check_rows_independent(scorer, data.val, data.vocab_size, block_size, batch, device)
        if problem:  # consecutive windows hold each other's targets: a row must not see the others
            result["reason"] = f"rows not independent: {problem}"
            return result
        bpb, tokens, nbytes = evaluate_bpb(
            scorer, data.val, data.token_bytes, block_size, batch_size=batch, device=device
        )
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
    """What the engine does once before contained runs: build the data cache, measure the CPU peak, and
    name the files training must not read (the validation split: only the judge reads it)."""
    data = prepare()
    if not torch.cuda.is_available():
        torch.set_num_threads(os.cpu_count() or 1)
        peak_flops("cpu")
    return {"hidden": [str(data.folder / "val.bin")]}


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
