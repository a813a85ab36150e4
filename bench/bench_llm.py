"""Seconds per valid proposal of the local researcher, cold and warm, and its token rates, for each model.

    python bench/bench_llm.py                      # every embedded model that is installed, 4 proposals each
    python bench/bench_llm.py --models qwen2.5-coder-1.5b --proposals 6 --threads 2

first:   a freshly loaded model and an empty KV cache: the whole prompt is read (a first run ever).
warm:    the same best train.py as the previous proposal, one more history row: only the tail is read.
cold:    the last valid proposal was kept, so train.py changed: read from the first changed line on, as after
         every keep (the prompt shows train.py's code before its top, imports and constants, so a kept
         constant costs a re-read of the top and the history only; bench_proposal_latency.py plays a whole
         session, before and after a change).
restart: a fresh load that restores the KV cache saved on disk (the prompt cache).
draft:   prompt lookup decoding: tokens guessed from the prompt / accepted by the model.
Run it on a quiet machine: other work on the CPU changes every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.edits import file_hash  # noqa: E402
from agent.proposals import HistoryRow, ProposalContext, ProposalFailed  # noqa: E402
from agent.researcher import models  # noqa: E402
from agent.researcher.backend import GenerationStats  # noqa: E402
from agent.researcher.proposer import ModelProposer  # noqa: E402


@dataclasses.dataclass
class Row:
    model: str
    kind: str
    seconds: float
    valid: bool
    stats: list[GenerationStats]
    description: str

    def cells(self) -> list[str]:
        prompt = sum(s.prompt_tokens for s in self.stats[:1])
        evaluated = sum(s.evaluated_tokens for s in self.stats)
        prompt_s = sum(s.prompt_seconds for s in self.stats)
        generated = sum(s.generated_tokens for s in self.stats)
        generate_s = sum(s.generate_seconds for s in self.stats)
        drafted = sum(s.drafted_tokens for s in self.stats)
        accepted = sum(s.accepted_tokens for s in self.stats)
        return [
            self.model,
            self.kind,
            f"{self.seconds:.1f}",
            "yes" if self.valid else "no",
            str(len(self.stats)),
            f"{prompt} ({evaluated})",
            f"{evaluated / prompt_s:.1f}" if prompt_s > 0 and evaluated > 1 else "-",
            str(generated),
            f"{generated / generate_s:.1f}" if generate_s > 0 else "-",
            f"{accepted}/{drafted}",
            self.description[:40],
        ]


HEADER = [
    "model",
    "kind",
    "s",
    "valid",
    "tries",
    "prompt tok (read)",
    "prompt tok/s",
    "gen tok",
    "gen tok/s",
    "draft ok",
    "idea",
]


def base_context(train_py: str, program_md: str) -> ProposalContext:
    return ProposalContext(
        program_md=program_md,
        train_py=train_py,
        history=(HistoryRow(0, "baseline", "baseline", 2.7123),),
        best_bpb=2.7123,
        noise_margin=0.0040,
        budget="60 s",
    )


def propose(
    proposer: ModelProposer, context: ProposalContext, model: str, kind: str
) -> tuple[Row, str | None]:
    """One timed proposal, and the train.py it would give (None if there was no valid proposal)."""
    started = time.perf_counter()
    new_text = None
    try:
        proposal = proposer.propose(context, lambda event: None, threading.Event())
        valid, description = proposal is not None, proposal.description if proposal else "(cancelled)"
        if proposal is not None:
            new_text = proposal.train_py  # what the proposer's dry run made of context.train_py
    except ProposalFailed as exc:
        valid, description = False, f"rejected: {exc.reason}"
    row = Row(model, kind, time.perf_counter() - started, valid, list(proposer.last_stats), description)
    return row, new_text


def bench_model(key: str, train_py: str, program_md: str, proposals: int, threads: int | None) -> list[Row]:
    model = models.find_embedded(key)
    if model is None or not models.parts_installed(model):
        hint = model.pip_hint() if model else "unknown model"
        print(f"skipping {key}: not installed ({hint})")
        return []
    print(f"{key}: assembling if needed ...", flush=True)
    path = models.assemble(model)
    rows: list[Row] = []
    context = base_context(train_py, program_md)
    load_started = time.perf_counter()
    proposer = ModelProposer(str(path), seed=1, threads=threads)
    proposer.load(lambda event: None)
    print(f"{key}: loaded in {time.perf_counter() - load_started:.1f} s; first proposal ...", flush=True)
    row, candidate = propose(proposer, context, key, "first")
    rows.append(row)
    kept: str | None = None
    for number in range(1, proposals + 1):
        # As the engine would: the last idea was run and discarded, the best train.py is unchanged.
        done = HistoryRow(number, rows[-1].description, "discard", 2.7123 + 0.001 * number)
        context = dataclasses.replace(
            context,
            history=(*context.history, done),
            tried_hashes=context.tried_hashes | ({file_hash(candidate)} if candidate else set()),
        )
        kept = candidate or kept
        if number == proposals:
            break
        print(f"{key}: warm proposal {number} ...", flush=True)
        row, candidate = propose(proposer, context, key, "warm")
        rows.append(row)
    if kept is not None:
        # The last valid idea won: it becomes the best train.py, new to the model from its first changed line.
        print(f"{key}: cold proposal (a kept change) ...", flush=True)
        last = context.history[-1]
        context = dataclasses.replace(
            context,
            train_py=kept,
            history=(*context.history[:-1], dataclasses.replace(last, status="keep", val_bpb=2.7000)),
            best_bpb=2.7000,
        )
        row, _ = propose(proposer, context, key, "cold")
        rows.append(row)
    proposer.close()
    print(f"{key}: restart with the prompt cache on disk ...", flush=True)
    restarted = ModelProposer(str(path), seed=2, threads=threads)
    restarted.load(lambda event: None)
    rows.append(propose(restarted, context, key, "restart")[0])
    restarted.close()
    return rows


def print_table(rows: list[Row]) -> None:
    table = [HEADER] + [row.cells() for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    print()
    for row in rows:
        if not row.valid:
            print(f"{row.model} {row.kind}: {row.description}")
    print()
    for model in dict.fromkeys(row.model for row in rows):
        mine = [row for row in rows if row.model == model]
        for kind in ("first", "warm", "cold", "restart"):
            some = [row for row in mine if row.kind == kind]
            valid = [row for row in some if row.valid]
            if some:
                per_valid = sum(row.seconds for row in some) / len(valid) if valid else float("inf")
                print(
                    f"{model} {kind}: {per_valid:.1f} s per valid proposal ({len(valid)}/{len(some)} valid)"
                )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(m.key for m in models.EMBEDDED))
    parser.add_argument(
        "--proposals", type=int, default=4, help="per model: one first, the rest warm (then one cold)"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--train", type=Path, default=ROOT / "nanogpt" / "train.py")
    parser.add_argument("--program", type=Path, default=ROOT / "program.md")
    args = parser.parse_args()
    train_py, program_md = args.train.read_text(), args.program.read_text()
    with tempfile.TemporaryDirectory(prefix="bench-llm-cache-") as cache:
        os.environ["AUTORESEARCH_CACHE"] = cache  # a private prompt cache: cold means cold
        rows: list[Row] = []
        for key in args.models.split(","):
            rows += bench_model(key.strip(), train_py, program_md, args.proposals, args.threads)
    print()
    print(
        f"train.py: {args.train} ({len(train_py)} chars); threads: {args.threads or 'all'}; cpus: {os.cpu_count()}"
    )
    if rows:
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
