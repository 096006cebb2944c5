"""What the worker admits next, and which offsets it may commit: pure bookkeeping, no I/O.

- `Backlog`: lines read from Kafka but not yet in the engine, one FIFO queue per batch,
  served round-robin across batches (fair share: a small batch behind a large one gets
  every other slot as soon as its lines are read).
- `Budget`: the engine's in-flight limits per model (requests and tokens).
- `PartitionOffsets`: lines finish in any order; the committable offset is the first line
  not yet finished, so a crash redelivers only unfinished work (and nothing is skipped).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from millrace.records import QueuedRequest


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


class Backlog:
    """Lines waiting for the engine: FIFO within a batch, round-robin across batches."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[Pending]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, item: Pending) -> None:
        self._queues.setdefault(item.record.batch_id, deque()).append(item)
        self._size += 1

    def peek(self) -> Pending:
        return next(iter(self._queues.values()))[0]

    def pop(self) -> Pending:
        """The next line of the batch whose turn it is; that batch goes to the back."""
        batch_id, queue = next(iter(self._queues.items()))
        item = queue.popleft()
        if queue:
            self._queues.move_to_end(batch_id)
        else:
            del self._queues[batch_id]
        self._size -= 1
        return item

    def batches(self) -> list[str]:
        return list(self._queues)

    def take_batch(self, batch_id: str) -> list[Pending]:
        items = list(self._queues.pop(batch_id, ()))
        self._size -= len(items)
        return items

    def drop(self, partitions: Iterable[tuple[str, int]]) -> int:
        """Forget lines of revoked partitions (their new owner reads them again)."""
        gone = set(partitions)
        dropped = 0
        for batch_id in list(self._queues):
            kept = deque(i for i in self._queues[batch_id] if (i.topic, i.partition) not in gone)
            dropped += len(self._queues[batch_id]) - len(kept)
            if kept:
                self._queues[batch_id] = kept
            else:
                del self._queues[batch_id]
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
