"""Faust's aiokafka transport with millrace's broker fetch wait.

faust-streaming hard-codes `fetch_max_wait_ms=1500` for its consumer, and tansu does not
answer a waiting fetch at once when a record arrives if the wait is long: measured,
~200-380 ms from produce to consume at 1,000-1,500 ms. Every hop into the aggregator (last
response, files_ready) paid it. It gets the wait of every other consumer
(`Settings.kafka_fetch_wait_ms`).
"""

from __future__ import annotations

import asyncio

import aiokafka
import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TransportT


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_consumer(self, loop: asyncio.AbstractEventLoop) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_consumer(loop)
        # read when the consumer starts (it builds its fetcher then); Faust offers no setting.
        # Fail loudly if aiokafka renames it, rather than silently waiting 1.5 s a hop again.
        if not hasattr(consumer, "_fetch_max_wait_ms"):
            raise RuntimeError("aiokafka changed: cannot set the consumer's fetch wait")
        app = self.app
        consumer._fetch_max_wait_ms = app.fetch_wait_ms if isinstance(app, App) else 100
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class App(faust.App):
    """faust.App whose consumer fetches with `fetch_wait_ms`."""

    fetch_wait_ms: int = 100

    def _new_transport(self) -> TransportT:
        return _Transport(self.conf.broker_consumer, self)
