"""What admission at create counts (issue 28): per model, each unfinished batch created with
an estimate — its project, priority and estimated tokens (`enqueued:<model>`).

An entry is written with the batch (`Store.create_batch`, one transaction) and read back
with what is left of it: its tokens times the share of its lines not counted yet. A batch
that has ended or is gone (a create taken back) is dropped from the hash the first time it
is read, so nothing here needs a writer at the end of a batch. The hash is advisory: lost
with Redis, it under-counts until the batches it held end.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from millrace.storage.store import Store


@dataclass(frozen=True)
class Enqueued:
    """A batch as admission counts it."""

    model: str
    priority: int
    deadline: float  # the end of its window (unix seconds): equal priorities go by it
    lines: int
    prompt_tokens: int
    max_output_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.max_output_tokens

    def fields(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "model"}


@dataclass(frozen=True)
class Queued:
    """An unfinished batch of a model: what is left of its estimate."""

    batch_id: str
    project: str
    priority: int
    deadline: float
    # what is left of its estimate: each times the share of its lines not counted yet
    lines: int
    prompt_tokens: int
    max_output_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.max_output_tokens

    def ahead_of(self, other: Queued) -> bool:
        """Served before `other` (the workers' order: priority, then deadline)."""
        return (-self.priority, self.deadline) < (-other.priority, other.deadline)


async def queued(store: Store, model: str, prune: bool = True) -> list[Queued]:
    """The unfinished batches of `model` admitted with an estimate (those ended or gone are
    dropped from the hash on the way, by the writer: `prune`)."""
    key = store.keys.enqueued(model)
    entries = await store.r.hgetall(key)
    found, gone = [], []
    for batch_id, raw in entries.items():
        entry: dict[str, Any] = json.loads(raw)
        batch = await store.get_batch(str(batch_id), str(entry["project"]))
        if batch is None or batch.status.terminal:
            gone.append(batch_id)
            continue
        counts = batch.request_counts
        left = 1.0 - (counts.completed + counts.failed) / counts.total if counts.total else 1.0
        found.append(Queued(str(batch_id), str(entry["project"]), int(entry["priority"]),
                            float(entry["deadline"]),
                            *(round(int(entry[k]) * left)
                              for k in ("lines", "prompt_tokens", "max_output_tokens"))))
    if gone and prune:
        await store.r.hdel(key, *gone)
    return found
