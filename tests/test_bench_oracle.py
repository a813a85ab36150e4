"""The oracle (bench/bench_oracle.py): a sweep of the searched constants, each trained with the
arms' baseline seeds, on the fake harness (2 + |LEARNING_RATE - 0.5| + WOBBLE x (seed % 3); CRASH crashes);
and bench_research's share of the oracle's gain."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
from engine_fakes import make_source

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str) -> ModuleType:
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


research = sys.modules.get("bench_research") or _load("bench_research")
oracle_module = _load("bench_oracle")


def test_the_sweep_measures_each_configuration_once_and_finds_the_best(tmp_path: Path) -> None:
    source = make_source(tmp_path / "source")
    settings = research.Settings(0, None, baseline_seeds=2, source=source)
    out = tmp_path / "oracle"
    oracle = oracle_module.run_oracle(settings, 6, 0, out)
    configs = oracle["configurations"]
    assert configs[0]["name"] == "shipped" and configs[0]["values"] == pytest.approx([2.5001, 2.5002])
    assert oracle["shipped_bpb"] == pytest.approx(2.50015)
    assert len(configs) >= 4 and len({c["train_hash"] for c in configs}) == len(configs)
    scored = [c for c in configs if c["mean"] is not None]
    crashed = [c for c in configs if c["mean"] is None]
    assert all("CRASH False -> True" in c["changes"] for c in crashed)  # a crash is measured, never the best
    assert all(len(c["values"]) == 2 for c in scored)
    best = min(scored, key=lambda c: c["mean"])
    assert oracle["best"]["name"] == best["name"] and oracle["gain"] == pytest.approx(2.50015 - best["mean"])
    assert oracle["gain"] > 0.1  # the sweep moves LEARNING_RATE towards 0.5 (its range is 0.1 .. 1.0)
    saved = json.loads((out / "oracle.json").read_text())
    assert (
        saved["train_hash"] == oracle["train_hash"]
        and saved["budget"] is None
        and saved["baseline_seeds"] == 2
    )
    # Resumed: nothing is trained again (the saved results are read back), and other settings are refused.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("configs/*/result.json")}
    again = oracle_module.run_oracle(settings, 6, 0, out)
    assert again["gain"] == oracle["gain"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("configs/*/result.json")} == stamps
    with pytest.raises(research.BenchError, match="other settings"):
        oracle_module.run_oracle(settings, 7, 0, out)
    # bench_research takes it only for the same train.py, budget and baseline seeds.
    assert research.read_oracle(out / "oracle.json", settings)["gain"] == oracle["gain"]
    with pytest.raises(research.BenchError, match="not for these sessions"):
        research.read_oracle(out / "oracle.json", research.Settings(0, "5", baseline_seeds=2, source=source))


def test_each_arm_gain_is_a_share_of_the_oracles_at_10_and_at_n() -> None:
    sessions = {
        "a": [{"best_so_far": [3.0] + [2.9] * 10 + [2.8] * 10}, {"best_so_far": [3.1] + [3.1] * 20}],
        "b": [{"best_so_far": [3.0, 2.5]}],  # a session cut short: its last best counts
    }
    shares = research.oracle_shares(sessions, {"gain": 0.4}, 20)
    assert shares["a"] == pytest.approx({"10": 0.05 / 0.4, "20": 0.1 / 0.4})
    assert shares["b"] == pytest.approx({"10": 0.5 / 0.4, "20": 0.5 / 0.4})
    assert research.oracle_shares(sessions, {"gain": 0.0}, 8)["a"] == {"8": None}


def test_the_latin_hypercube_puts_one_value_in_each_stratum_of_every_range() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists = [
        FloatDistribution(1e-4, 1e-2, log=True),
        IntDistribution(16, 512, step=16),
        FloatDistribution(0.0, 0.5),
        CategoricalDistribution([False, True]),
    ]
    points = oracle_module.latin_hypercube(dists, 8, 3)
    assert len(points) == 8 and all(len(p) == 4 for p in points)
    import math

    rates = sorted(
        int(8 * (math.log(p[0]) - math.log(1e-4)) / (math.log(1e-2) - math.log(1e-4))) for p in points
    )
    assert rates == list(range(8))  # one per log-scale stratum
    assert sorted(int(p[2] / 0.5 * 8) for p in points) == list(range(8))
    assert all(16 <= p[1] <= 512 and p[1] % 16 == 0 for p in points)
    assert sorted(p[3] for p in points) == [False] * 4 + [True] * 4
    assert points == oracle_module.latin_hypercube(dists, 8, 3) != oracle_module.latin_hypercube(dists, 8, 4)
