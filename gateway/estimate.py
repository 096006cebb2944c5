"""Admission at create (issue 28): a batch's tokens estimated from its input file, the
queue ahead of it, and its ETA on the workers' measured throughput.

- `count`: a file's prompt tokens (by the model's own tokenizer where the gateway has its
  folder, else 4 bytes a token) and the most it may generate (each line's `max_tokens`,
  `max_completion_tokens` or `max_output_tokens`, else `default_max_tokens`, times `n`;
  none for a pooling endpoint).
- `Admission.estimate`: those, the tokens of the same model's unfinished batches of at
  least its priority (`millrace.storage.enqueued`), and the ETA over the tokens a second
  the live workers measured (`WorkerStatus`); None until a worker has measured it. Outputs
  count for the ETA at the tokens a request of the model generated on average (never
  above a batch's maximum): `max_tokens` is a cap, and a batch of 4,096-token caps whose
  answers take 300 would otherwise be refused for a day it does not need.
- `Admission.admit`: the estimate checked at create — the project's enqueued-token quota
  (`token_limit_exceeded`, 429) and the window (`completion_window_too_short`, 400, with the
  earliest window that fits) — before anything is stored or published.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.worker_board import WorkerBoard
from millrace.errors import InvalidRequestError, RateLimitError
from millrace.filestore import FileStore
from millrace.protocol import GENERATE_ENDPOINTS, BatchEstimate
from millrace.settings import Settings
from millrace.storage.enqueued import Enqueued, Queued, queued
from millrace.storage.principals import Principal
from millrace.storage.store import Store

BYTES_PER_TOKEN = 4  # without the model's tokenizer
MESSAGE_TOKENS = 4  # what a chat template adds around each message (OpenAI counts 3-4)
CHUNK_LINES = 2000  # lines tokenized at once
COUNTS_KEPT = 64  # files whose counts are kept (a file never changes)


@dataclass(frozen=True)
class TokenBudget:
    """A project's enqueued-token quota for one model, as OpenAI's `x-ratelimit-*-tokens`
    headers show it: the limit, what is left of it, and the seconds until the project's
    unfinished batches of the model are likely done (None: no throughput measured yet)."""

    limit: int
    remaining: int
    reset_s: int | None


@dataclass(frozen=True)
class Admitted:
    """What admission made of a batch it let in."""

    estimate: BatchEstimate
    enqueued: Enqueued
    budget: TokenBudget | None  # None: no quota applies


@dataclass(frozen=True)
class Counted:
    model: str | None
    lines: int
    prompt_tokens: int
    max_output_tokens: int


class Tokenizers:
    """Each served model's tokenizer (its folder's `tokenizer.json`, read by the `tokenizers`
    library vLLM installs), where the gateway's machine has the folder; None elsewhere."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._loaded: dict[str, Any] = {}

    def get(self, model: str) -> Any | None:
        if model in self._loaded:
            return self._loaded[model]
        served = self._settings.served_models()
        if model not in served:
            return None
        folder = Path(served[model] or self._settings.model_cache / model)
        try:
            from tokenizers import Tokenizer
        except ImportError:  # a gateway installed without vLLM
            return None
        if not (folder / "tokenizer.json").exists():
            return None  # looked for again next time (a worker may prepare it meanwhile)
        self._loaded[model] = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return self._loaded[model]


def _strings(value: Any) -> Iterator[str | list[int]]:
    """The text in a prompt value (strings, token id lists, and parts holding them)."""
    token_ids = isinstance(value, list) and value and all(isinstance(v, int) for v in value)
    if isinstance(value, str) or token_ids:
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key in ("content", "text", "input", "output"):
            if key in value:
                yield from _strings(value[key])


def _prompt(body: dict[str, Any]) -> tuple[list[str | list[int]], int]:
    """A request's prompt texts, and the tokens a template adds."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return list(_strings(messages)), MESSAGE_TOKENS * len(messages)
    texts = [t for key in ("instructions", "prompt", "input", "text", "text_1", "text_2",
                           "query", "documents") for t in _strings(body.get(key))]
    return texts, 0


def _output(body: dict[str, Any], endpoint: str, default_max_tokens: int) -> int:
    if endpoint not in GENERATE_ENDPOINTS:
        return 0
    most = (body.get("max_completion_tokens") or body.get("max_tokens")
            or body.get("max_output_tokens") or default_max_tokens)
    try:
        return int(most) * int(body.get("n") or 1)
    except (TypeError, ValueError):
        return default_max_tokens


def count(lines: Iterable[bytes], endpoint: str, tokenizers: Tokenizers,
          default_max_tokens: int) -> Counted:
    """A batch file's estimated tokens (lines that do not parse count nothing: validation
    refuses them)."""
    model: str | None = None
    total = prompt = output = 0
    texts: list[str] = []

    def tokens(pending: list[str]) -> int:
        tokenizer = tokenizers.get(model) if model is not None else None
        if tokenizer is None:
            return sum(math.ceil(len(t.encode()) / BYTES_PER_TOKEN) for t in pending)
        return sum(len(e.ids) for e in tokenizer.encode_batch(pending,
                                                             add_special_tokens=False))

    for raw in lines:
        try:
            body = json.loads(raw)["body"]
        except (ValueError, KeyError, TypeError):
            continue
        if not isinstance(body, dict):
            continue
        total += 1
        if model is None and isinstance(body.get("model"), str):
            model = body["model"]
        found, added = _prompt(body)
        prompt += added
        for text in found:
            if isinstance(text, str):
                texts.append(text)
            else:
                prompt += len(text)
        output += _output(body, endpoint, default_max_tokens)
        if len(texts) >= CHUNK_LINES:
            prompt += tokens(texts)
            texts = []
    prompt += tokens(texts) if texts else 0
    return Counted(model, total, prompt, output)


def expected(prompt: int, max_output: int, lines: int, per_request: float | None) -> int:
    """The tokens a batch will likely take: its prompts, and its outputs at what a request
    generated on average (at most its maximum; the maximum while nothing has finished)."""
    if per_request is None:
        return prompt + max_output
    return prompt + min(max_output, math.ceil(lines * per_request))


def _left(batch: Queued, per_request: float | None) -> int:
    """The tokens an unfinished batch will likely still take (`expected`)."""
    return expected(batch.prompt_tokens, batch.max_output_tokens, batch.lines, per_request)


def duration(seconds: float) -> str:
    """OpenAI's duration in rate-limit headers: `20ms`, `45s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{max(round(seconds * 1000), 0)}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def token_headers(budget: TokenBudget) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*-tokens` of a project's enqueued-token quota."""
    found = {"x-ratelimit-limit-tokens": str(budget.limit),
             "x-ratelimit-remaining-tokens": str(max(budget.remaining, 0))}
    if budget.reset_s is not None:
        found["x-ratelimit-reset-tokens"] = duration(budget.reset_s)
    return found


def window_text(seconds: float) -> str:
    """The shortest window text of at least `seconds`: whole hours past an hour, else
    minutes."""
    minutes = max(math.ceil(seconds / 60), 1)
    return f"{math.ceil(minutes / 60)}h" if minutes > 60 else f"{minutes}m"


class Admission:
    """The estimate of a batch about to be created, and the checks on it."""

    def __init__(self, settings: Settings, store: Store, files: FileStore,
                 board: WorkerBoard) -> None:
        self.settings = settings
        self.store = store
        self.files = files
        self.board = board
        self.tokenizers = Tokenizers(settings)
        self._counted: OrderedDict[str, Counted] = OrderedDict()

    async def counted(self, file_id: str, path: str, endpoint: str) -> Counted:
        key = f"{file_id}:{endpoint}"
        if key in self._counted:
            self._counted.move_to_end(key)
            return self._counted[key]
        found = await asyncio.to_thread(
            count, self.files.iter_lines(path), endpoint, self.tokenizers,
            self.settings.default_max_tokens)
        self._counted[key] = found
        while len(self._counted) > COUNTS_KEPT:
            self._counted.popitem(last=False)
        return found

    async def estimate(self, counted: Counted, priority: int,
                       entries: list[Queued] | None = None) -> BatchEstimate:
        """The batch's tokens, those queued ahead of it (`entries`: its model's queue, if
        read already), and its ETA."""
        ahead, rate, per_request = 0, 0.0, None
        if counted.model is not None:
            if entries is None:
                entries = await queued(self.store, counted.model)
            per_request = self.board.generated_per_request(counted.model)
            ahead = sum(_left(q, per_request) for q in entries if q.priority >= priority)
            rate = self.board.tokens_per_s(counted.model)
        mine = expected(counted.prompt_tokens, counted.max_output_tokens, counted.lines,
                        per_request)
        return BatchEstimate(
            model=counted.model, prompt_tokens=counted.prompt_tokens,
            max_output_tokens=counted.max_output_tokens,
            expected_output_tokens=mine - counted.prompt_tokens, queued_tokens=ahead,
            tokens_per_s=round(rate, 1) if rate > 0 else None,
            eta_seconds=math.ceil((ahead + mine) / rate) if rate > 0 else None)

    async def admit(self, who: Principal, file_id: str, path: str, endpoint: str,
                    priority: int, window_s: int, window: str) -> Admitted | None:
        """The estimate a batch is created with, what the queue counts of it and what is
        left of its project's quota — or the refusal: past the project's enqueued-token
        quota, or unable to finish in its window (unless admission only records). None:
        admission is off."""
        if self.settings.admission == "off":
            return None
        counted = await self.counted(file_id, path, endpoint)
        if counted.model is None:
            return None  # nothing valid in it: validation fails it
        entries = await queued(self.store, counted.model)
        estimate = await self.estimate(counted, priority, entries)
        project = who.project
        limit = (self.settings.enqueued_token_limit if who.enqueued_token_limit is None
                 else who.enqueued_token_limit)
        eta, budget = estimate.eta_seconds, None
        if limit:
            mine = sum(q.prompt_tokens for q in entries if q.project == project)
            drained = self._drained_in(entries, project, counted.model)
            if mine + counted.prompt_tokens > limit:
                refused = TokenBudget(limit, max(limit - mine, 0), drained)
                raise RateLimitError(
                    f"Enqueued token limit reached for {counted.model} in project {project}. "
                    f"Limit: {limit:,} enqueued tokens; {mine:,} are in unfinished batches "
                    f"and this batch would add {counted.prompt_tokens:,}. Try again once "
                    f"some in_progress batches have completed.", param="input_file_id",
                    code="token_limit_exceeded", headers=token_headers(refused) | (
                        {"retry-after": str(drained)} if drained else {}))
            budget = TokenBudget(limit, limit - mine - counted.prompt_tokens,
                                 None if drained is None or eta is None else max(drained, eta))
        if eta is not None and eta > window_s and self.settings.admission == "refuse":
            longest = self.settings.max_completion_window_s
            fits = (f"The earliest feasible completion_window is '{window_text(eta)}'."
                    if eta <= longest else
                    f"No completion_window up to '{window_text(longest)}' fits: split the "
                    f"batch, lower it to 'background', or try later.")
            raise InvalidRequestError(
                f"This batch cannot finish inside its completion_window '{window}': it is "
                f"estimated at {estimate.prompt_tokens:,} prompt tokens and about "
                f"{estimate.expected_output_tokens:,} output tokens (at most "
                f"{estimate.max_output_tokens:,}), with {estimate.queued_tokens:,} tokens queued "
                f"ahead of it, at the {estimate.tokens_per_s:,} tokens/s measured for "
                f"{counted.model}: about {eta:,} s. {fits}", param="completion_window",
                code="completion_window_too_short")
        return Admitted(estimate, Enqueued(counted.model, priority, time.time() + window_s,
                                           counted.lines, counted.prompt_tokens,
                                           counted.max_output_tokens), budget)

    def _drained_in(self, entries: list[Queued], project: str, model: str) -> int | None:
        """Seconds until the project's unfinished batches of `model` are likely all done:
        the latest of their ETAs in the queue's order (None: no throughput measured)."""
        mine = [q for q in entries if q.project == project]
        if not mine:
            return 0
        rate = self.board.tokens_per_s(model)
        if rate <= 0:
            return None
        per_request = self.board.generated_per_request(model)
        last = max(sum(_left(o, per_request) for o in entries if o.ahead_of(q))
                   + _left(q, per_request) for q in mine)
        return math.ceil(last / rate)

    async def place(self, batch_id: str, model: str) -> dict[str, Any] | None:
        """An unfinished batch's place in its model's queue: its position (1: served
        first), the tokens ahead of it and its ETA; None for a batch not in it."""
        found = await queued(self.store, model)
        mine = next((q for q in found if q.batch_id == batch_id), None)
        if mine is None:
            return None
        per_request = self.board.generated_per_request(model)
        ahead = [q for q in found if q.ahead_of(mine)]
        tokens = sum(_left(q, per_request) for q in ahead)
        rate = self.board.tokens_per_s(model)
        left = _left(mine, per_request)
        return {"position": 1 + len(ahead), "tokens_ahead": tokens,
                "eta_s": math.ceil((tokens + left) / rate) if rate > 0 else None}
