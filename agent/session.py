"""Building an engine: the one place that settles the budget and chooses the trainers (the composition root
the CLI, the cockpit, the benchmarks and the tests share)."""

from __future__ import annotations

from dataclasses import replace

from agent.books import Books
from agent.config import EngineConfig, detect_device
from agent.engine import Engine
from agent.events import EventSink, Info
from agent.ledger import Ledger
from agent.proposals import Proposer
from agent.trainers.base import Trainer, TrainerFactory
from agent.workspace import Workspace


def open_engine(
    ws: Workspace,
    proposer: Proposer,
    config: EngineConfig,
    sink: EventSink,
    make_trainers: TrainerFactory | None = None,
) -> Engine:
    """An engine over `ws`, with the budget its baseline was measured with (WorkspaceError when `config` asks
    for another) and trainers on this machine or Ray (`make_trainers` replaces them: tests, benchmarks)."""
    ledger = Ledger(ws.ledger_path)
    try:
        budget, note = Books(ws, ledger, sink, config.default_margin).settled_budget(
            config.budget, detect_device()
        )
    finally:
        ledger.close()
    if note:
        sink(Info(message=note))
    settled = replace(config, budget=budget)
    return Engine(ws, proposer, settled, sink, make_trainers or trainer_factory(ws, settled))


def trainer_factory(ws: Workspace, config: EngineConfig) -> TrainerFactory:
    """Trainers for `ws`: `slots` local ones (one per GPU on CUDA) sharing one sandbox, or Ray tasks at an
    address (Ray is imported only then)."""

    def make(slots: int, ray: str | None, emit: EventSink) -> Trainer:
        device = detect_device()
        if ray:
            from agent.trainers.ray import RayTrainers

            return RayTrainers(
                ray,
                slots,
                device,
                harness=ws.path,
                harness_hashes=ws.harness_hashes(),
                config=config,
                env=ws.run_env,
            )
        from agent.sandbox.sandbox import Sandbox
        from agent.trainers.local import LocalTrainers

        sandbox = Sandbox(
            harness=ws.path,
            harness_hashes=ws.harness_hashes(),
            scratch_root=ws.state_dir / "scratch",
            config=config,
            env=ws.run_env,
            emit=emit,
        )
        return LocalTrainers(slots, sandbox, gpus=slots if device.startswith("cuda") else 0)

    return make
