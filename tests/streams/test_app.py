"""The aggregator is a Faust app: its agent under Faust's `test_context()`, Faust's own
command running it, the deployed `millrace aggregator` running Faust's stream machinery, and
the two faust-streaming pitfalls it is built around — an offset committed past an event
still being processed (#606) and commits held back by recovery (#596)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import faust
from confluent_kafka import Consumer, TopicPartition
from faust.types import TP
from prometheus_client import REGISTRY

from millrace.kafka import AsyncProducer, KafkaConfig, ensure_topics, partition_of
from millrace.records import (
    BatchCreated,
    BatchFilesReady,
    BatchProgress,
    BatchValidated,
    Record,
)
from millrace.settings import KafkaSettings, Settings
from millrace.storage.store import Store
from millrace.topics import Topics
from ops import embedded
from streams.aggregator import Fetched
from streams.app import COMMIT_EVERY_S, create_app
from tests.deployment import Deployment, wait_until
from tests.streams.harness import own_topics, running, starts, until

DOC = {"endpoint": "/v1/chat/completions", "input_file_id": "file-1",
       "completion_window": "24h", "status": "validating", "created_at": int(time.time()),
       "expires_at": int(time.time()) + 3600}


def doc(batch_id: str) -> dict[str, object]:
    return {**DOC, "id": batch_id}


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"topic": "batch-events", **labels}) or 0.0


def test_the_agent_under_fausts_test_context(deployment: Deployment, tmp_path: Path) -> None:
    """Events put into the agent's test channel are applied with the real Redis and
    published to the real broker; one on a partition that is not its batch's is refused,
    and a record that is no event is skipped, both counted."""
    settings, _, _ = own_topics(deployment, tmp_path)
    batch_id = f"batch_{uuid.uuid4().hex[:24]}"
    home = partition_of(batch_id, settings.partitions)
    elsewhere = (home + 1) % settings.partitions

    async def scenario() -> tuple[str, dict[str, int], float, float]:
        app = create_app(settings)
        store = Store.connect(str(settings.redis_url), settings.topic_prefix)
        wrong = counted("millrace_records_refused_total", reason="wrong_partition")
        malformed = counted("millrace_records_malformed_total")
        async with app.aggregate.test_context() as agent:
            for event in (BatchCreated(batch_id=batch_id, project="p", batch=doc(batch_id),
                                       listed_at=1.0),
                          BatchValidated(batch_id=batch_id, total=2, model="m")):
                await agent.put(event.dumps(), key=batch_id.encode(), partition=home)
            # a forged completion on another partition, and a record that is no event
            await agent.put(BatchProgress(batch_id=batch_id, completed=2, failed=0).dumps(),
                            key=batch_id.encode(), partition=elsewhere)
            await agent.put(b"{not an event", key=batch_id.encode(), partition=home)
            batch = await store.get_batch(batch_id, "p")
            assert batch is not None and batch.status.value == "in_progress"
            for event in (BatchProgress(batch_id=batch_id, completed=2, failed=0),
                          BatchFilesReady(batch_id=batch_id, output_file_id="o",
                                          error_file_id=None, lines=2, completed=2,
                                          input_tokens=3, output_tokens=4)):
                await agent.put(event.dumps(), key=batch_id.encode(), partition=home)
            # each put was one chunk, handled before the agent took the next
            assert sorted(agent.results.values()) == [1] * 6
        batch = await store.get_batch(batch_id, "p")
        assert batch is not None and batch.request_counts is not None
        # the test stream made Faust build its consumer's thread, with an event loop of its
        # own, and never start it: nothing else would close that loop
        app.consumer._thread.thread_loop.close()  # type: ignore[attr-defined]
        await app.aggregator.close()
        await store.close()
        return (batch.status.value, batch.request_counts.model_dump(),
                counted("millrace_records_refused_total", reason="wrong_partition") - wrong,
                counted("millrace_records_malformed_total") - malformed)

    status, counts, wrong, malformed = asyncio.run(scenario())
    assert status == "completed"
    assert counts == {"total": 2, "completed": 2, "failed": 0}
    assert (wrong, malformed) == (1, 1)


def test_fausts_own_command_runs_the_aggregator(deployment: Deployment, tmp_path: Path) -> None:
    """`faust -A streams.app worker`, configured by the environment as every service is,
    applies a batch's events (Faust's command line, on the click this environment has)."""
    settings, topics, kafka = own_topics(deployment, tmp_path)
    batch_id = f"batch_{uuid.uuid4().hex[:24]}"
    listed = subprocess.run([str(Path(sys.executable).parent / "faust"), "-A", "streams.app",
                             "agents"], env=env_of(settings), capture_output=True, text=True,
                            timeout=120, check=False)
    assert listed.returncode == 0, listed.stderr
    assert "@aggregate" in listed.stdout and topics.batch_events in listed.stdout
    worker = subprocess.Popen(
        [str(Path(sys.executable).parent / "faust"), "-A", "streams.app", "worker",
         "--without-web", "-l", "info"], env=env_of(settings), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        asyncio.run(starts(settings, kafka, batch_id))
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err[-3000:]


def env_of(settings: Settings) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MILLRACE_")},
            **settings.as_env(), "PYTHONPATH": str(Path.cwd())}


def test_the_deployed_aggregator_runs_fausts_streams(deployment: Deployment) -> None:
    """`millrace aggregator` in the session's deployment has Faust's stream and conductor
    machinery loaded (its compiled modules are mapped into the process) and holds the
    aggregator group's partitions."""
    info = wait_until(lambda: deployment.ready_info("aggregator"), 60, "the aggregator")
    maps = Path(f"/proc/{info['pid']}/maps").read_text()
    assert "faust/_cython/streams" in maps and "faust/transport/_cython/conductor" in maps
    assert "aiokafka/record/_crecords" in maps
    partitions = info.get("partitions")
    assert isinstance(partitions, dict) and partitions[
        f"{deployment.endpoints['topic_prefix']}.batch-events"]


def test_no_offset_is_committed_past_an_event_being_handled(deployment: Deployment,
                                                             tmp_path: Path) -> None:
    """faust-streaming #606: with agent concurrency > 1, an offset can be committed past an
    event another actor is still handling, and a crash then loses it. The agent has one
    actor and acknowledges a chunk only once it is handled: while one batch's save is held,
    nothing at or after its event is committed, though later events were fetched. #596
    (recovery holding commits back): there is no table, so nothing to recover; after a
    second worker joins and leaves the group, commits reach the end again."""
    settings, topics, kafka = own_topics(deployment, tmp_path)
    held = f"batch_{uuid.uuid4().hex[:24]}"
    partition = partition_of(held, settings.partitions)
    others = same_partition(settings, partition, 20)

    async def scenario() -> None:
        producer = AsyncProducer(kafka.producer())
        created = [BatchCreated(batch_id=b, project="p", batch=doc(b), listed_at=1.0)
                   for b in [held, *others]]
        first = (await producer.send(topics.batch_events, held, created[0].dumps())).offset()
        async with running(settings) as app:
            assert app.aggregate.concurrency == 1 and not app.tables
            release, holding = asyncio.Event(), asyncio.Event()
            handle = app.aggregator.handle

            async def gated(records: list[Fetched]) -> None:
                if any(held.encode() in r.value for r in records):
                    holding.set()
                    await release.wait()
                await handle(records)

            app.aggregator.handle = gated  # type: ignore[method-assign]
            await asyncio.wait_for(holding.wait(), 60)
            for event in created[1:]:
                last = (await producer.send(topics.batch_events, event.batch_id,
                                            event.dumps())).offset()
            # the later events are fetched while the held chunk waits …
            tp = next(tp for tp in app.consumer.assignment() if tp.partition == partition)
            await until(lambda: fetched_past(app, tp, last), 60)
            # … and several commit rounds go by: a commit that should not happen cannot
            # be awaited, so this one waits on the clock
            await asyncio.sleep(3 * COMMIT_EVERY_S)
            assert committed(kafka, topics, partition) <= first
            release.set()
            await until(lambda: at(kafka, topics, partition, last + 1), 60)
            # a second worker joins (a rebalance) and leaves; commits go on to the end
            async with running(settings):
                await until(lambda: shared(app, settings.partitions), 60)
            for event in created[1:6]:
                last = (await producer.send(topics.batch_events, event.batch_id,
                                            event.dumps())).offset()
            await until(lambda: at(kafka, topics, partition, last + 1), 60)
        producer.close()

    asyncio.run(scenario())


def same_partition(settings: Settings, partition: int, count: int) -> list[str]:
    found: list[str] = []
    while len(found) < count:
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        if partition_of(batch_id, settings.partitions) == partition:
            found.append(batch_id)
    return found


async def fetched_past(app: faust.App, tp: TP, offset: int) -> bool:
    """The consumer took records past `offset` from the broker (into Faust's buffers)."""
    return (await app.consumer.position(tp) or 0) > offset


async def shared(app: faust.App, partitions: int) -> bool:
    return len(app.consumer.assignment()) < partitions


def committed(kafka: KafkaConfig, topics: Topics, partition: int) -> int:
    consumer = Consumer(kafka.consumer(topics.aggregator_group()))
    try:
        [tp] = consumer.committed([TopicPartition(topics.batch_events, partition)], timeout=10)
        return int(tp.offset)
    finally:
        consumer.close()


async def at(kafka: KafkaConfig, topics: Topics, partition: int, offset: int) -> bool:
    return await asyncio.to_thread(committed, kafka, topics, partition) >= offset


def test_an_error_that_is_not_an_outage_exits_and_loses_nothing(deployment: Deployment,
                                                                 tmp_path: Path) -> None:
    """A batch whose stored state is corrupt (not an outage: no retry mends it) stops
    `millrace aggregator` at once, committing nothing of the chunk in hand, and once the
    state is mended the restarted aggregator applies the same events."""
    settings, topics, kafka = own_topics(deployment, tmp_path)
    batch_id = f"batch_{uuid.uuid4().hex[:24]}"
    command = [sys.executable, "-m", "ops", "aggregator"]

    async def corrupt_then_send() -> int:
        store = Store.connect(str(settings.redis_url), settings.topic_prefix)
        await store.r.hset(store.keys.batch(batch_id), "agg", "{not a state")
        await store.close()
        producer = AsyncProducer(kafka.producer())
        first = await producer.send(topics.batch_events, batch_id, BatchCreated(
            batch_id=batch_id, project="p", batch=doc(batch_id), listed_at=1.0).dumps())
        await producer.send(topics.batch_events, batch_id,
                            BatchValidated(batch_id=batch_id, total=1, model="m").dumps())
        producer.close()
        return int(first.offset() or 0)

    first = asyncio.run(corrupt_then_send())
    crashed = subprocess.run(command, env=env_of(settings), capture_output=True, text=True,
                             timeout=120, check=False)
    assert crashed.returncode == 1, crashed.stderr[-3000:]
    assert "exiting, to be started again" in crashed.stderr
    assert committed(kafka, topics, partition_of(batch_id, settings.partitions)) <= first

    async def mend_and_wait() -> str:
        store = Store.connect(str(settings.redis_url), settings.topic_prefix)
        await store.r.hdel(store.keys.batch(batch_id), "agg")
        worker = subprocess.Popen(command, env=env_of(settings), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            async def applied() -> bool:
                batch = await store.get_batch(batch_id, "p")
                return batch is not None and batch.status.value == "in_progress"

            await until(applied, 120)
        finally:
            worker.terminate()
            assert await asyncio.to_thread(worker.wait, 60) == 0
            await store.close()
        return "in_progress"

    assert asyncio.run(mend_and_wait()) == "in_progress"


def test_a_broker_that_comes_back_empty_beside_the_running_app(deployment: Deployment,
                                                               tmp_path: Path) -> None:
    """The broker restarts empty (a new cluster id, offsets from 0 again) while the Faust
    app runs. A batch it was running gets its events again on the new broker (as `resume`
    and the sink publish them) and completes; a batch created afterwards is applied from
    its first offset; their states carry the new broker's epoch. (The race where the new
    broker's first records come before the group's rebalance is
    `test_aggregator.py::test_a_broker_that_lost_its_data_is_noticed_before_an_event_is_skipped`.)"""
    port = embedded.free_port()

    def broker() -> subprocess.Popen[bytes]:
        proc = embedded.spawn(embedded.tansu_binary(), embedded.broker_argv(port),
                              tmp_path / "broker.log")
        embedded.wait_for_port(port, 30, alive=lambda: proc.poll() is None)
        return proc

    procs = [broker()]
    settings = Settings(
        topic_prefix=f"agg{uuid.uuid4().hex[:8]}", data_dir=tmp_path, partitions=1,
        redis_url=str(deployment.endpoints["redis_url"]),
        kafka=KafkaSettings(bootstrap=f"127.0.0.1:{port}"))
    topics = Topics.from_settings(settings)
    kafka = KafkaConfig.of(settings, "test")
    ensure_topics(kafka, topics.layout(settings), configs=topics.configs())

    async def scenario() -> tuple[str, str]:
        store = Store.connect(str(settings.redis_url), settings.topic_prefix)
        producer = AsyncProducer(kafka.producer())

        async def send(batch_id: str, *events: Record) -> None:
            for event in events:
                await producer.send(topics.batch_events, batch_id, event.dumps())

        def begun(batch_id: str, total: int) -> list[Record]:
            return [BatchCreated(batch_id=batch_id, project="p", batch=doc(batch_id),
                                 listed_at=1.0),
                    BatchValidated(batch_id=batch_id, total=total, model="m")]

        async def shows(batch_id: str, status: str, completed: int) -> None:
            async def now() -> bool:
                batch = await store.get_batch(batch_id, "p")
                return batch is not None and batch.status.value == status and \
                    batch.request_counts.completed == completed
            await until(now, 90)

        try:
            async with running(settings) as app:
                old = await asyncio.to_thread(app.aggregator.producer.cluster_id)
                await send("batch_a", *begun("batch_a", 3),
                           *[BatchProgress(batch_id="batch_a", completed=n, failed=0)
                             for n in range(1, 3)])
                await shows("batch_a", "in_progress", 2)
                procs[0].kill()
                procs[0].wait()
                procs.append(broker())
                await asyncio.to_thread(ensure_topics, kafka, topics.layout(settings),
                                        configs=topics.configs())
                new = await asyncio.to_thread(producer.cluster_id)
                await send("batch_a", *begun("batch_a", 3),
                           BatchProgress(batch_id="batch_a", completed=3, failed=0),
                           BatchFilesReady(batch_id="batch_a", output_file_id="o",
                                           error_file_id=None, lines=3, completed=3))
                await shows("batch_a", "completed", 3)
                await send("batch_c", *begun("batch_c", 1))
                await shows("batch_c", "in_progress", 0)
                versions = await store.versions(["batch_a", "batch_c"])
                assert {v.epoch for v in versions.values()} == {new}
            return old, new
        finally:
            producer.close()
            await store.close()

    try:
        old, new = asyncio.run(scenario())
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert old != new
