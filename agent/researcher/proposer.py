"""The researcher: one proposal per call from a model (in-process llama.cpp or a local server), retried on a bad reply.

Builds the prompt from the engine's context, has the backend write a reply, checks it (`reply.check_reply`: the
edit grammar, a dry run on train.py, the ideas already tried; then, where the trainers probe, a trial of its
first steps: `ProposalContext.trial`) and asks again with what went wrong, at most MAX_TRIES times; every reply
is kept on the proposal, rejected or not.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

from agent import paths
from agent.edits import EditError, file_hash
from agent.events import EventSink, Info, ModelLoaded, ModelLoading, ProposalToken
from agent.proposals import Proposal, ProposalContext, ProposalFailed
from agent.researcher.backend import Backend, GenerationCancelled, GenerationStats
from agent.researcher.endpoint import EndpointModel, check_local_url, is_endpoint, split_model
from agent.researcher.local import DEFAULT_CONTEXT, LocalModel
from agent.researcher.models import ModelRef, resolve_model
from agent.researcher.prompt import (
    Message,
    PromptTooLong,
    build_prompt,
    followup,
    idea_directions,
    pick_direction,
)
from agent.researcher.reply import DuplicateIdea, ReplyError, check_reply


class TrialCrashed(ReplyError):
    """The reply's train.py crashed in its trial steps: retried like a reply that did not apply, with the
    traceback's last lines (an invented function or keyword, a shape error) for the model to avoid."""

    def __init__(self, description: str, crash: str) -> None:
        super().__init__(
            f'your change "{description}" crashed when train.py ran its first steps:\n{crash}\n'
            "Propose a change that runs: use only functions and arguments that exist in this torch."
        )


DEFAULT_TEMPERATURE = 0.7
DEFAULT_MAX_TOKENS = 384
"""Per reply. A valid proposal of the 1.5B model is 60-150 tokens; the rare one past 300 is a reply that lost
its way (a loop, a rewritten file), and each token costs ~0.1 s on 2 cores: a cut-off is retried sooner."""
MAX_TRIES = 3
_RETRY_HEAT = 0.1
"""Added to the temperature on each retry ..."""
_DUPLICATE_HEAT = 0.3
"""... or this much when the rejected reply repeated an idea already tried: a small model otherwise repeats it."""
_FOLLOWUP_RESERVE = 300
"""Tokens kept free for the follow-up message after a rejected reply."""


class ModelProposer:
    """Proposes one edit to train.py per call with a local model; see docs/contracts.md for the protocol."""

    name = "llama"

    def __init__(
        self,
        model: str | Path | None = None,
        seed: int | None = None,
        *,
        temperature: float = DEFAULT_TEMPERATURE,
        max_tries: int = MAX_TRIES,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        n_ctx: int | None = None,
        threads: int | None = None,
        prompt_cache: bool = True,
    ) -> None:
        self.temperature = temperature
        self.max_tries = max_tries
        self.max_tokens = max_tokens
        self.n_ctx = n_ctx
        self.threads = threads
        self.prompt_cache = prompt_cache
        self._rng = random.Random(seed) if seed is not None else random.SystemRandom()
        self._lock = threading.RLock()
        self._backend: Backend | None = None
        self._target = self._resolve(model)
        self.last_stats: list[GenerationStats] = []
        """One entry per reply of the last proposal (for the benchmark and the curious)."""

    @staticmethod
    def _resolve(model: str | Path | None) -> ModelRef | str:
        if isinstance(model, str) and is_endpoint(model):
            check_local_url(split_model(model)[0])
            return model
        return resolve_model(model)

    @property
    def model_name(self) -> str | None:
        """The model in use (or that will be loaded by the first proposal)."""
        target = self._target
        if isinstance(target, str):
            url, _, name = target.partition("#")
            return name or url
        return target.name

    def load(self, emit: EventSink) -> None:
        """Load the model now (the first proposal does it otherwise), emitting ModelLoading / ModelLoaded."""
        with self._lock:
            self._ensure_backend(emit)

    def _ensure_backend(self, emit: EventSink) -> Backend:
        if self._backend is not None:
            return self._backend
        target = self._target
        name = self.model_name or "model"
        started = time.perf_counter()
        if isinstance(target, str):
            url, model = split_model(target)
            self._backend = EndpointModel(url, model, self.n_ctx or DEFAULT_CONTEXT)
        else:
            last = [-1.0]

            def progress(fraction: float, message: str) -> None:
                if fraction - last[0] >= 0.02 or fraction >= 1.0:
                    last[0] = fraction
                    emit(ModelLoading(name=name, progress=fraction, message=message))

            emit(ModelLoading(name=name, progress=None, message=f"preparing {name}"))
            path = target.ensure_file(progress)
            emit(ModelLoading(name=name, progress=None, message=f"loading {path.name}"))
            state_dir = paths.cache_dir() / "llm-state" if self.prompt_cache else None
            self._backend = LocalModel(
                name, path, n_ctx=self.n_ctx, threads=self.threads, state_dir=state_dir
            )
        emit(ModelLoaded(name=name, seconds=time.perf_counter() - started))
        return self._backend

    def use_model(self, name: str, emit: EventSink) -> None:
        """Switch to another model between proposals; a bad choice raises ModelError and keeps the current one."""
        with self._lock:
            target = self._resolve(name)
            if self._backend is not None and target == self._target:
                emit(ModelLoaded(name=self.model_name or name, seconds=0.0))
                return
            old = self._backend
            self._backend = None
            self._target = target
            if old is not None:
                old.close()
            self._ensure_backend(emit)

    def set_threads(self, threads: int) -> None:
        """Fewer threads while a training run shares the CPU, more when it is alone."""
        with self._lock:
            self.threads = threads
            if self._backend is not None:
                self._backend.set_threads(threads)

    def close(self) -> None:
        with self._lock:
            if self._backend is not None:
                self._backend.close()
                self._backend = None

    def propose(self, context: ProposalContext, emit: EventSink, cancel: threading.Event) -> Proposal | None:
        """One proposal that applies cleanly to context.train_py.

        Raises ProposalFailed (every reply kept) after MAX_TRIES bad replies. Returns None if `cancel` was set:
        the engine checks `cancel` before it looks at the result.
        """
        with self._lock:
            if cancel.is_set():
                return None
            backend = self._ensure_backend(emit)
            model = self.model_name
            reserve = 2 * self.max_tokens + _FOLLOWUP_RESERVE + 64
            # The human's idea directions in turn, one per experiment (so a restart goes on where it was).
            directions = idea_directions(context.program_md)
            turn = len(context.history)
            direction = pick_direction(directions, turn)
            try:
                prompt = build_prompt(
                    context, backend.n_ctx - reserve, backend.count_tokens, direction=direction
                )
            except PromptTooLong as exc:
                raise ProposalFailed(str(exc), (), model=model, proposer=self.name) from None
            proposal_seed = self._rng.randrange(2**31)
            messages: tuple[Message, ...] = prompt.messages
            replies: list[str] = []
            self.last_stats = []
            error = ""
            temperature = self.temperature
            for attempt in range(self.max_tries):
                if attempt:
                    emit(ProposalToken(text="\n"))
                try:
                    completion = backend.complete(
                        messages,
                        max_tokens=self.max_tokens,
                        temperature=temperature,
                        seed=proposal_seed + attempt,
                        on_text=lambda piece: emit(ProposalToken(text=piece)),
                        cancel=cancel,
                    )
                except GenerationCancelled:
                    return None
                except PromptTooLong as exc:
                    raise ProposalFailed(str(exc), tuple(replies), model=model, proposer=self.name) from None
                self.last_stats.append(completion.stats)
                replies.append(completion.text)
                if attempt == 0:
                    backend.remember()  # the prompt is worth keeping whatever the reply was
                try:
                    parsed, new_text = check_reply(
                        context.train_py, completion.text, context.tried_hashes, context.tried_forms
                    )
                    crashed = context.trial(new_text, cancel) if context.trial is not None else None
                    if cancel.is_set():
                        return None
                    if crashed is not None:
                        raise TrialCrashed(parsed.description, crashed)
                except (ReplyError, EditError) as exc:
                    error = str(exc)
                    if completion.stats.finish_reason == "length":
                        error += f" (the reply was cut off after {completion.stats.generated_tokens} tokens: be brief)"
                    emit(Info(message=f"{model}: reply {attempt + 1} of {self.max_tries} rejected: {error}"))
                    # Hotter on each retry, and away from a repeated idea: else a small model says it again.
                    if isinstance(exc, DuplicateIdea):
                        temperature += _DUPLICATE_HEAT
                        direction = pick_direction(directions, turn + attempt + 1, avoid=direction)
                        messages = followup(prompt.messages, error, direction)
                    else:
                        temperature += _RETRY_HEAT
                        messages = followup(prompt.messages, error)
                    continue
                return Proposal(
                    description=parsed.description,
                    edits=parsed.edits,
                    reasoning=parsed.reasoning,
                    proposer=self.name,
                    model=model,
                    temperature=temperature,
                    seed=proposal_seed + attempt,
                    replies=tuple(replies),
                    train_py=new_text,
                    base_hash=file_hash(context.train_py),
                )
            raise ProposalFailed(
                f"no valid proposal after {self.max_tries} replies; the last was rejected: {error}",
                tuple(replies),
                model=model,
                proposer=self.name,
            )


def make_proposer(model: str | None, seed: int | None) -> ModelProposer:
    """The CLI's proposer: `model` None is the embedded default, else a name, a .gguf path or a localhost URL.

    Resolves the model now (ModelError if unknown or damaged) and loads it on the first proposal.
    """
    return ModelProposer(model, seed)
