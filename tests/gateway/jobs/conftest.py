"""Each jobs test gets a world of its own topic prefix on the session's broker and Redis."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from millrace.filestore import FileStore
from millrace.kafka import KafkaConfig, ensure_topics
from millrace.settings import KafkaSettings, Settings
from millrace.topics import Topics
from tests.deployment import Deployment
from tests.gateway.jobs.world import JobsWorld


@pytest.fixture
def world(deployment: Deployment, tmp_path: Path) -> JobsWorld:
    settings = Settings(
        topic_prefix=f"jobs{uuid.uuid4().hex[:8]}", data_dir=tmp_path, partitions=1,
        file_store_url=str(tmp_path / "store"),
        redis_url=str(deployment.endpoints["redis_url"]),
        kafka=KafkaSettings(bootstrap=str(deployment.endpoints["kafka_bootstrap"])))
    topics = Topics.from_settings(settings)
    kafka = KafkaConfig.of(settings, "test")
    ensure_topics(kafka, topics.layout(settings), configs=topics.configs())
    return JobsWorld(settings, topics, kafka, FileStore(settings.files_url))
