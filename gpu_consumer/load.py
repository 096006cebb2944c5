"""A worker's load, published to `<prefix>.workers` every few seconds for the dashboard:
per served model what runs, what waits, what is not read yet, and what was answered —
plus a short history from which the dashboard draws throughput over the last minutes.

Invariants: totals only grow; the history holds at most `HISTORY_LEN` samples, one per
`HISTORY_EVERY_S`, oldest first. No I/O here: the worker produces what `status` returns.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from gpu_consumer.engine import Served
from millrace.records import ModelLoad, Tokens, WorkerStatus

STATUS_EVERY_S = 2.0
HISTORY_EVERY_S = 10.0
HISTORY_LEN = 60  # ten minutes
RATE_WEIGHT = 0.3  # of each new interval's rate in the moving average of tokens a second


@dataclass
class Totals:
    finished: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.generation_tokens


@dataclass
class Rate:
    """A model's tokens a second while busy: a moving average over the status intervals in
    which it had requests running or waiting (an idle interval says nothing of its
    speed)."""

    at: float | None = None  # the last sample (monotonic); the first is only a start
    tokens: int = 0
    busy: bool = False
    per_s: float = 0.0

    def sample(self, now: float, tokens: int, busy: bool) -> float:
        elapsed = now - self.at if self.at is not None else 0.0
        if elapsed > 0 and (busy or self.busy):
            rate = (tokens - self.tokens) / elapsed
            self.per_s = rate if not self.per_s else self.per_s + RATE_WEIGHT * (
                rate - self.per_s)
        self.at, self.tokens, self.busy = now, tokens, busy
        return self.per_s


class Load:
    def __init__(self, worker: str, models: list[str], catalog: Mapping[str, Served],
                 now: float | None = None) -> None:
        self.worker = worker
        # what each served model answers (the gateway validates batches against it)
        self.endpoints = {m: list(catalog[m].endpoints) if m in catalog else [] for m in models}
        self.adapters = {m: sorted(n for n, s in catalog.items() if s.base == m and n != m)
                         for m in models}
        self.started_at = time.time() if now is None else now
        self.totals = {m: Totals() for m in models}
        self.rates = {m: Rate() for m in models}
        self.history: deque[tuple[float, int, int]] = deque(maxlen=HISTORY_LEN)
        self._next_status = 0.0
        self._next_sample = 0.0

    def answered(self, model: str, tokens: Tokens) -> None:
        totals = self.totals[model]
        totals.finished += 1
        totals.prompt_tokens += tokens.prompt
        totals.generation_tokens += tokens.completion

    def failed(self, model: str) -> None:
        self.totals[model].failed += 1

    def due(self, now: float) -> bool:
        """Whether a status is due (monotonic `now`); takes a history sample when one is."""
        if now < self._next_status:
            return False
        self._next_status = now + STATUS_EVERY_S
        if now >= self._next_sample:
            self._next_sample = now + HISTORY_EVERY_S
            self.history.append((round(time.time(), 1),
                                 sum(t.finished for t in self.totals.values()),
                                 sum(t.generation_tokens for t in self.totals.values())))
        return True

    def status(self, running: dict[str, int], waiting: dict[str, int], lag: dict[str, int],
               stopped: bool = False, now: float | None = None) -> WorkerStatus:
        """The load now (`running`: requests in the engine per model, `waiting`: lines read
        and not yet in it; monotonic `now`). A model with either is busy: its throughput
        is measured."""
        now = time.monotonic() if now is None else now
        rates = {m: self.rates[m].sample(now, t.tokens,
                                         running.get(m, 0) + waiting.get(m, 0) > 0)
                 for m, t in self.totals.items()}
        return WorkerStatus(
            worker=self.worker, started_at=self.started_at, stopped=stopped,
            history=list(self.history),
            models={m: ModelLoad(running=running.get(m, 0), waiting=waiting.get(m, 0),
                                 lag=lag.get(m, 0), finished=t.finished, failed=t.failed,
                                 prompt_tokens=t.prompt_tokens,
                                 generation_tokens=t.generation_tokens,
                                 tokens_per_s=round(rates[m], 1),
                                 endpoints=self.endpoints[m], adapters=self.adapters[m])
                    for m, t in self.totals.items()})
