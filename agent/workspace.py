"""A research workspace: a git repo with train.py, the frozen harness (prepare.py, corpus.py, metric.py) and program.md, on
its own branch.

A workspace starts from a profile: `cpu` (nanogpt/train.py, a tiny byte-level model) or `gpu`
(nanogpt/profiles/gpu/: a GPT sized for one GPU and a 5-minute budget, on a BPE vocabulary).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import git
from gitdb import IStream

from agent import paths
from agent.edits import file_hash
from agent.sandbox.spec import HARNESS_FILES

TRAIN = "train.py"
HARNESS = HARNESS_FILES
"""Frozen files, by reader: prepare.py and corpus.py (what train.py imports) and metric.py (what only the judge
imports). Their SHA-256 is recorded at init and checked before every commit, after every run and before a judge
imports them."""
PROGRAM = "program.md"
STATE_DIR = ".autoresearch"
DISCARDED_PREFIX = "refs/autoresearch/discarded/"
ACTOR = git.Actor("autoresearch", "autoresearch@localhost")
_EXCLUDES = ("runs/", "results.tsv", "progress.png", f"{STATE_DIR}/", "__pycache__/", "*.pyc")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
PLACEHOLDER_PROGRAM = """# program.md

Research instructions for the agent. Goal: lower val_bpb of train.py within the fixed training budget.
Only train.py may change; prepare.py and corpus.py (data, tokenizer, budget) and metric.py (the score) are
frozen. Prefer simple changes; a small gain that adds a lot of complexity is not worth keeping.
"""


class WorkspaceError(Exception):
    """A workspace that cannot be created or opened; the message says what to do."""


@dataclass(frozen=True)
class Profile:
    """A starting point for a workspace: which train.py and program.md, and the environment of its runs."""

    name: str
    folder: str
    """Where its train.py (and program.md, if it has one) live, relative to nanogpt/; '' is nanogpt/ itself."""
    about: str
    """One line for `init` and `status`."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Environment every run of the workspace gets: how prepare.py builds the data (AUTORESEARCH_VOCAB)."""


PROFILES = {
    "cpu": Profile("cpu", "", "2 layers x 128, bytes, 60 wall seconds a run: sized for a laptop CPU"),
    "gpu": Profile(
        "gpu",
        "profiles/gpu",
        "8 layers x 512, BPE 8192, bf16, torch.compile, 5 minutes: sized for one GPU",
        {"AUTORESEARCH_VOCAB": "8192"},
    ),
}
"""Every profile by name; `cpu` is also what workspaces made before profiles existed hold."""


def default_profile() -> str:
    """AUTORESEARCH_PROFILE if set, else `gpu` where an NVIDIA GPU is visible, else `cpu`."""
    if name := os.environ.get("AUTORESEARCH_PROFILE"):
        return name
    from agent.config import detect_device

    return "gpu" if detect_device().startswith("cuda") else "cpu"


def get_profile(name: str) -> Profile:
    """The profile called `name`, or a WorkspaceError that lists the others."""
    try:
        return PROFILES[name]
    except KeyError:
        raise WorkspaceError(f"no profile {name!r}: choose one of {', '.join(PROFILES)}") from None


def default_tag() -> str:
    """Today's date as a run tag, autoresearch style: 'nov27'."""
    return time.strftime("%b%d").lower()


@dataclass
class Workspace:
    """An opened workspace: its folder, git repo and branch `autoresearch/<tag>`."""

    path: Path
    repo: git.Repo
    branch: str
    meta: dict[str, Any]

    # ---- creating and opening -------------------------------------------------------------------------

    @staticmethod
    def is_workspace(path: Path) -> bool:
        """Whether `path` holds a workspace made by `init`."""
        return (path / STATE_DIR / "workspace.json").is_file() and (path / ".git").exists()

    @classmethod
    def init(
        cls,
        path: Path,
        tag: str | None = None,
        source: Path | None = None,
        program: Path | None = None,
        profile: str | None = None,
    ) -> Workspace:
        """Create a workspace in `path` (new or empty) from `source` (nanogpt/) and a profile.

        The profile (default: `default_profile()`) picks train.py and program.md from its folder under
        `source`; `program` overrides the program.md; the profile's run environment goes into the metadata.
        """
        chosen = get_profile(profile or default_profile())
        path = Path(path).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise WorkspaceError(f"{path} is a file, not a folder")
        if cls.is_workspace(path):
            raise WorkspaceError(f"{path} is already a research workspace; use it with --workspace {path}")
        if path.exists() and any(path.iterdir()):
            raise WorkspaceError(
                f"{path} is not empty and is not a research workspace; choose a new or empty folder"
            )
        tag = tag or default_tag()
        if not _TAG.match(tag):
            raise WorkspaceError(f"tag {tag!r} may only hold letters, digits, '.', '_' and '-'")
        source = source or paths.nanogpt_dir()
        origins = {TRAIN: source / chosen.folder / TRAIN} | {name: source / name for name in HARNESS}
        for origin in origins.values():
            if not origin.is_file():
                raise WorkspaceError(f"{origin} is missing: the workspace is made from it")
        branch = f"autoresearch/{tag}"
        path.mkdir(parents=True, exist_ok=True)
        repo = guard_git(git.Repo.init(path, initial_branch=branch))
        for name, origin in origins.items():
            shutil.copyfile(origin, path / name)
        if program is None:
            own = source / chosen.folder / PROGRAM
            program = own if chosen.folder and own.is_file() else paths.default_program_md()
        if program.is_file():
            shutil.copyfile(program, path / PROGRAM)
        else:
            (path / PROGRAM).write_text(PLACEHOLDER_PROGRAM, encoding="utf-8")
        exclude = path / ".git" / "info" / "exclude"
        exclude.parent.mkdir(parents=True, exist_ok=True)
        with exclude.open("a", encoding="utf-8") as fh:
            fh.write("\n# autoresearch: run outputs and state stay untracked\n" + "\n".join(_EXCLUDES) + "\n")
        repo.index.add([TRAIN, *HARNESS, PROGRAM])
        commit = repo.index.commit(
            "baseline: train.py as shipped", author=ACTOR, committer=ACTOR, skip_hooks=True
        )
        meta = {
            "version": 1,
            "tag": tag,
            "branch": branch,
            "created_at": time.time(),
            "initial_commit": commit.hexsha,
            "profile": chosen.name,
            "env": dict(chosen.env),
            "harness": {name: file_hash((path / name).read_text(encoding="utf-8")) for name in HARNESS},
        }
        state = path / STATE_DIR
        state.mkdir(exist_ok=True)
        write_atomic(state / "workspace.json", json.dumps(meta, indent=2) + "\n")
        return cls(path=path, repo=repo, branch=branch, meta=meta)

    @classmethod
    def open(cls, path: Path) -> Workspace:
        """Open an existing workspace, or raise WorkspaceError."""
        path = Path(path).expanduser().resolve()
        if not cls.is_workspace(path):
            raise WorkspaceError(
                f"{path} is not a research workspace (create one with `autoresearch init {path}`)"
            )
        try:
            meta = json.loads((path / STATE_DIR / "workspace.json").read_text(encoding="utf-8"))
            repo = guard_git(git.Repo(path))
        except (OSError, ValueError, git.GitError) as exc:
            raise WorkspaceError(f"{path}: the workspace is damaged: {exc}") from None
        return cls(path=path, repo=repo, branch=meta["branch"], meta=meta)

    @classmethod
    def open_or_init(cls, path: Path, tag: str | None = None, profile: str | None = None) -> Workspace:
        """Open the workspace at `path`, creating it first (from `profile`) when the folder is new or empty."""
        path = Path(path).expanduser().resolve()
        return cls.open(path) if cls.is_workspace(path) else cls.init(path, tag=tag, profile=profile)

    # ---- places ---------------------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.path / STATE_DIR

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite"

    @property
    def results_tsv(self) -> Path:
        return self.path / "results.tsv"

    @property
    def runs_dir(self) -> Path:
        return self.path / "runs"

    @property
    def train_path(self) -> Path:
        return self.path / TRAIN

    @property
    def initial_commit(self) -> str:
        return str(self.meta["initial_commit"])

    @property
    def profile(self) -> str:
        """The profile the workspace was made from (`cpu` for workspaces older than profiles)."""
        return str(self.meta.get("profile", "cpu"))

    @property
    def run_env(self) -> dict[str, str]:
        """Environment every training run of this workspace gets (its profile's, recorded at init)."""
        return {str(k): str(v) for k, v in self.meta.get("env", {}).items()}

    def run_dir(self, exp_id: int) -> Path:
        return self.runs_dir / str(exp_id)

    def read_train(self) -> str:
        return self.train_path.read_text(encoding="utf-8")

    def read_program(self) -> str:
        try:
            return (self.path / PROGRAM).read_text(encoding="utf-8")
        except FileNotFoundError:
            return PLACEHOLDER_PROGRAM

    # ---- git ------------------------------------------------------------------------------------------

    def head(self) -> str:
        """The commit the branch points at."""
        return self.repo.git.rev_parse(f"refs/heads/{self.branch}")

    def file_at(self, commit: str, name: str = TRAIN) -> str:
        """A file's text at a commit."""
        return self.repo.git.show(f"{commit}:{name}", strip_newline_in_stdout=False)

    def harness_problems(self) -> list[str]:
        """The frozen files whose SHA-256 differs from the one recorded at init."""
        problems = []
        for name, digest in self.meta["harness"].items():
            try:
                text = (self.path / name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                problems.append(name)
                continue
            if file_hash(text) != digest:
                problems.append(name)
        return problems

    @property
    def frozen_files(self) -> tuple[str, ...]:
        """The harness files this workspace froze at init (HARNESS, or fewer in one made before a file joined it)."""
        return tuple(self.meta["harness"])

    def restore_harness(self) -> None:
        """Put the frozen files back as committed."""
        self.repo.git.checkout(self.initial_commit, "--", *self.frozen_files)

    def changed_tracked_files(self) -> list[str]:
        """Tracked files whose working copy differs from the branch head, program.md aside (the user's)."""
        names = self.repo.git.diff("--name-only", f"refs/heads/{self.branch}").splitlines()
        return [name for name in names if name and name != PROGRAM]

    def commit_candidate(self, text: str, parent: str, message: str) -> str:
        """Commit `text` as train.py on top of `parent` without touching the branch or the working tree (a
        candidate trains from its commit while the workspace shows the best train.py); returns the commit."""
        data = text.encode("utf-8")
        blob = self.repo.odb.store(IStream("blob", len(data), io.BytesIO(data))).hexsha
        blob_sha = blob.decode() if isinstance(blob, bytes) else str(blob)
        with tempfile.TemporaryDirectory() as tmp:
            env = {
                "GIT_INDEX_FILE": str(Path(tmp) / "index"),
                "GIT_AUTHOR_NAME": ACTOR.name or "autoresearch",
                "GIT_AUTHOR_EMAIL": ACTOR.email or "autoresearch@localhost",
                "GIT_COMMITTER_NAME": ACTOR.name or "autoresearch",
                "GIT_COMMITTER_EMAIL": ACTOR.email or "autoresearch@localhost",
            }
            self.repo.git.read_tree(parent, env=env)
            self.repo.git.update_index("--add", "--cacheinfo", f"100644,{blob_sha},{TRAIN}", env=env)
            tree = self.repo.git.write_tree(env=env)
            return str(self.repo.git.commit_tree(tree, "-p", parent, "-m", message, env=env)).strip()

    def move_branch(self, commit: str) -> None:
        """Point the branch at `commit` and make train.py and the harness match it (program.md untouched)."""
        self.repo.git.update_ref(f"refs/heads/{self.branch}", commit)
        self.repo.git.symbolic_ref("HEAD", f"refs/heads/{self.branch}")
        self.repo.git.checkout(commit, "--", TRAIN, *self.frozen_files)

    def save_discarded(self, exp_id: int, commit: str) -> None:
        """Keep a discarded commit reachable under refs/autoresearch/discarded/<id>."""
        self.repo.git.update_ref(f"{DISCARDED_PREFIX}{exp_id}", commit)

    def keep_ref(self, ref: str, commit: str) -> None:
        """Keep `commit` reachable under `ref` (refs/autoresearch/...)."""
        self.repo.git.update_ref(ref, commit)

    def drop_ref(self, ref: str) -> None:
        self.repo.git.update_ref("-d", ref)

    def check_harness(self) -> None:
        """WorkspaceError when the workspace's frozen harness cannot take part in today's runs, which a judge
        scores with the frozen metric.py: one made before runs were judged outside the run has a prepare.py that
        cannot hand a model over; one made before the harness was split in two has no frozen metric.py."""
        if set(HARNESS) <= set(self.frozen_files):
            return
        try:
            prepare = (self.path / HARNESS[0]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            prepare = ""  # recovery puts the committed harness back; the judge's file is missing either way
        if prepare and "def judge(" not in prepare:
            raise WorkspaceError(
                f"{self.path} was made before runs were scored by a separate judge: its frozen prepare.py "
                "cannot hand a model over, so no run could be scored. Start a new workspace with "
                "`autoresearch init NEW_FOLDER`; this one stays readable with `autoresearch log`."
            )
        missing = ", ".join(name for name in HARNESS if name not in self.frozen_files)
        raise WorkspaceError(
            f"{self.path} was made before the frozen harness was split by reader (prepare.py and corpus.py for "
            f"the run, metric.py for the judge): it has no frozen {missing}, so no run could be scored. "
            "Start a new workspace with `autoresearch init NEW_FOLDER`; this one stays readable with "
            "`autoresearch log`."
        )

    def harness_hashes(self) -> dict[str, str]:
        """The frozen files' SHA-256 by name, as recorded at init: the only harness a judge may import."""
        return {str(name): str(digest) for name, digest in self.meta["harness"].items()}

    def discarded_refs(self) -> dict[int, str]:
        """Experiment id -> commit of every saved discarded commit."""
        out = self.repo.git.for_each_ref("--format=%(refname) %(objectname)", DISCARDED_PREFIX)
        refs: dict[int, str] = {}
        for line in out.splitlines():
            name, _, sha = line.partition(" ")
            with contextlib.suppress(ValueError):
                refs[int(name.removeprefix(DISCARDED_PREFIX))] = sha
        return refs

    def is_commit(self, sha: str | None) -> bool:
        if not sha:
            return False
        try:
            self.repo.git.cat_file("-e", f"{sha}^{{commit}}")
        except git.GitCommandError:
            return False
        return True

    def clear_stale_git_locks(self) -> list[str]:
        """Remove lock files a killed git operation left behind (call only while holding the engine lock)."""
        removed = []
        git_dir = Path(self.repo.git_dir)
        candidates = [git_dir / "index.lock", git_dir / "HEAD.lock", *git_dir.glob("refs/**/*.lock")]
        for lock in candidates:
            if lock.is_file():
                lock.unlink()
                removed.append(str(lock.relative_to(git_dir)))
        return removed

    # ---- one engine at a time -------------------------------------------------------------------------

    @contextlib.contextmanager
    def engine_lock(self) -> Iterator[None]:
        """Hold the workspace's engine lock (released by the kernel even on kill -9)."""
        self.state_dir.mkdir(exist_ok=True)
        fh: IO[str] = (self.state_dir / "engine.lock").open("a+", encoding="utf-8")
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "?"
                raise WorkspaceError(
                    f"another engine (pid {holder}) is running in {self.path}; stop it first"
                ) from None
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            yield
        finally:
            fh.close()

    def engine_running(self) -> bool:
        """Whether an engine holds this workspace's lock now."""
        lock = self.state_dir / "engine.lock"
        if not lock.exists():
            return False
        with lock.open("a+", encoding="utf-8") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
        return False


_GUARDED_GIT_CONFIG = {
    "core.hooksPath": os.devnull,  # no hook runs, whatever .git/hooks holds
    "core.fsmonitor": "false",
    "core.attributesFile": os.devnull,
}


def guard_git(repo: git.Repo) -> git.Repo:
    """Make every git command the engine runs in `repo` ignore what a run or another program could plant:
    hooks, an fsmonitor command, the system and global config (GitPython's own commits skip hooks too)."""
    env = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    env["GIT_CONFIG_COUNT"] = str(len(_GUARDED_GIT_CONFIG))
    for i, (key, value) in enumerate(_GUARDED_GIT_CONFIG.items()):
        env[f"GIT_CONFIG_KEY_{i}"], env[f"GIT_CONFIG_VALUE_{i}"] = key, value
    repo.git.update_environment(**env)
    return repo


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that a reader (or a kill) sees the old text or the new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
