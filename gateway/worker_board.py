"""The workers' latest load, followed from `<prefix>.workers` by each gateway process (from
the end: a worker reports every `STATUS_EVERY_S`, so the board fills within seconds of a
start), for the dashboard's workers page — and what the workers serve: the endpoints each
model answers and the LoRA adapters served as model names, which batches are checked
against. Nothing here is durable or needs to be."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Collection, Iterator

from confluent_kafka import OFFSET_END, Consumer, TopicPartition
from pydantic import ValidationError

from millrace.kafka import KafkaConfig, polled, skip_malformed
from millrace.protocol import SUPPORTED_ENDPOINTS
from millrace.records import WorkerStatus
from millrace.settings import Settings
from millrace.topics import Topics

GONE_AFTER_S = 15.0  # a worker not heard from for this long is no longer shown


class WorkerBoard:
    def __init__(self) -> None:
        self._latest: dict[str, WorkerStatus] = {}
        # every model name a worker reported serving since this gateway started → its
        # endpoints; kept when the worker stops or restarts (its lines wait in Kafka)
        self._served: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def put(self, status: WorkerStatus) -> None:
        with self._lock:
            if status.stopped:
                self._latest.pop(status.worker, None)
            else:
                self._latest[status.worker] = status
            for model, load in status.models.items():
                for name in (model, *load.adapters):
                    self._served.setdefault(name, set()).update(load.endpoints)

    def live(self, now: float | None = None) -> list[WorkerStatus]:
        now = time.time() if now is None else now
        with self._lock:
            return sorted((s for s in self._latest.values() if now - s.at < GONE_AFTER_S),
                          key=lambda s: s.worker)

    def served(self) -> dict[str, set[str]]:
        """Every model name workers reported serving (their models and LoRA adapters) →
        the endpoints it answers."""
        with self._lock:
            return {name: set(endpoints) for name, endpoints in self._served.items()}

    def tokens_per_s(self, model: str, now: float | None = None) -> float:
        """The measured throughput of `model` (tokens a second; a LoRA adapter: its base
        model's) summed over the live workers that serve it; 0 while none has measured
        it."""
        return sum(load.tokens_per_s for status in self.live(now)
                   for name, load in status.models.items()
                   if name == model or model in load.adapters)

    def generated_per_request(self, model: str, now: float | None = None) -> float | None:
        """The tokens a request of `model` generated on average on the live workers; None
        until one finished."""
        loads = [load for status in self.live(now) for name, load in status.models.items()
                 if name == model or model in load.adapters]
        finished = sum(load.finished for load in loads)
        return sum(load.generation_tokens for load in loads) / finished if finished else None

    def endpoints(self) -> tuple[str, ...]:
        """The endpoints batches may name: what the workers serve — or, while no worker has
        reported (a fresh start, or every worker away), every endpoint millrace routes: the
        workers judge each line then."""
        served = set().union(*self.served().values())
        return tuple(e for e in SUPPORTED_ENDPOINTS if e in served) or SUPPORTED_ENDPOINTS


class ServedNames(Collection[str]):
    """The model names a line may give: the configured models, and the LoRA adapters the
    workers serve as model names (each on a requests topic of its own)."""

    def __init__(self, settings: Settings, board: WorkerBoard) -> None:
        self._models = settings.served_models()
        self._board = board
        self._adapters: set[object] = set()  # found on the board once (a batch's every line)

    def _names(self) -> list[str]:
        return [*self._models, *(n for n in self._board.served() if n not in self._models)]

    def __contains__(self, name: object) -> bool:
        if name in self._models or name in self._adapters:
            return True
        if name in self._names():
            self._adapters.add(name)
            return True
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


class WorkerFollower:
    """A gateway stage: the board kept up to date (a fresh consumer after an outage)."""

    def __init__(self, settings: Settings, board: WorkerBoard) -> None:
        self.topic = Topics.from_settings(settings).workers
        # no offsets are ever committed: the group only names this reader
        kafka = KafkaConfig.of(settings, "gateway-board")
        self.consumer = Consumer(kafka.follower(f"millrace-board-{uuid.uuid4().hex}"))
        self.board = board
        self._closing = threading.Event()

    async def run(self) -> None:
        try:
            await asyncio.to_thread(self._follow)
        finally:
            await asyncio.to_thread(self.consumer.close)

    def stop(self) -> None:
        self._closing.set()

    def _follow(self) -> None:
        self.consumer.assign([TopicPartition(self.topic, 0, OFFSET_END)])
        for msg in polled(self.consumer, self._closing.is_set):
            try:
                self.board.put(WorkerStatus.model_validate_json(msg.value() or b""))
            except ValidationError:
                skip_malformed(msg)
                continue
