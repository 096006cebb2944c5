"""Topic names: every service derives them from the one configured prefix."""

from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass

from millrace.settings import Settings


@dataclass(frozen=True)
class Topics:
    prefix: str

    def requests_for(self, model: str) -> str:
        """Each served model has its own requests topic; a worker reads its models' topics."""
        return f"{self.prefix}.requests.{_topic_safe(model)}"

    @property
    def responses(self) -> str:
        return f"{self.prefix}.responses"

    @property
    def batch_events(self) -> str:
        return f"{self.prefix}.batch-events"

    @property
    def ingest(self) -> str:
        """Direct producers write OpenAI batch lines here, keyed by an open batch's id."""
        return f"{self.prefix}.ingest"

    @property
    def registry(self) -> str:
        """Compacted: files, API key hashes and webhook endpoints, for `millrace rebuild`."""
        return f"{self.prefix}.registry"

    @property
    def ingest_rejects(self) -> str:
        return f"{self.prefix}.ingest-rejects"

    @property
    def batch_state(self) -> str:
        """Compacted: the aggregator's latest state of each batch, for `millrace rebuild`."""
        return f"{self.prefix}.batch-state"

    @property
    def workers(self) -> str:
        """Workers' load every few seconds (`WorkerStatus`), for the dashboard."""
        return f"{self.prefix}.workers"

    def ingest_group(self) -> str:
        return f"{self.prefix}.ingest"

    def worker_group(self) -> str:
        return f"{self.prefix}.gpu-workers"

    def sink_group(self) -> str:
        return f"{self.prefix}.sink"

    def aggregator_group(self) -> str:
        return f"{self.prefix}.aggregator"

    def jobs_group(self) -> str:
        """Gateways taking batch jobs (explode, fill, redrive) from batch-events."""
        return f"{self.prefix}.gateway-jobs"

    def layout(self, settings: Settings) -> dict[str, int]:
        """Topic name → partition count."""
        return {
            **{self.requests_for(m): settings.request_partitions
               for m in settings.served_models()},
            self.responses: settings.partitions,
            self.batch_events: settings.partitions,
            self.ingest: settings.partitions,
            self.ingest_rejects: 1,
            self.registry: 1,
            self.batch_state: settings.partitions,
            self.workers: 1,
        }

    def configs(self) -> dict[str, dict[str, str]]:
        """Topic configs beyond the broker's defaults: the registry and the batch states
        keep the latest record per key for good."""
        compact = {"cleanup.policy": "compact"}
        return {self.registry: compact, self.batch_state: compact, self.workers: compact}

    @classmethod
    def from_settings(cls, settings: Settings) -> Topics:
        return cls(settings.topic_prefix)


_TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


# both are asked once per line by the explode: each answer is kept
@functools.lru_cache(maxsize=1024)
def _topic_safe(model: str) -> str:
    return _TOPIC_UNSAFE.sub("_", model)


@functools.lru_cache(maxsize=1024)
def _batch_hash(batch_id: str) -> int:
    return zlib.crc32(batch_id.encode())


def request_route(batch_id: str, line: int, shards: int, partitions: int) -> tuple[str, int]:
    """(key, partition) of a batch's line: lines go round-robin over `shards` shards, shard s
    on partition (first + s) mod partitions, so a batch spreads evenly over the workers."""
    shard = line % shards
    first = _batch_hash(batch_id) % partitions
    return f"{batch_id}:{shard}", (first + shard) % partitions
