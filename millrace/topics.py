"""Topic names: every service derives them from the one configured prefix."""

from __future__ import annotations

from dataclasses import dataclass

from millrace.settings import Settings


@dataclass(frozen=True)
class Topics:
    prefix: str

    @property
    def requests(self) -> str:
        return f"{self.prefix}.requests"

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
    def ingest_rejects(self) -> str:
        return f"{self.prefix}.ingest-rejects"

    def ingest_group(self) -> str:
        return f"{self.prefix}.ingest"

    def worker_group(self) -> str:
        return f"{self.prefix}.gpu-workers"

    def sink_group(self) -> str:
        return f"{self.prefix}.sink"

    def aggregator_id(self) -> str:
        return f"{self.prefix}.aggregator"

    def layout(self, settings: Settings) -> dict[str, int]:
        """Topic name → partition count."""
        return {
            self.requests: settings.request_partitions,
            self.responses: settings.partitions,
            self.batch_events: settings.partitions,
            self.ingest: settings.partitions,
            self.ingest_rejects: 1,
        }

    @classmethod
    def from_settings(cls, settings: Settings) -> Topics:
        return cls(settings.topic_prefix)
