"""The oracle: what a wide sweep of the searched constants reaches at the benchmark's budget, so that
bench_research can say what share of the reachable gain each arm found.

    .venv/bin/python bench/bench_oracle.py --budget 10 --seeds 2 -n 64 --out bench-out/oracle
    .venv/bin/python bench/bench_oracle.py --budget 10 --seeds 2 -n 64 --out bench-out/oracle --include bench-out/research
    .venv/bin/python bench/bench_research.py ... --oracle bench-out/oracle/oracle.json

The space is the one the optimisers search (`optuna_search.space` of nanogpt/train.py, or `--source`'s): the
shipped configuration first, then -n configurations spread over it (a Latin hypercube: in each constant's range,
log scale where it has one, one value in each of n equal strata, paired at random; seeded by --seed), then with `--include DIR` the final best train.py of every bench_research session
saved there (the best any arm found). A configuration that breaks a shape constraint (`N_EMBD % N_HEAD`) is
skipped. Each is trained with the baseline seeds every arm's sessions use (1..K), in a workspace of its own by
the real engine (its baseline: K seeds, nothing proposed), contained and judged like any run.

Written to OUT/oracle.json with the train.py hash, the budget and K it belongs to (bench_research refuses an
oracle of another train.py, budget or K): every configuration's values and mean, the best, and the oracle's gain
(the shipped configuration's mean minus the best's). Resumable: each configuration is saved when it is measured
(OUT/configs/I/result.json), a rerun measures only what is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_research import (  # noqa: E402
    BenchError,
    EventLog,
    Settings,
    _NoProposals,
    drive,
    workspace_of,
)

from agent.budget import Budget  # noqa: E402
from agent.edits import file_hash  # noqa: E402
from agent.ledger import Ledger  # noqa: E402
from agent.paths import nanogpt_dir  # noqa: E402
from agent.researcher.optuna_search import configured, space  # noqa: E402
from agent.researcher.random_search import read_block  # noqa: E402
from agent.session import open_engine  # noqa: E402
from agent.workspace import (  # noqa: E402
    HARNESS,
    TRAIN,
    Workspace,
    WorkspaceError,
    default_profile,
    get_profile,
    write_atomic,
)

ORACLE_FILE = "oracle.json"


def source_train(source: Path | None) -> str:
    """The train.py the sweep is of: the one a session's workspace starts from (the shipped one of this
    machine's profile, or `--source`'s)."""
    return ((source or nanogpt_dir()) / get_profile(default_profile()).folder / TRAIN).read_text(
        encoding="utf-8"
    )


def latin_hypercube(distributions: Sequence[Any], n: int, seed: int) -> list[list[Any]]:
    """`n` points spread over the distributions (Optuna's): in each dimension, one point in each of n equal
    strata (of the log scale where the distribution has one), the strata paired at random across dimensions."""
    import math
    import random

    from optuna.distributions import CategoricalDistribution, FloatDistribution

    rng = random.Random(seed)
    columns = []
    for dist in distributions:
        strata = list(range(n))
        rng.shuffle(strata)
        column = []
        for stratum in strata:
            u = (stratum + rng.random()) / n
            if isinstance(dist, CategoricalDistribution):
                column.append(dist.choices[min(int(u * len(dist.choices)), len(dist.choices) - 1)])
                continue
            low, high = float(dist.low), float(dist.high)
            value = (
                math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
                if dist.log
                else low + u * (high - low)
            )
            if isinstance(dist, FloatDistribution):
                column.append(value)
            else:
                step = dist.step or 1
                column.append(min(int(dist.high), int(dist.low) + int((value - low) / step + 0.5) * step))
        columns.append(column)
    return [list(point) for point in zip(*columns, strict=True)]


def configurations(train_py: str, n: int, seed: int) -> list[dict[str, Any]]:
    """The shipped configuration, then `n` configurations of the searched constants spread over their ranges
    (`latin_hypercube`; those that break a shape constraint left out): each {"name", "changes", "train_py"}."""
    block = read_block(train_py)
    params = space(block)
    found = [{"name": "shipped", "changes": [], "train_py": train_py}]
    if not params:
        return found
    for i, point in enumerate(latin_hypercube([p.distribution for p in params], n, seed)):
        values = {p.name: value for p, value in zip(params, point, strict=True)}
        made = configured(train_py, block, params, values)
        if made is not None and made[1]:
            found.append({"name": f"lhs-{i}", "changes": made[2], "train_py": made[0]})
    return found


def included(folder: Path) -> list[dict[str, Any]]:
    """The final best train.py of every bench_research session saved under `folder` (its session.json)."""
    found = []
    for saved in sorted(folder.glob("sessions/*/*/session.json")):
        session = json.loads(saved.read_text(encoding="utf-8"))
        keeps = session.get("keeps") or []
        if not keeps:
            continue
        ws = Workspace.open(Path(session["workspace"]))
        name = f"{session['arm']}-{session['index']}"
        found.append(
            {
                "name": name,
                "changes": [k["description"] for k in keeps],
                "train_py": ws.file_at(keeps[-1]["commit"]),
            }
        )
    return found


def measure(
    config: dict[str, Any], index: int, settings: Settings, source: Path | None, out: Path
) -> dict[str, Any]:
    """`config`'s val_bpb over the baseline seeds (saved; a saved one is read back)."""
    folder = out / "configs" / str(index)
    saved = folder / "result.json"
    if saved.is_file():
        return dict(json.loads(saved.read_text(encoding="utf-8")))
    harness = {name: ((source or nanogpt_dir()) / name).read_text(encoding="utf-8") for name in HARNESS}
    ws = workspace_of(folder, config["train_py"], harness, f"oracle{index}", default_profile())
    label = f"[oracle {index} {config['name']}]"
    print(f"{label} {', '.join(config['changes']) or 'the shipped values'}", flush=True)
    engine = open_engine(
        ws,
        _NoProposals(),
        settings.config(max_experiments=0),
        EventLog(folder / "events.jsonl", label, echo=False),
    )
    drive(engine)
    ledger = Ledger(ws.ledger_path)
    try:
        values = [r.val_bpb for r in ledger.runs(0) if r.outcome == "ok" and r.val_bpb is not None]
    finally:
        ledger.close()
    result = {
        "name": config["name"],
        "changes": config["changes"],
        "train_hash": file_hash(config["train_py"]),
        "values": values,
        "mean": statistics.fmean(values) if values and not engine.error else None,
        "error": engine.error,
    }
    write_atomic(saved, json.dumps(result, indent=2) + "\n")
    return result


def run_oracle(
    settings: Settings, n: int, seed: int, out: Path, include: Path | None = None
) -> dict[str, Any]:
    """Measure every configuration (saved ones skipped) and write OUT/oracle.json."""
    train_py = source_train(settings.source)
    key = {
        "train_hash": file_hash(train_py),
        "budget": settings.budget,
        "baseline_seeds": settings.baseline_seeds,
    }
    settled = out / "settings.json"
    asked = {**key, "n": n, "seed": seed}
    if settled.is_file() and json.loads(settled.read_text(encoding="utf-8")) != asked:
        raise BenchError(
            f"{out} holds an oracle of other settings: {settled.read_text(encoding='utf-8').strip()}"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(settled, json.dumps(asked, indent=2) + "\n")
    configs = configurations(train_py, n, seed) + (included(include) if include else [])
    results = [measure(config, i, settings, settings.source, out) for i, config in enumerate(configs)]
    scored = [r for r in results if r["mean"] is not None]
    shipped = results[0]["mean"]
    if shipped is None:
        raise BenchError(f"the shipped configuration did not train: {results[0]['error']}")
    best = min(scored, key=lambda r: r["mean"])
    oracle = {
        **key,
        "configurations": results,
        "shipped_bpb": shipped,
        "best": {"name": best["name"], "changes": best["changes"], "mean": best["mean"]},
        "gain": shipped - best["mean"],
    }
    write_atomic(out / ORACLE_FILE, json.dumps(oracle, indent=2) + "\n")
    return oracle


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-n", type=int, default=64, dest="n", help="configurations spread over the space (default 64)"
    )
    parser.add_argument("--budget", help="training budget of every run, as bench_research's")
    parser.add_argument(
        "--seeds", type=int, default=3, help="seeds per configuration, as the arms' baselines (default 3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the Latin hypercube (default 0)")
    parser.add_argument(
        "--source", type=Path, help="a folder shaped like nanogpt/ (default: the shipped one)"
    )
    parser.add_argument(
        "--include", type=Path, metavar="DIR", help="a bench_research results folder: its sessions' best"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out/oracle"), help="results folder")
    args = parser.parse_args(argv)
    try:
        if args.n < 0 or args.seeds < 1:
            raise BenchError("-n must be 0 or more and --seeds at least 1")
        budget = Budget.parse(args.budget).text if args.budget else None
        settings = Settings(0, budget, baseline_seeds=args.seeds, source=args.source)
        oracle = run_oracle(settings, args.n, args.seed, args.out, args.include)
    except KeyboardInterrupt:
        return 130
    except (BenchError, WorkspaceError, ValueError) as exc:
        print(f"oracle: error: {exc}", file=sys.stderr)
        return 2
    measured = [c for c in oracle["configurations"] if c["mean"] is not None]
    print(
        f"{len(measured)} of {len(oracle['configurations'])} configurations measured, {args.seeds} seeds each"
    )
    print(
        f"shipped {oracle['shipped_bpb']:.6f}; best {oracle['best']['mean']:.6f} ({oracle['best']['name']}: "
        f"{', '.join(oracle['best']['changes']) or 'the shipped values'}); oracle gain {oracle['gain']:.6f} bpb"
    )
    print(f"wrote {args.out / ORACLE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
