"""The frozen harness train.py imports: the prepared data, batches, the training budget and the hand-over.

The agent never edits this file, nor the two others of the frozen harness: corpus.py (the corpus, its split and
tokenizer, the token cache built from them) and metric.py (the score). Each one's SHA-256, recorded when the
workspace was made, is checked before a judge imports it. The score is not computed here: the run hands its
model over (`evaluate_and_report`), and a separate judge process scores it with metric.py, which a run never
sees.

- Data: `prepare()` loads the token cache of the corpus (built once by corpus.py, the harness's corpus and
  tokenizer: Shakespeare by default, or `--corpus` / AUTORESEARCH_CORPUS; bytes or a BPE vocabulary).
- Budget (AUTORESEARCH_BUDGET): `time` ("60", "60s": wall seconds), `cpu` ("120cpu": CPU seconds of the run's
  processes) or `flops` ("2.5e12flops": 6 x parameters x tokens served by this file's loader), each counted
  from the run's start, so start-up and compilation are paid for too.
- Run helpers for train.py: `setup` (seed and device), `Progress` (the progress lines) and
  `evaluate_and_report` (the model and claims handed to the judge; the fields of the `---` summary block).
- Probes (AUTORESEARCH_PROBE_STEPS, set by the runner): K steps on a step clock, then the judge fingerprints the
  exported model's logits instead of scoring it: a no-op or an early crash costs seconds.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning threads starve a neighbour LLM

import argparse
import json
import platform
import re
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken
import torch
from corpus import (
    CorpusError,
    build_cache,
    cache_dir,
    corpus_files,
    hash_corpus,
    load_encoding,
    token_byte_lengths,
)

DEFAULT_TIME_SECONDS_CUDA = 300.0
DEFAULT_CPU_FLOPS = 2.9e12
"""A compute budget of about 60 s of the default train.py at ~18k tokens/s on a 2-core machine (bench/)."""
DEFAULT_CPU_WALL_SECONDS = 60.0
"""The CPU default: 60 wall seconds, measured by the runner from the run's start (bench/bench_budget.py: the
only budget that charges a change its real cost; CPU seconds and FLOPs stay selectable)."""
EXPORT_FILE = "model.pt2"
"""The trained model as a `torch.export` program, written into the run's folder for the judge."""
CLAIMS_FILE = "claims.json"
"""What the run says it spent (steps, tokens, parameters): checked by the judge, never the score."""
STARTED = time.perf_counter()
"""When train.py imported the harness: the start of the summary's total_seconds."""
STARTED_AT = time.time()
"""The same moment in epoch seconds: the budget's clock when no runner set AUTORESEARCH_CLOCK_START."""


# -------------------------------------------------------------------------------------------- prepared data


@dataclass
class Data:
    """A prepared corpus: token ids of both splits and the tokenizer that made them."""

    train: np.ndarray
    val: np.ndarray
    encoding: tiktoken.Encoding
    token_bytes: np.ndarray
    corpus_hash: str
    folder: Path

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab


DATA_ENV = "AUTORESEARCH_DATA"
"""The prepared folder a contained run or judge loads (set by the runner): it sees no corpus to hash."""


def prepare(corpus: str | os.PathLike[str] | None = None, vocab_size: int | None = None) -> Data:
    """Build (once) and load the tokenized corpus; cached under cache_dir() by corpus hash and vocabulary. Under
    the runner (DATA_ENV, and no corpus or vocabulary asked for), the folder it prepared, as it is."""
    if corpus is None and vocab_size is None and (given := os.environ.get(DATA_ENV)):
        folder = Path(given)
        corpus_hash = json.loads((folder / "meta.json").read_text())["corpus_hash"]
    else:
        if corpus is None:
            corpus = os.environ.get("AUTORESEARCH_CORPUS") or None
        if vocab_size is None:
            vocab_size = int(os.environ.get("AUTORESEARCH_VOCAB", "256"))
        if not 256 <= vocab_size <= 1 << 16:
            raise ValueError(f"vocabulary size {vocab_size}: token ids are stored as uint16, so 256 to 65536")
        files = corpus_files(corpus)
        corpus_hash = hash_corpus(files)
        folder = cache_dir() / "data" / f"{corpus_hash}-v{vocab_size}"
        if not (folder / "meta.json").exists():
            build_cache(files, corpus_hash, vocab_size, folder)
    encoding = load_encoding(folder / "tokenizer.json")
    return Data(  # mapped, not read: a large corpus's tokens stay on disk until a batch needs them
        train=_map_tokens(folder / "train.bin"),
        val=_map_tokens(folder / "val.bin"),
        encoding=encoding,
        token_bytes=token_byte_lengths(encoding),
        corpus_hash=corpus_hash,
        folder=folder,
    )


def _map_tokens(path: Path) -> np.ndarray:
    """A split's tokens, mapped from disk; empty where the runner hides the file (the validation split during
    training reads as /dev/null: only the judge scores on it)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r")


# --------------------------------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class BudgetSpec:
    """A training budget: `time` (wall seconds), `cpu` (CPU seconds of the run's processes) or `flops`
    (FLOPs counted by this file: 6 x parameters x tokens served)."""

    mode: str
    amount: float

    def __str__(self) -> str:
        if self.mode == "time":
            return f"{self.amount:g} s"
        if self.mode == "cpu":
            return f"{self.amount:g} CPU s"
        return f"{self.amount:.2e} FLOPs"


_BUDGET_RE = re.compile(
    r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(s|sec|seconds|cpu|cpus|flops)?\s*$", re.IGNORECASE
)
_UNITS = {"flops": "flops", "cpu": "cpu", "cpus": "cpu"}


def parse_budget(spec: str | None, device: str = "cpu") -> BudgetSpec:
    """Parse "60", "60s", "120cpu" or "2.5e12flops"; None or "" gives the device default."""
    if spec is None or not spec.strip():
        if device == "cuda":
            return BudgetSpec("time", DEFAULT_TIME_SECONDS_CUDA)
        return BudgetSpec("time", DEFAULT_CPU_WALL_SECONDS)
    match = _BUDGET_RE.match(spec)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(
            f"budget {spec!r} is not understood: use wall seconds (60, 60s), CPU seconds (120cpu) "
            "or FLOPs (2.5e12flops)"
        )
    amount, unit = float(match.group(1)), (match.group(2) or "s").lower()
    return BudgetSpec(_UNITS.get(unit, "time"), amount)


STOP_SIGNAL = signal.SIGUSR1
"""The runner's word that the budget is spent, measured from outside the run: training stops at the next step."""
PROBE_STEPS_ENV = "AUTORESEARCH_PROBE_STEPS"
"""Set by the runner for a probe (agent/sandbox/probe.py): K optimizer steps on a step clock, then the judge
fingerprints the exported model instead of scoring it. It can only end a run sooner, and a probe's model is never
scored."""


class Budget:
    """Counts what the run spends, in its budget's unit; `train.py` trains while `not budget.done()`.

    Every mode counts from the run's start: `time` is wall seconds since the runner started the run
    (AUTORESEARCH_CLOCK_START; run by hand, since train.py imported this file), `cpu` the CPU seconds of this
    process and its finished children, `flops` 6 x parameters (`attach`) x tokens served by `Batches`. Start-up,
    compilation and every step are paid for, as the user pays them. The runner measures wall and CPU seconds from
    outside too and sends STOP_SIGNAL when they are spent, so a run that patches this class gains nothing: past
    its budget it is stopped, and one that does not stop and hand over its model soon is killed. FLOPs are the
    run's own count: the judge checks the parameters and FLOPs it claims against the exported model, and the
    runner's deadline bounds it from outside.

    A probe (`probe_steps` K) also ends after K optimizer steps, and its clock is the step count, so that the
    same train.py computes the same numbers bit for bit: after i steps `fraction()` is i / (K - 1) (the last step
    just short of the end: the K steps sample the whole schedule). A run that claimed to be a probe would only
    stop sooner, and the judge gives a probe's model a fingerprint, never a score.
    """

    def __init__(self, spec: BudgetSpec, probe_steps: int | None = None) -> None:
        self.spec = spec
        self.probe_steps = probe_steps
        """K: a probe's optimizer steps; None for a run."""
        self.steps = 0
        """Optimizer steps taken (counted in a probe only): the steps of the first optimizer that stepped."""
        self._stepper: int | None = None
        self.batches = 0
        """Batches served by the harness's loader."""
        self.n_params = 0
        self.tokens = 0
        self.origin = float(os.environ.get("AUTORESEARCH_CLOCK_START") or STARTED_AT)
        """Epoch seconds when the run started: the clock of `time` and `training_seconds`."""
        self._finished_at: float | None = None
        self._stop_requested = False

    def attach(self, model: torch.nn.Module) -> None:
        """Count the parameters of the model being trained: a `flops` budget charges 6 x them per token."""
        self.n_params = sum(p.numel() for p in model.parameters())

    def on_batch(self, tokens: int) -> None:
        self.tokens += tokens
        self.batches += 1

    def on_optimizer_step(self, optimizer: object) -> None:
        """torch's hook after any optimizer step: counts the steps of the first optimizer seen (two optimizers
        stepping together make one training step)."""
        if self._stepper is None:
            self._stepper = id(optimizer)
        if id(optimizer) == self._stepper:
            self.steps += 1

    @property
    def probe_steps_done(self) -> int:
        """A probe's steps so far: optimizer steps, or batches served when no torch optimizer ever stepped."""
        return self.steps if self._stepper is not None else self.batches

    def request_stop(self) -> None:
        """The budget is spent, by the runner's measure."""
        self._stop_requested = True

    @property
    def flops(self) -> float:
        """Training FLOPs so far: 6 x parameters x tokens served."""
        return 6.0 * self.n_params * self.tokens

    @property
    def training_seconds(self) -> float:
        """Wall seconds since the run started, up to `finish()`."""
        return (self._finished_at or time.time()) - self.origin

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) of this process and its finished children."""
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system

    def finish(self) -> None:
        """Stop the clock: what follows (the hand-over to the judge) is not training."""
        if self._finished_at is None:
            self._finished_at = time.time()

    def spent(self) -> float:
        """What is spent so far, in the budget's unit."""
        if self.spec.mode == "time":
            return self.training_seconds
        if self.spec.mode == "cpu":
            return self.cpu_seconds
        return self.flops

    def fraction(self) -> float:
        """How much of the budget is spent, in [0, 1]: use it for learning-rate schedules."""
        spent = self._spent_fraction()
        if self.probe_steps is None:
            return spent
        done, k = self.probe_steps_done, self.probe_steps
        return 1.0 if done >= k else done / max(1, k - 1) * (1 - 1e-6)

    def _spent_fraction(self) -> float:
        if self.spec.mode == "flops" and self.n_params == 0:
            raise RuntimeError("budget.attach(model) must be called before training")
        return min(1.0, self.spent() / self.spec.amount)

    def done(self) -> bool:
        if self.probe_steps is not None and self.probe_steps_done >= self.probe_steps:
            return True
        return self._stop_requested or self._spent_fraction() >= 1.0


def budget_from_env(device: str) -> Budget:
    """The run's budget from AUTORESEARCH_BUDGET (or the device default); STOP_SIGNAL ends it. A probe's
    (PROBE_STEPS_ENV) counts optimizer steps through torch's global step hook."""
    probe = int(os.environ.get(PROBE_STEPS_ENV) or 0) or None
    if probe is not None and probe < 1:
        raise ValueError(f"{PROBE_STEPS_ENV}={probe}: a probe takes at least one step")
    budget = Budget(parse_budget(os.environ.get("AUTORESEARCH_BUDGET"), device), probe)
    if budget.probe_steps is not None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda optimizer, args, kwargs: budget.on_optimizer_step(optimizer))
    if threading.current_thread() is threading.main_thread():
        signal.signal(STOP_SIGNAL, lambda signum, frame: budget.request_stop())
    return budget


# -------------------------------------------------------------------------------------------------- batches


class Batches:
    """Random training windows of `block_size + 1` tokens; reports every batch to the budget."""

    def __init__(
        self, data: Data, batch_size: int, block_size: int, device: str, budget: Budget, seed: int
    ) -> None:
        if data.train.size <= block_size + 1:
            raise ValueError(f"block_size {block_size} is longer than the training split")
        self.tokens = data.train  # uint16, memory-mapped: a batch reads only its own windows
        self.batch_size, self.block_size, self.device, self.budget = batch_size, block_size, device, budget
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each (B, T)."""
        starts = torch.randint(
            0, self.tokens.size - self.block_size - 1, (self.batch_size,), generator=self.generator
        )
        offsets = np.arange(self.block_size + 1)
        window = torch.from_numpy(self.tokens[starts.numpy()[:, None] + offsets].astype(np.int64))  # (B, T+1)
        x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()
        if self.device == "cuda":
            x, y = x.pin_memory().to("cuda", non_blocking=True), y.pin_memory().to("cuda", non_blocking=True)
        self.budget.on_batch(x.numel())
        return x, y


# ------------------------------------------------------------------------------------------------------ run


def setup() -> tuple[str, int]:
    """The run's device and seed: seeds torch from AUTORESEARCH_SEED; every CPU thread, or TF32 on CUDA."""
    seed = int(os.environ.get("AUTORESEARCH_SEED", "1"))
    torch.manual_seed(seed)
    if not torch.cuda.is_available():
        torch.set_num_threads(os.cpu_count() or 1)
        return "cpu", seed
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return "cuda", seed


class Progress:
    """The run's progress lines: a header when made, then one `step | loss | lr | tok/s | seconds` per `log`."""

    def __init__(self, budget: Budget, device: str) -> None:
        print(f"device {device} | params {budget.n_params / 1e6:.2f}M | budget {budget.spec}", flush=True)
        self.budget = budget
        self.tokens, self.since = budget.tokens, time.perf_counter()

    def log(self, step: int, loss: float, lr: float) -> None:
        """One progress line; tokens/s counts the tokens served since the previous line."""
        now = time.perf_counter()
        rate = (self.budget.tokens - self.tokens) / max(1e-9, now - self.since)
        self.tokens, self.since = self.budget.tokens, now
        print(
            f"step {step:5d} | loss {loss:.4f} | lr {lr:.2e} | tok/s {rate:.0f} | {self.budget.training_seconds:.1f}s",
            flush=True,
        )


# --------------------------------------------------------------------------------------------------- report


def evaluate_and_report(
    model: torch.nn.Module,
    data: Data,
    budget: Budget,
    block_size: int,
    device: str,
    seed: int,
    num_steps: int,
) -> dict[str, str]:
    """Hand the trained model to the judge: export it, write the run's claims; the summary block's fields.

    The score is not computed here. The model leaves this process as data (EXPORT_FILE, a `torch.export`
    program with fixed (batch, block_size) inputs) and a separate judge process, which never runs train.py,
    probes causality and measures val_bpb (metric.py's `judge`). CLAIMS_FILE says what the run spent; the judge checks
    it against the exported program. The fields come formatted, in the order train.py prints them after `---`.
    """
    budget.finish()
    claims: dict[str, Any] = {
        "export": "ok",
        "block_size": block_size,
        "training_seconds": round(budget.training_seconds, 3),
        "cpu_seconds": round(budget.cpu_seconds, 3),
        "train_flops": budget.flops,
        "num_steps": num_steps,
        "num_params": budget.n_params,
        "tokens": budget.tokens,
        "seed": seed,
        "budget": str(budget.spec),
    }
    if budget.probe_steps is not None:  # the judge fingerprints a probe's model (metric.py's `fingerprint`)
        claims.update(probe_steps=budget.probe_steps, probe_steps_done=budget.probe_steps_done)
    started = time.perf_counter()
    try:
        export_model(model, block_size, device, Path(EXPORT_FILE))
        claims["export_seconds"] = round(time.perf_counter() - started, 3)
    except Exception as exc:  # any failure of the user's model to export is the run's result, not a crash
        claims["export"] = f"{type(exc).__name__}: {exc}".strip()[:800]
        print(f"the model cannot be exported for the judge: {claims['export']}", flush=True)
    Path(CLAIMS_FILE).write_text(json.dumps(claims, indent=1))
    return summary_fields(claims, budget, device)


def model_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The logits of a model that returns them alone or first in a tuple."""
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


class _Logits(torch.nn.Module):
    """The model as the judge calls it: token ids (B, T) -> logits (B, T, vocab)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return model_logits(self.model, idx)


def eval_batch_size(block_size: int) -> int:
    """Windows per judged forward pass: 32, fewer for long contexts."""
    return max(1, min(32, (1 << 16) // max(1, block_size)))


def export_model(model: torch.nn.Module, block_size: int, device: str, path: Path) -> None:
    """`torch.export` the model in eval mode with fixed (eval batch, block_size) int64 inputs and save it."""
    was_training = model.training
    model.eval()
    try:
        example = torch.zeros(eval_batch_size(block_size), block_size, dtype=torch.long, device=device)
        with torch.no_grad():
            program = torch.export.export(_Logits(model), (example,))
        torch.export.save(program, str(path))
    finally:
        model.train(was_training)


def summary_fields(claims: dict[str, Any], budget: Budget, device: str) -> dict[str, str]:
    """The `---` block's fields, formatted: the budget spent, memory, MFU and wall time (val_bpb: the judge's)."""
    peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _own_peak_rss_mb()
    seconds = max(1e-9, budget.training_seconds)
    mfu = 100 * budget.flops / seconds / peak_flops(device) if budget.training_seconds else 0.0
    return {
        "val_bpb": "judged after the run" if claims["export"] == "ok" else "invalid (not exported)",
        "training_seconds": f"{budget.training_seconds:.1f}",
        "total_seconds": f"{time.perf_counter() - STARTED:.1f}",
        "peak_memory_mb": f"{peak_memory_mb:.1f}",
        "mfu_percent": f"{mfu:.2f}",
        "total_tokens_M": f"{budget.tokens / 1e6:.2f}",
        "num_steps": str(claims["num_steps"]),
        "num_params_M": f"{budget.n_params / 1e6:.2f}",
        "train_flops": f"{budget.flops:.3e}",
        "budget": str(budget.spec),
        "seed": str(claims["seed"]),
    }


def _own_peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from a big parent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------- peak FLOPs (for MFU)

CUDA_BF16_PEAK = {  # dense bf16 tensor-core FLOPs/s
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "4090": 165e12,
    "3090": 71e12,
}


def _measure_matmul_flops(
    device: str, dtype: torch.dtype, n: int, trials: int = 5, seconds: float = 0.2
) -> float:
    """The best of a few timed bursts of n x n matmuls (the best, because a busy machine only slows it)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        if device == "cuda":
            torch.cuda.synchronize()
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ b
            count += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2.0 * n**3 * count / (time.perf_counter() - started))
    return best


def peak_flops(device: str) -> float:
    """The machine's peak: CUDA from a table (or measured); CPU from a matmul benchmark run once and cached."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, value in CUDA_BF16_PEAK.items():
            if key in name:
                return value
        return _measure_matmul_flops("cuda", torch.bfloat16, 8192)
    key = f"{platform.machine()}-{platform.processor()}-{os.cpu_count()}-{torch.get_num_threads()}"
    path = cache_dir() / "peak_flops_cpu.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    if key not in cached:
        cached[key] = _measure_matmul_flops("cpu", torch.float32, 512)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cached, indent=1))
        except OSError:
            pass  # a contained run sees the cache read-only; metric.prepare_for_runs measured it beforehand
    return float(cached[key])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare the corpus and tokenizer (cached).")
    parser.add_argument("--corpus", help="a UTF-8 text file or a folder of .txt files (default: Shakespeare)")
    parser.add_argument(
        "--vocab", type=int, default=None, help="256 = bytes (default); more = BPE via rustbpe"
    )
    args = parser.parse_args(argv)
    try:
        data = prepare(args.corpus, args.vocab)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"corpus {data.corpus_hash}: vocab {data.vocab_size}, {data.train.size:,} train / {data.val.size:,} val tokens"
    )
    print(f"cache: {data.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
