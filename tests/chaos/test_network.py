"""Issue 25: the faults of a real network, on separate hosts (`ops/network.py`).

One deployment for the module, two of every service: the broker (behind a TCP proxy that can
add latency and loss) and Redis each on a host of their own, `millrace up` and the two
gateways on the gateway host, every worker, aggregator and sink on its own host. Each test
runs one batch through one fault — a frozen pair of hosts, a host cut from the broker or
from Redis, a slow and lossy network, Redis out of memory — and ends as a user checks: the
batch final, every line exactly once, counts and usage equal to the files, exactly one
webhook per event, and the API answering all along (200, or 503 while a dependency is away;
never a 500, never a hang)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from millrace import readiness
from ops.chaos import (
    TERMINAL,
    Api,
    Receiver,
    Round,
    Up,
    batch_file,
    check,
    deployment,
    holder,
    pause_owners,
    run_round,
)
from ops.network import Impairment, Spread
from tests.deployment import wait_until
from tests.website import serving

# 250 ms an engine step, 16 lines a step: 64 lines/s a worker, whatever the machine
ECHO = {"MILLRACE_ECHO_STEP_MS": "250", "MILLRACE_WORKER_MAX_IN_FLIGHT": "16"}
LINES = 1200
log = logging.getLogger(__name__)
CUT_S = 30.0


@dataclass
class World:
    up: Up
    spread: Spread
    receiver: Receiver
    api: Api
    redis: redis.Redis
    fault_over: float = 0.0  # when the last fault ended (monotonic)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with deployment(tmp_path_factory.mktemp("network"), "echo", ECHO, hosts=True) as up:
        assert up.spread is not None
        receiver = Receiver(up.spread.hosts.here("front"))
        client = redis.Redis.from_url(up.env["MILLRACE_REDIS_URL"])
        try:
            yield World(up, up.spread, receiver, Api(up), client)
        finally:
            client.close()
            receiver.close()


@dataclass
class Probe:
    """The API asked every half second while a fault lasts: what it answered."""

    api: Api
    path: str
    answers: list[int | None] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.wait(0.5):
            r = self.api.call("GET", self.path)  # 30 s at most: longer is a hang (None)
            self.answers.append(None if r is None else r.status_code)


@contextmanager
def probing(api: Api, path: str) -> Iterator[Probe]:
    probe = Probe(api, path)
    thread = threading.Thread(target=probe.run, daemon=True)
    thread.start()
    try:
        yield probe
    finally:
        probe._stop.set()
        thread.join(60)
    assert probe.answers and set(probe.answers) <= {200, 503}, probe.answers


def started(world: World, batch_id: str) -> None:
    wait_until(lambda: (b := world.api.batch(batch_id)) is not None
               and b["request_counts"]["completed"] > 0, 120, "the batch to start")


def finished(world: World, batch_id: str, tag: str, lines: int = LINES) -> dict[str, Any]:
    """The batch final and exact, and its one webhook delivered once."""
    api = world.api

    def final_batch() -> dict[str, Any] | None:
        batch = api.batch(batch_id)
        return batch if batch is not None and batch["status"] in TERMINAL else None

    try:  # within the test's own timeout, so that a batch that never ends says where it is
        final = wait_until(final_batch, 420, "the batch to end")
    except AssertionError:
        raise AssertionError(stuck(world, batch_id)) from None
    log.info("%s: %s %.1f s after the fault ended", tag, final["status"],
             time.monotonic() - world.fault_over)
    result = Round(1, tag, 0.0, lines)
    check(result, final, api, tag)
    wait_until(lambda: world.receiver.delivered(batch_id), 120, "the webhook")
    result.webhooks = world.receiver.delivered(batch_id)
    assert result.ok, result
    events = [t for _, t, b in world.receiver.events if b == batch_id]
    assert events == ["batch.completed"], events
    assert not [line for line in world.up.stderr if "exited with code" in line]
    return final


def stuck(world: World, batch_id: str) -> str:
    """What a batch that never ended shows: its last state, and what the services said of
    it and of any trouble."""
    said = [line.rstrip() for line in world.up.stderr if batch_id in line
            or " WARNING " in line or " ERROR " in line]
    return (f"{batch_id} never ended: {world.api.batch(batch_id)}\n"
            + "\n".join(said[-60:])[-8000:])


@contextmanager
def cut(world: World, host: str, net: str, seconds: float = CUT_S) -> Iterator[None]:
    """`host` off `net` for `seconds` (the body runs meanwhile), then back."""
    world.spread.hosts.cut(host, net)
    until = time.monotonic() + seconds
    try:
        yield
        time.sleep(max(until - time.monotonic(), 0))  # the length of the cut is the fault
    finally:
        world.spread.hosts.heal(host, net)
        world.fault_over = time.monotonic()


def test_a_frozen_sink_and_aggregator_never_undo_what_their_successors_did(
        world: World) -> None:
    """SIGSTOP 25 s of the sink and aggregator holding the batch's partition: their
    sessions expire, the others finish the batch, the frozen pair wakes up still holding
    records; the batch stays completed, exact, with one webhook."""
    batch_id = world.api.create(LINES, "pause", world.receiver.url)
    with probing(world.api, f"/batches/{batch_id}"):
        frozen = pause_owners(world.up, batch_id)
    woke, world.fault_over = time.time(), time.monotonic()
    assert sorted(name.split("-")[0] for name in frozen) == ["aggregator", "sink"]
    final = finished(world, batch_id, "pause")
    # the woken pair polled again (a rejoin rewrites their markers): whatever they held
    # when they froze has been handled by now
    wait_until(lambda: all(_marked_since(world.up, name, woke) for name in frozen), 120,
               "the frozen pair to rejoin")
    after = world.api.batch(batch_id)
    assert after is not None
    assert (after["status"], after["request_counts"], after["usage"]) == (
        final["status"], final["request_counts"], final["usage"])
    assert [t for _, t, b in world.receiver.events if b == batch_id] == ["batch.completed"]


def _marked_since(up: Up, name: str, since: float) -> bool:
    return any(path.stem == name and path.stat().st_mtime > since
               for path in readiness.markers(up.data_dir))


def test_a_worker_cut_from_the_broker_with_requests_running_duplicates_nothing(
        world: World) -> None:
    """The worker holding the batch is cut from the broker for 30 s mid-batch: the other
    worker takes its partition over and runs its lines again; when the link heals, the
    cut worker's late responses reach the broker too, and the sink keeps one per line."""
    batch_id = world.api.create(LINES, "wcut", world.receiver.url)
    started(world, batch_id)
    name = holder(world.up, "worker", batch_id)
    pid = world.up.pid(name)
    with probing(world.api, f"/batches/{batch_id}"), cut(world, name, "kafka"):
        batch = world.api.batch(batch_id)
        assert batch is not None and batch["status"] == "in_progress", batch
    finished(world, batch_id, "wcut")
    assert world.up.pid(name) == pid, "the cut worker was restarted instead of going on"


def test_a_sink_cut_from_redis_but_not_the_broker_waits_and_goes_on(world: World) -> None:
    """`millrace chaos`'s `partition-sink`: the sink holding the batch keeps its partition
    (the broker still sees it) but cannot reach Redis for 30 s; it waits, then goes on
    where it was."""
    with probing(world.api, "/batches?limit=1"):
        result = run_round(world.up, world.receiver, 3, "partition-sink", LINES, 1.0)
    assert result.ok, result
    assert not [line for line in world.up.stderr if "exited with code" in line]
    batch = world.api.call("GET", "/batches?limit=1")
    assert batch is not None and batch.status_code == 200
    batch_id = batch.json()["data"][0]["id"]
    events = [t for _, t, b in world.receiver.events if b == batch_id]
    assert events == ["batch.completed"], events


def test_the_gateway_cut_from_the_broker_during_an_explode(world: World) -> None:
    """Both gateways' host loses the broker while a batch's explode job runs (its input
    fetched from a URL that answers once the cut is in place): creating a batch is a 503,
    reading one a 200; when the link heals the explode goes on and every line runs once."""
    api = world.api
    upload = api.call("POST", "/files", data={"purpose": "batch"},
                      files={"file": ("x.jsonl", batch_file(2, "x"))})
    assert upload is not None and upload.status_code == 200, upload
    with serving({"/input.jsonl": batch_file(LINES, "gcut")}, "application/jsonl",
                 held=frozenset({"/input.jsonl"}),
                 host=world.spread.hosts.here("front")) as source:
        created = api.call("POST", "/batches", json={
            "input_file_url": f"{source.url}/input.jsonl", "endpoint": "/v1/chat/completions",
            "completion_window": "24h", "webhook_url": world.receiver.url})
        assert created is not None and created.status_code == 200, created
        batch_id = created.json()["id"]
        assert source.held_hit.wait(60), "the gateway never fetched the input"
        with probing(api, f"/batches/{batch_id}"), cut(world, "gateway", "kafka"):
            source.release.set()
            refused = api.call("POST", "/batches", json={
                "input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions",
                "completion_window": "24h"})
            assert refused is not None and refused.status_code == 503, refused
            assert refused.json()["error"]["type"] == "server_error"
            batch = api.batch(batch_id)
            assert batch is not None and batch["status"] == "validating", batch
    finished(world, batch_id, "gcut")


def test_200_ms_and_5_percent_loss_to_the_broker_for_a_whole_batch(world: World) -> None:
    """Every host's traffic to the broker held 200 ms, one chunk in twenty a retransmission
    timeout longer, from create to the webhook."""
    before = world.spread.impaired()
    world.spread.impair(Impairment(delay_ms=200, loss=0.05))
    try:
        world.fault_over = time.monotonic()  # it lasts the whole batch: timed from create
        batch_id = world.api.create(LINES // 2, "slow", world.receiver.url)
        with probing(world.api, f"/batches/{batch_id}"):
            finished(world, batch_id, "slow", LINES // 2)
        # it went through the impaired path, lost segments included
        wait_until(lambda: (now := world.spread.impaired())["lost"] > before["lost"]
                   and now["held"] > before["held"] + 100, 10, "the proxy's report")
    finally:
        world.spread.impair(Impairment())


def test_redis_out_of_memory_gets_503s_and_the_batch_finishes_once_freed(
        world: World) -> None:
    """Redis at `maxmemory` with `noeviction` mid-batch: the API answers writes with 503,
    the services wait, nothing is half-written; once memory is freed the batch finishes
    exact."""
    batch_id = world.api.create(LINES, "oom", world.receiver.url)
    started(world, batch_id)
    used = int(world.redis.info("memory")["used_memory"])
    world.redis.config_set("maxmemory-policy", "noeviction")
    world.redis.config_set("maxmemory", max(used // 2, 1 << 20))
    try:
        with probing(world.api, f"/batches/{batch_id}"):
            upload = world.api.call("POST", "/files", data={"purpose": "batch"},
                                    files={"file": ("x.jsonl", batch_file(2, "x"))})
            assert upload is not None and upload.status_code == 503, upload
            assert upload.json()["error"]["type"] == "server_error"
            time.sleep(20)  # the length of the outage is the fault
    finally:
        world.redis.config_set("maxmemory", 0)
        world.fault_over = time.monotonic()
    finished(world, batch_id, "oom")
