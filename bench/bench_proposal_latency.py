"""Seconds per valid proposal as a user meets them: a simulated session, before and after a change, alternating.

    python bench/bench_proposal_latency.py --before 5f0c1e2 --steps 12 --sessions 2
    python bench/bench_proposal_latency.py --before 5f0c1e2 --after HEAD --steps 12

Each arm is the `agent` package of a git commit (`--after` defaults to the working tree), run by a worker
process of its own that loads the model (the embedded default, or `--model`) once and plays a session: the
shipped train.py and program.md, a baseline history row, then propose -> decide -> propose ... with retries,
the proposer's own prompt cache on disk (a private, empty one) and everything else as the engine does it. A
valid proposal is kept or discarded by a schedule drawn from `--seed` (the same decisions, by step, for both
arms); a kept proposal's edits become the best train.py, as after a real keep; a proposal rejected after its
retries is a `rejected` history row. No training runs: the model has the CPU to itself (in a real session it
may share it with a training run). The arms take turns step by step (their order alternating), so load from
other processes on the machine falls on both alike; still, on a shared machine the figures are noisy.

Prints one line per proposal and, per arm, the median and p90 of the seconds per valid proposal (retries
included; the session's first proposal, which reads the whole prompt, separately), the share of proposals
that were valid, tries per proposal and the prompt tokens read per try. `--json PATH` writes every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASELINE_BPB = 2.7123


# ---- the worker: one arm's session in its own process ----------------------------------------------------


def worker(model: str, seed: int, threads: int | None) -> int:
    """Play one session, a proposal per 'propose' line on stdin; one JSON line per proposal on stdout."""
    from agent.edits import apply_edits, file_hash
    from agent.proposals import HistoryRow, ProposalContext, ProposalFailed

    try:
        from agent.researcher.proposer import ModelProposer
    except ImportError:  # an arm from before agent/researcher/: the same proposer, in agent/llm.py
        from agent.llm import LlamaProposer as ModelProposer  # type: ignore[import-not-found,no-redef]

    train_py = (ROOT / "nanogpt" / "train.py").read_text()
    context = ProposalContext(
        program_md=(ROOT / "program.md").read_text(),
        train_py=train_py,
        history=(HistoryRow(0, "baseline", "baseline", BASELINE_BPB),),
        best_bpb=BASELINE_BPB,
        noise_margin=0.0040,
        budget="60 s",
        tried_hashes=frozenset({file_hash(train_py)}),
    )
    started = time.perf_counter()
    proposer = ModelProposer(model, seed=seed, threads=threads)
    proposer.load(lambda event: None)
    print(json.dumps({"loaded": time.perf_counter() - started}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        exp_id = len(context.history)
        began, began_cpu = time.perf_counter(), time.process_time()
        new_text = None
        try:
            proposal = proposer.propose(context, lambda event: None, threading.Event())
            assert proposal is not None
            new_text = apply_edits(context.train_py, proposal.edits)
            description, replies = proposal.description, proposal.replies
        except ProposalFailed as exc:
            description, replies = f"rejected: {exc.reason}", exc.replies
        seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - began_cpu
        stats = [dataclasses.asdict(s) for s in proposer.last_stats]
        keep = bool(command["keep"]) and new_text is not None
        if new_text is None:
            row = HistoryRow(exp_id, description, "rejected", None)
        elif keep:
            best = (context.best_bpb or BASELINE_BPB) - 0.01
            row = HistoryRow(exp_id, description, "keep", best)
        else:
            row = HistoryRow(exp_id, description, "discard", (context.best_bpb or BASELINE_BPB) + 0.005)
        context = dataclasses.replace(
            context,
            history=(*context.history, row),
            tried_hashes=context.tried_hashes | ({file_hash(new_text)} if new_text else set()),
        )
        if keep and new_text is not None:
            context = dataclasses.replace(context, train_py=new_text, best_bpb=row.val_bpb)
        result = {
            "step": command["step"],
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "valid": new_text is not None,
            "kept": keep,
            "tries": len(stats),
            "description": description,
            "stats": stats,
            "replies": list(replies),
        }
        print(json.dumps(result), flush=True)
    proposer.close()
    return 0


# ---- the driver ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Arm:
    name: str
    root: Path
    process: subprocess.Popen[str] | None = None
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def start(self, model: str, seed: int, threads: int | None, cache: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(self.root), AUTORESEARCH_CACHE=str(cache))
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", model]
        command += ["--seed", str(seed)] + (["--threads", str(threads)] if threads else [])
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def read(self) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker ended early (exit {self.process.wait()})")
        return dict(json.loads(line))

    def step(self, step: int, keep: bool) -> dict[str, Any]:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(json.dumps({"step": step, "keep": keep}) + "\n")
        self.process.stdin.flush()
        row = self.read()
        self.rows.append(row)
        return row

    def stop(self) -> None:
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


def agent_tree(commit: str, into: Path) -> Path:
    """The `agent` package of `commit` under `into` (what PYTHONPATH points a worker at)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit, "agent"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def summarize(arm: Arm) -> str:
    rows = arm.rows
    later = [r for r in rows if r["step"] > 0]
    valid = [r["seconds"] for r in later if r["valid"]]
    total = sum(r["seconds"] for r in later)
    reads = [s["prompt_tokens"] - s["reused_tokens"] for r in later for s in r["stats"]]
    first = [r for r in rows if r["step"] == 0]
    lines = [
        f"{arm.name}: {len(rows)} proposals, {sum(r['valid'] for r in rows)} valid, "
        f"{sum(r['kept'] for r in rows)} kept; first proposals (whole prompt read): "
        + ", ".join(f"{r['seconds']:.1f} s{'' if r['valid'] else ' (rejected)'}" for r in first)
    ]
    if valid:
        lines.append(
            f"  after the first: valid {len(valid)}/{len(later)}; wall seconds per valid proposal (retries "
            f"included): median {statistics.median(valid):.1f}, p90 {p90(valid):.1f}; all seconds / valid: "
            f"{total / len(valid):.1f}"
        )
        cpu = [r["cpu_seconds"] for r in later if r["valid"] and "cpu_seconds" in r]
        if cpu:
            lines.append(
                f"  CPU seconds of the model's process per valid proposal: median {statistics.median(cpu):.1f}, "
                f"p90 {p90(cpu):.1f} (less sensitive to other load than wall seconds)"
            )
    if later:
        tries = [r["tries"] for r in later]
        lines.append(
            f"  tries per proposal: mean {statistics.mean(tries):.2f}; prompt tokens read per try: "
            f"median {statistics.median(reads):.0f}, p90 {p90(reads):.0f}; generated per try: median "
            f"{statistics.median([s['generated_tokens'] for r in later for s in r['stats']]):.0f}"
        )
        kept_next = [
            r["seconds"]
            for prev, r in zip(rows, rows[1:], strict=False)
            if r["step"] > 0 and prev["kept"] and r["valid"]
        ]
        if kept_next:
            lines.append(
                f"  right after a keep: median {statistics.median(kept_next):.1f} s ({len(kept_next)} proposals)"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", help="the commit whose agent/ is the 'before' arm")
    parser.add_argument(
        "--after", default=None, help="a commit for the 'after' arm (default: the working tree)"
    )
    parser.add_argument("--steps", type=int, default=10, help="proposals per session and arm")
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--keep", type=float, default=0.35, help="chance that a valid proposal is kept")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, os.environ.get("PYTHONPATH", str(ROOT)))
        return worker(args.model, args.seed, args.threads)
    sys.path.insert(0, str(ROOT))
    from agent.researcher import models

    embedded = models.find_embedded(args.model)
    model = str(models.assemble(embedded)) if embedded else args.model
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        roots = {"after": ROOT if args.after is None else agent_tree(args.after, Path(tmp) / "after")}
        if args.before:
            roots = {"before": agent_tree(args.before, Path(tmp) / "before"), **roots}
        arms = [Arm(name, root) for name, root in roots.items()]
        for session in range(args.sessions):
            seed = args.seed + session
            decisions = random.Random(seed)
            keeps = [decisions.random() < args.keep for _ in range(args.steps)]
            for arm in arms:
                arm.rows = []
                arm.start(model, seed, args.threads, Path(tmp) / f"cache-{arm.name}-{session}")
                print(f"session {session} {arm.name}: loaded in {arm.read()['loaded']:.1f} s", flush=True)
            for step in range(args.steps):
                order = arms if step % 2 == 0 else arms[::-1]
                for arm in order:
                    row = arm.step(step, keeps[step])
                    read = [s["prompt_tokens"] - s["reused_tokens"] for s in row["stats"]]
                    print(
                        f"session {session} step {step:2d} {arm.name:6s} {row['seconds']:5.1f} s "
                        f"(cpu {row['cpu_seconds']:5.1f} s) "
                        f"{'valid' if row['valid'] else 'REJECTED'} {'kept ' if row['kept'] else ''}"
                        f"tries {row['tries']} read {read} gen {[s['generated_tokens'] for s in row['stats']]} "
                        f"| {row['description'][:70]}",
                        flush=True,
                    )
            for arm in arms:
                arm.stop()
                results.setdefault(arm.name, []).extend(dict(r, session=session) for r in arm.rows)
    print()
    print(f"model {model}; threads {args.threads or 'all'}; cpus {os.cpu_count()}; keep chance {args.keep}")
    for name, rows in results.items():
        print(summarize(Arm(name, ROOT, rows=rows)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
