"""Files past their `expires_at` are deleted from the file store, Redis and (as tombstones) the
registry; one janitor at a time does it; nothing that has not expired is touched."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from millrace.filestore import FileStore
from millrace.kafka import AsyncProducer, KafkaConfig, ensure_topics
from millrace.protocol import FileObject
from millrace.registry import Registry
from millrace.settings import KafkaSettings, Settings
from millrace.storage.store import Store
from millrace.topics import Topics
from sink.assembler import Assembler
from sink.janitor import Janitor
from tests.deployment import Deployment


def test_expired_files_go_and_the_rest_stay(deployment: Deployment, tmp_path: Path) -> None:
    prefix = f"janitor{uuid.uuid4().hex[:8]}"  # its own keys and topics on the real parts
    kafka = KafkaConfig(KafkaSettings(bootstrap=str(deployment.endpoints["kafka_bootstrap"])),
                        "test")
    topics = Topics(prefix)
    ensure_topics(kafka, topics.layout(Settings(topic_prefix=prefix)), configs=topics.configs())
    files = FileStore(str(tmp_path / "files"))

    async def scenario() -> tuple[int, int, list[str], bool, bool]:
        store = Store.connect(str(deployment.endpoints["redis_url"]), prefix)
        producer = AsyncProducer(kafka.producer())
        registry = Registry(store, producer, topics)
        janitor = Janitor(store, registry, files, Assembler(tmp_path / "spool", files))
        now = int(time.time())
        for name, expires in (("old", now + 3600), ("new", now + 7200), ("kept", None)):
            files.write_bytes(f"files/{name}", b"x\n")
            await registry.put_file(FileObject(id=name, bytes=2, created_at=now,
                                               filename=name, purpose="batch",
                                               expires_at=expires), "p", f"files/{name}")
        before = await janitor.clean_up(now)  # nothing has expired yet
        await store.r.delete(store.keys.janitor)  # a minute on: that lease is over
        # an hour and a minute later, as the clock of a deployment that ran that long
        later = await janitor.clean_up(now + 3660)
        again = await janitor.clean_up(now + 3660)  # another janitor within the lease
        left = [f.id for f in await store.list_files("p")]
        producer.close()
        await store.close()
        return before, later, left, files.exists("files/old"), again == 0

    before, later, left, old_exists, leased = asyncio.run(scenario())
    assert before == 0 and later == 1 and leased
    assert sorted(left) == ["kept", "new"] and not old_exists
    assert files.exists("files/new") and files.exists("files/kept")
