"""What the worker admits next, and which offsets it may commit: pure bookkeeping, no I/O.

- `Backlog`: lines read from Kafka but not yet in the engine, per batch (in the order
  read, but lines that share a prompt prefix together: the prefix cache serves them),
  served by the batch's priority (higher first), then its deadline (the end of its
  completion window, earlier first); batches that tie take turns (a small batch behind a
  large one of the same priority and deadline gets every other slot as soon as its lines
  are read), and a minimum share of the picks goes to every batch in turn.
- `Budget`: the engine's in-flight limits per model (requests and tokens).
- `PartitionOffsets`: lines finish in any order; the committable offset is the first line
  not yet finished, so a crash redelivers only unfinished work (and nothing is skipped).
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from millrace.records import QueuedRequest
from millrace.records.requests import BACKGROUND_PRIORITY


class PartitionOffsets:
    """Offsets of one assigned partition: received in order, finished in any order."""

    def __init__(self) -> None:
        self._pending: deque[int] = deque()
        self._done: set[int] = set()
        self._next: int | None = None
        self.committed: int | None = None

    def received(self, offset: int) -> None:
        self._pending.append(offset)
        self._next = offset + 1

    def finished(self, offset: int) -> None:
        self._done.add(offset)

    def committable(self) -> int | None:
        """The offset to commit: the first unfinished line, else one past the last read."""
        while self._pending and self._pending[0] in self._done:
            self._done.discard(self._pending.popleft())
        return self._pending[0] if self._pending else self._next


@dataclass
class Pending:
    """One request line between Kafka and the engine."""

    record: QueuedRequest
    topic: str
    partition: int
    offset: int
    offsets: PartitionOffsets
    cost: int
    # lines of a batch with the same key share a prompt prefix (`prefix_key`)
    prefix: str | None = None

    def finish(self) -> None:
        self.offsets.finished(self.offset)


def token_cost(body: dict[str, Any], default_max_tokens: int) -> int:
    """Tokens a request may hold in the KV cache: a prompt estimate (4 bytes a token) plus
    the completion it may generate, times `n`."""
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    n = body.get("n") or 1
    prompt = len(str(body.get("messages") or body.get("prompt") or body.get("input") or "")) // 4
    try:
        return prompt + int(max_tokens) * int(n)
    except (TypeError, ValueError):
        return prompt + default_max_tokens


Rank = tuple[int, int, float]  # (-priority, nobody waiting, deadline step): lower first


def rank(record: QueuedRequest, deadline_step_s: float) -> Rank:
    """Higher priority first; then a line someone waits on (PromptLoop's run-one-row); then
    the earlier deadline, in steps of `deadline_step_s` (deadlines in one step tie, and
    their batches take turns; none: last)."""
    deadline = record.deadline
    step = (math.inf if deadline is None
            else deadline // deadline_step_s if deadline_step_s > 0 else deadline)
    return -record.priority, 0 if record.reply else 1, step


def prefix_key(body: dict[str, Any]) -> str | None:
    """What lines that share a prompt prefix have in common, cheaply: the system (or
    developer) message a chat line starts with, or a Responses line's `instructions`. Lines
    with the same key are admitted one after another, so the engine's prefix cache holds
    the shared prefix while they run (the way llm-d's batch gateway groups by system
    prompt)."""
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict) and \
            messages[0].get("role") in ("system", "developer"):
        return str(messages[0].get("content"))
    instructions = body.get("instructions")
    return instructions if isinstance(instructions, str) else None


class _BatchLines:
    """A batch's waiting lines: by prompt prefix (`prefix_key`), the prefix seen first
    first, each in the order read; a prefix's lines leave together."""

    def __init__(self, by_prefix: bool = True) -> None:
        self._groups: OrderedDict[str | None, deque[Pending]] = OrderedDict()
        self._by_prefix = by_prefix
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Pending]:
        for group in self._groups.values():
            yield from group

    def append(self, item: Pending) -> None:
        key = item.prefix if self._by_prefix else None
        self._groups.setdefault(key, deque()).append(item)
        self._size += 1

    def first(self) -> Pending:
        return next(iter(self._groups.values()))[0]

    def popleft(self) -> Pending:
        key, group = next(iter(self._groups.items()))
        item = group.popleft()
        if not group:
            del self._groups[key]
        self._size -= 1
        return item

    def keep(self, wanted: Callable[[Pending], bool]) -> int:
        """Drop the lines not `wanted`: how many went."""
        before = self._size
        for key in list(self._groups):
            kept = deque(i for i in self._groups[key] if wanted(i))
            if kept:
                self._groups[key] = kept
            else:
                del self._groups[key]
        self._size = sum(len(g) for g in self._groups.values())
        return before - self._size


class Backlog:
    """Lines waiting for the engine; within a batch, those sharing a prompt prefix together
    (`_BatchLines`). The next line is the first batch's in `rank` order, batches that tie
    taking turns; and one pick in `share_every` goes to every waiting batch in turn
    whatever its rank, so that nothing starves (each of n waiting batches gets at least
    1 / (n * share_every) of the picks) — except a `background` batch's, which are picked
    only when no other batch waits.
    """

    def __init__(self, min_share: float = 0.0, deadline_step_s: float = 0.0,
                 prefix_order: bool = True) -> None:
        self.deadline_step_s = deadline_step_s
        self.prefix_order = prefix_order
        self._queues: dict[str, _BatchLines] = {}
        self._ranks: dict[str, Rank] = {}
        # batches of one rank, in their turn order; the ranks present, best first
        self._tiers: dict[Rank, OrderedDict[str, None]] = {}
        self._order: list[Rank] = []
        self._turns: OrderedDict[str, None] = OrderedDict()  # every batch, for the share
        # (a share so small that it is never taken is none)
        self.share_every = round(min(1 / min_share, 1e9)) if min_share > 0 else 0
        self._picks = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, item: Pending) -> None:
        batch_id = item.record.batch_id
        queue = self._queues.get(batch_id)
        if queue is None:
            queue = self._queues[batch_id] = _BatchLines(self.prefix_order)
            where = self._ranks[batch_id] = rank(item.record, self.deadline_step_s)
            if where not in self._tiers:
                self._tiers[where] = OrderedDict()
                bisect.insort(self._order, where)
            self._tiers[where][batch_id] = None
            if item.record.priority > BACKGROUND_PRIORITY:  # background: no share
                self._turns[batch_id] = None
        queue.append(item)
        self._size += 1

    def _sharing(self) -> bool:
        return (bool(self.share_every) and bool(self._turns)
                and self._picks % self.share_every == self.share_every - 1)

    def _next_batch(self) -> str:
        if self._sharing():
            return next(iter(self._turns))
        return next(iter(self._tiers[self._order[0]]))

    def peek(self) -> Pending:
        return self._queues[self._next_batch()].first()

    def pop(self) -> Pending:
        """The next line (`peek`'s); its batch goes to the back of its turns."""
        batch_id = self._next_batch()
        queue = self._queues[batch_id]
        item = queue.popleft()
        self._picks += 1
        self._size -= 1
        if queue:
            self._tiers[self._ranks[batch_id]].move_to_end(batch_id)
            if batch_id in self._turns:
                self._turns.move_to_end(batch_id)
        else:
            self._forget(batch_id)
        return item

    def _forget(self, batch_id: str) -> None:
        del self._queues[batch_id]
        where = self._ranks.pop(batch_id)
        tier = self._tiers[where]
        del tier[batch_id]
        if not tier:
            del self._tiers[where]
            self._order.remove(where)
        self._turns.pop(batch_id, None)

    def batches(self) -> list[str]:
        return list(self._queues)

    def take_batch(self, batch_id: str) -> list[Pending]:
        if batch_id not in self._queues:
            return []
        items = list(self._queues[batch_id])
        self._forget(batch_id)
        self._size -= len(items)
        return items

    def drop(self, partitions: Iterable[tuple[str, int]]) -> int:
        """Forget lines of revoked partitions (their new owner reads them again)."""
        gone = set(partitions)
        dropped = 0
        for batch_id in list(self._queues):
            queue = self._queues[batch_id]
            dropped += queue.keep(lambda i: (i.topic, i.partition) not in gone)
            if not queue:
                self._forget(batch_id)
        self._size -= dropped
        return dropped

    def __iter__(self) -> Iterator[Pending]:
        for queue in self._queues.values():
            yield from queue


@dataclass
class Budget:
    """In-flight limits of one model's engine: requests, and tokens (0 = no token limit)."""

    max_requests: int
    max_tokens: int = 0
    requests: int = 0
    tokens: int = 0
    _costs: dict[int, int] = field(default_factory=dict)

    def fits(self, cost: int) -> bool:
        if self.requests >= self.max_requests:
            return False
        # an idle engine always takes one request, however large
        return not self.max_tokens or self.requests == 0 or self.tokens + cost <= self.max_tokens

    def take(self, ticket: int, cost: int) -> None:
        self._costs[ticket] = cost
        self.requests += 1
        self.tokens += cost

    def release(self, ticket: int) -> None:
        cost = self._costs.pop(ticket, None)
        if cost is not None:
            self.requests -= 1
            self.tokens -= cost
