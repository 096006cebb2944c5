"""The aggregator as a Faust app: `millrace aggregator`, or `faust -A streams.app worker`.

`create_app(settings)` builds the app; nothing is read at import. Faust's own command gets
it from this module's `app`, made from the environment's settings when Faust asks for it.

- **Group and topic**: the app's id is the consumer group `<prefix>.aggregator`; its one
  topic is `<prefix>.batch-events`, made by `ensure_topics` like every topic (Faust declares
  none: no leader topic, no tables, hence no changelogs).
- **One agent, concurrency 1, manual acknowledgements**: it takes the events waiting (up to
  CHUNK) and hands them to `Aggregator.handle_until_done`. That applies the chunk per batch,
  publishes what it emits, waits for the broker's acknowledgements and saves each state to
  Redis, retrying the same chunk through an outage. Only then does the agent acknowledge
  the chunk's events, and Faust commits acknowledged offsets only. So a crash mid-chunk
  commits none of it, and with one actor no offset can be committed past an event still
  being processed (faust-streaming #606 needs concurrency > 1).
- **State in Redis, not a Faust table**: no changelog to recover, so Faust's recovery has
  nothing to wait for and cannot hold commits back (#596). High watermarks (wrong on the
  embedded broker's ListOffsets) are read only from fetch responses, for the lag gauge.
- **A broker that lost its data**: offsets out of range start again from the earliest
  (`consumer_auto_offset_reset`), and the new cluster id is a new epoch for the states'
  offset versions (read again at every assignment). `millrace resume` re-publishes what the
  old broker held.
- **Timers**: expiry each second behind a Redis lease (one aggregator acts), consumer lag.
- **Rebalance hooks**: the readiness marker notes the partitions held; a revoke drops the
  in-memory states (Redis holds the truth).
- **Errors**: an error that is not an outage in the agent exits the process at once, as a
  SIGKILL would (a Faust app that crashed would wait, as it stops, for the chunk's
  acknowledgements, see `die`); a crash elsewhere in the app stops the worker. Either way
  its supervisor starts it again, and it resumes from the last commit.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from collections.abc import AsyncIterator, Set
from typing import Any, NoReturn

import aiokafka
import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, EventT, StreamT, TransportT
from mode import CrashingSupervisor

from millrace import metrics
from millrace.settings import Settings
from millrace.topics import Topics
from streams.aggregator import EXPIRY_EVERY_S, Aggregator, Fetched

log = logging.getLogger(__name__)

CHUNK = 1000  # events handled per step: one Redis round trip per batch per chunk
COMMIT_EVERY_S = 1.0
LAG_EVERY_S = 1.0


class AggregatorApp(faust.App):
    """A Faust app whose consumer waits `fetch_wait_ms` for records, as every other
    consumer does (faust-streaming hard-codes 1,500 ms; on the embedded broker each hop
    into the aggregator then took ~200-380 ms instead of ~50)."""

    fetch_wait_ms: int = 100
    aggregator: Aggregator
    events: faust.TopicT
    aggregate: faust.types.AgentT[bytes]

    def _new_transport(self) -> TransportT:
        return _Transport(self.conf.broker_consumer, self)


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_consumer(self, loop: asyncio.AbstractEventLoop) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_consumer(loop)
        # aiokafka reads it when the consumer starts; Faust has no setting for it. Refuse to
        # run if aiokafka renamed it rather than silently waiting 1.5 s a hop again.
        if not hasattr(consumer, "_fetch_max_wait_ms"):
            raise RuntimeError("aiokafka changed: cannot set the consumer's fetch wait")
        app = self.app
        consumer._fetch_max_wait_ms = app.fetch_wait_ms if isinstance(app, AggregatorApp) \
            else 100
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


def create_app(settings: Settings) -> AggregatorApp:
    """The aggregator's Faust app, configured from `settings` only."""
    topics = Topics.from_settings(settings)
    datadir = settings.data_dir / "faust"
    datadir.mkdir(parents=True, exist_ok=True)  # Faust makes only the last level
    app = AggregatorApp(
        topics.aggregator_group(),
        **settings.kafka.faust("aggregator"),
        store="memory://",
        datadir=str(datadir),
        autodiscover=False,
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=COMMIT_EVERY_S,
        web_enabled=False,
    )
    app.fetch_wait_ms = settings.kafka.fetch_wait_ms
    app.aggregator = aggregator = Aggregator(settings)
    app.events = events = app.topic(topics.batch_events, key_serializer="raw",
                                    value_serializer="raw")

    @app.agent(events, name="aggregate", concurrency=1,
               supervisor_strategy=CrashingSupervisor)
    async def aggregate(stream: StreamT[bytes]) -> AsyncIterator[int]:
        """Each chunk handled (applied, published, saved), then acknowledged, before the
        next is taken. A chunk is what is waiting when the agent gets to it (up to CHUNK):
        one event when idle, without delay; many under load, while the last chunk was
        being handled. Faust's `take_events` instead wakes every `within` seconds, busy or
        idle, and acknowledges a chunk when its generator closes, handled or not."""
        manual = stream.noack()  # type: ignore[attr-defined]  # on Stream, not StreamT
        waiting = manual.channel.queue
        chunk: list[EventT[bytes]] = []
        async for event in manual.events():
            chunk.append(event)
            if len(chunk) < CHUNK and not waiting.empty():
                continue
            try:
                await aggregator.handle_until_done([
                    Fetched(e.message.topic, e.message.partition, e.message.offset,
                            e.value or b"") for e in chunk])
            except Exception:
                die("handling a chunk of batch-events failed")
            for handled in chunk:
                await manual.ack(handled)
            yield len(chunk)
            chunk = []

    app.aggregate = aggregate

    @app.timer(EXPIRY_EVERY_S, name="expiry")  # type: ignore[untyped-decorator]
    async def expiry() -> None:
        await aggregator.tick()

    @app.timer(LAG_EVERY_S, name="lag")  # type: ignore[untyped-decorator]
    async def lag() -> None:
        await record_lag(app)

    def ours(partitions: Set[TP]) -> list[int]:
        return [tp.partition for tp in partitions if tp.topic == topics.batch_events]

    @app.on_partitions_assigned.connect
    async def assigned(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        aggregator.assigned(ours(args[0]))

    @app.on_partitions_revoked.connect
    async def revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        aggregator.revoked(ours(args[0]))

    @app.task  # type: ignore[untyped-decorator]
    async def serve_metrics() -> None:
        metrics.serve(settings)

    return app


async def record_lag(app: AggregatorApp) -> None:
    """Consumer lag per partition: the end offset carried in fetch responses (the embedded
    broker's ListOffsets answer is wrong) less the consumer's position."""
    group = app.conf.id
    try:
        assigned = app.consumer.assignment()
    except Exception:  # the consumer is not started yet
        return
    for tp in assigned:
        try:
            high = app.consumer.highwater(tp)
            position = await app.consumer.position(tp)
        except Exception:  # not fetched yet, or mid-rebalance
            continue
        if high is None or position is None or high < 0 or position < 0:
            continue
        metrics.LAG.labels(group, tp.topic, str(tp.partition)).set(max(high - position, 0))


def die(why: str) -> NoReturn:
    """Exit at once, as a SIGKILL would: nothing of the chunk in hand is committed, and the
    restarted aggregator handles it again. Not Faust's crash: an app that crashed waits, as
    it stops, for the chunk's acknowledgements, which never come."""
    log.critical("%s: exiting, to be started again", why, exc_info=True)
    logging.shutdown()
    os._exit(1)


class AggregatorWorker(faust.Worker):
    """Faust's worker, plus: a crash anywhere in the app (the agent, the fetcher) stops the
    process with the crash's exception, so its supervisor starts it again. Faust marks the
    app crashed and goes on running without consuming: measured, a fetcher that could not
    decode a record left the aggregator up and idle until it was killed."""

    def __init__(self, app: AggregatorApp, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.spinner = None  # a service's log is no terminal

    def _setproctitle(self, info: str, **kwargs: Any) -> None:
        """The process keeps its title, `millrace aggregator`, as every service does in
        `ps` (Faust's would be `[Faust:Worker] -init- …`)."""

    async def on_started(self) -> None:
        self.add_future(self._stop_on_crash())
        await super().on_started()

    async def _stop_on_crash(self) -> None:
        await self._crashed.wait()
        log.critical("the aggregator crashed (%r): stopping, to be started again",
                     self.crash_reason)
        self._schedule_shutdown(signal.SIGTERM)

    async def on_shutdown(self) -> None:
        await super().on_shutdown()
        app = self.app
        if isinstance(app, AggregatorApp):  # the agent has stopped: nothing is in flight
            await app.aggregator.close()


def run(settings: Settings) -> None:
    """`millrace aggregator`: the Faust worker, logging as every millrace service does.
    SIGTERM stops it cleanly (the agent finishes its chunk; offsets are committed)."""
    worker = AggregatorWorker(create_app(settings), loglevel=settings.log_level.upper(),
                             override_logging=False, redirect_stdouts=False, quiet=True)
    worker.execute_from_commandline()


@functools.cache
def _from_environment() -> AggregatorApp:
    return create_app(Settings.load())


def __getattr__(name: str) -> Any:
    """`faust -A streams.app worker`: Faust looks up `app` here, and gets one made from the
    environment's settings (MILLRACE_*), as `millrace aggregator` makes it."""
    if name == "app":
        return _from_environment()
    raise AttributeError(name)
