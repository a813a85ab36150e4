"""Proposing while training on one machine: what it costs the run and the proposal (issue 11 §2).

    python bench/bench_overlap.py                       # the default model, 30 s runs, threads none,1,2
    python bench/bench_overlap.py --seconds 60 --threads 0,1,2 --model qwen2.5-coder-1.5b
    python bench/bench_overlap.py --cpu --threads 0,1,2  # a CPU-seconds budget: does the run still lose steps?

For each setting, the real train.py trains for a wall budget (the harness as a run gets it, uncontained) while
the local model generates without pause with `n_threads` threads (0: no generation, the run alone); then the
model generates alone. Printed: the run's training tokens/s and steps against the run alone, and the model's
tokens/s against the model alone. Under a wall budget (the CPU default) every token the run loses to the
model is a handicap on its val_bpb that the baseline, measured alone, did not have: the number bends.
With `--cpu` the runs get a CPU-seconds budget instead (the run is charged only the CPU time it gets): what
it still loses beside the model (shared caches and memory bandwidth, waits) is the handicap left.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # llama.cpp beside training (see the README)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import paths  # noqa: E402
from agent.researcher import models  # noqa: E402

PROMPT = (
    "Write a long, careful explanation of how the learning rate schedule of a small GPT model affects its "
    "validation loss, with examples in Python code.\n"
)


def train(folder: Path, seconds: float, cpu: bool = False) -> dict[str, float]:
    """One run of the real train.py for `seconds` wall (or CPU) seconds; its tokens/s, steps and wall seconds."""
    budget = f"{seconds:g}cpu" if cpu else str(seconds)
    env = dict(os.environ, AUTORESEARCH_BUDGET=budget, AUTORESEARCH_SEED="1", PYTHONUNBUFFERED="1")
    started = time.monotonic()
    env["AUTORESEARCH_CLOCK_START"] = f"{time.time():.6f}"
    proc = subprocess.run(
        [sys.executable, "train.py"], cwd=folder, env=env, capture_output=True, text=True, timeout=seconds * 4
    )
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed: {proc.stderr.strip().splitlines()[-1:]}")
    summary = dict(re.findall(r"^(\w+):\s+([0-9.e+-]+)\s*$", proc.stdout, re.MULTILINE))
    tokens = float(summary["total_tokens_M"]) * 1e6
    return {
        "tok_s": tokens / float(summary["training_seconds"]),
        "steps": float(summary["num_steps"]),
        "wall": time.monotonic() - started,
    }


class Generator:
    """The model writing without pause until stopped; counts the tokens."""

    def __init__(self, llm: object) -> None:
        self.llm, self.tokens, self.seconds = llm, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            for _ in self.llm.create_completion(PROMPT, max_tokens=64, temperature=0.8, stream=True):  # type: ignore[attr-defined]
                self.tokens += 1
                if self._stop.is_set():
                    break
        self.seconds = time.monotonic() - started

    def __enter__(self) -> Generator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="budget of each run (wall s; CPU s with --cpu)"
    )
    parser.add_argument("--cpu", action="store_true", help="a CPU-seconds budget of --seconds instead")
    parser.add_argument("--threads", default="0,1,2", help="model threads per setting (0: the run alone)")
    parser.add_argument("--model", default=None, help="the local model (default: the embedded default)")
    args = parser.parse_args()
    settings = [int(t) for t in args.threads.split(",")]

    from llama_cpp import Llama

    path = models.resolve_model(args.model).ensure_file()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in ("train.py", "prepare.py"):
            shutil.copy(paths.nanogpt_dir() / name, folder / name)
        subprocess.run([sys.executable, "prepare.py"], cwd=folder, check=True, capture_output=True)

        def load(threads: int) -> Llama:
            return Llama(
                model_path=str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False
            )

        rows: list[tuple[str, dict[str, float], float | None]] = []
        alone_gen: dict[int, float] = {}
        alone_run = train(folder, args.seconds, args.cpu)
        for threads in settings:
            if threads == 0:
                rows.append(("run alone", alone_run, None))
                continue
            llm = load(threads)
            with Generator(llm) as gen:
                time.sleep(min(20.0, args.seconds))
            alone_gen[threads] = gen.rate
            with Generator(llm) as gen:
                run = train(folder, args.seconds, args.cpu)
            rows.append((f"model with {threads} thread(s)", run, gen.rate))
            del llm
    kind = "CPU" if args.cpu else "wall"
    print(f"\n{os.cpu_count()} cores, {args.seconds:.0f} {kind} s runs, model {path.name}")
    print(
        f"{'setting':<24} {'run tok/s':>10} {'vs alone':>9} {'steps':>6} {'wall s':>7} "
        f"{'model tok/s':>12} {'vs alone':>9}"
    )
    for label, run, rate in rows:
        threads = int(label.split()[2]) if rate is not None else 0
        model = (
            f"{rate:12.1f} {rate / alone_gen[threads]:8.2f}x" if rate is not None else f"{'-':>12} {'-':>9}"
        )
        print(
            f"{label:<24} {run['tok_s']:10.0f} {run['tok_s'] / alone_run['tok_s']:8.2f}x {run['steps']:6.0f} "
            f"{run['wall']:7.1f} {model}"
        )
    for threads, rate in alone_gen.items():
        print(f"model alone, {threads} thread(s): {rate:.1f} tok/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
