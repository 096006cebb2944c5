"""`millrace chaos --scale-out`: two of every service as on separate hosts, hosts lost and
added mid-batch, every line checked.

`millrace up --replicas gateway=2,worker=2,aggregator=2,sink=2` gives every instance its own
data dir; they share only Kafka, Redis and the file store (moto's S3 server in the test).
Two batches run: an uploaded file, and a stream batch fed through `<prefix>.ingest` (half
its lines before the faults, half after). The echo engine takes `step_ms` a step, so the
batch lasts long enough to act while it runs (`MILLRACE_ECHO_STEP_MS`).

At 10 % of the file batch the sink and the aggregator that own its partition, and the
gateway that owns the stream batch's ingest partition, are SIGKILLed and their data dirs
deleted — their host is gone — before the launcher starts them again on empty disks. At
50 % a new host joins: a third worker, gateway, aggregator and sink, each in a data dir of
its own; at 80 % it leaves (SIGTERM: each leaves its group, as a scale-in does). Both
batches must then end `completed` with every line exactly once, counts and usage exact,
and one webhook per event.

The file batch's progress is read from the API every 50 ms, as a user watches it: the
longest wait for it to move after each step is the pause that step's rebalance costs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from millrace import readiness
from millrace.client import StreamBatch
from millrace.kafka import partition_of
from millrace.topics import Topics
from ops import SERVICES
from ops.chaos import (
    SLOW_ECHO,
    TERMINAL,
    Api,
    Receiver,
    Round,
    Up,
    batch_file,
    check,
    owner,
)
from ops.embedded import die_with_parent, free_port

REPLICAS = "gateway=2,worker=2,aggregator=2,sink=2"
SAMPLE_EVERY_S = 0.05
PHASE_S = 120.0  # each step's wait before the scenario gives up, saying where it was


@dataclass
class Progress:
    """A batch's finished lines over time, read from the API."""

    api: Api
    batch_id: str
    samples: list[tuple[float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    failed: str = ""

    def watch(self) -> None:
        try:
            self._watch()
        except Exception as exc:  # the scenario's waits then say why they ran out
            self.failed = repr(exc)
            raise

    def _watch(self) -> None:
        while not self.stop.is_set():
            batch = self.api.batch(self.batch_id)
            if batch is not None:
                counts = batch["request_counts"]
                self.samples.append((time.monotonic(), counts["completed"] + counts["failed"]))
                if batch["status"] in TERMINAL:
                    return
            self.stop.wait(SAMPLE_EVERY_S)

    @property
    def done(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def longest_pause(self, since: float, until: float = float("inf")) -> float:
        """The longest wait, between `since` and `until`, for the count to move on."""
        moved, count, longest = since, -1, 0.0
        for at, done in self.samples:
            if at < since:
                count = done
                continue
            if at > until:
                break
            if done > count >= 0:
                longest = max(longest, at - moved)
                moved = at
            count = done
        return round(longest, 2)


@dataclass
class ScaleOut:
    file: Round
    stream: Round
    lost: list[str] = field(default_factory=list)  # instances whose host was lost
    added: list[str] = field(default_factory=list)  # the instances of the added host
    added_partitions: list[int] = field(default_factory=list)  # of responses, its sink's
    webhooks: dict[str, list[str]] = field(default_factory=dict)  # batch → event types
    pauses: dict[str, float] = field(default_factory=dict)  # step → longest pause (s)
    lost_at_done: int = 0  # the file batch's finished lines when the hosts were lost
    joined_s: float = 0.0  # the added host: started → its sink has partitions
    before: float = 0.0  # the longest pause before any step (the baseline)
    batch_ids: list[str] = field(default_factory=list)

    def count_webhooks(self, receiver: Receiver) -> None:
        """What each batch's webhook receiver got; called once the deployment stopped, so
        a second send of an event (by a sink that took a partition over) would be in."""
        self.webhooks = {b: [t for _, t, x in receiver.events if x == b]
                         for b in self.batch_ids}

    @property
    def webhooks_once(self) -> bool:
        return bool(self.webhooks) and all(
            types == ["batch.completed"] for types in self.webhooks.values())

    @property
    def ok(self) -> bool:
        return self.file.ok and self.stream.ok and self.webhooks_once


def lose_hosts(up: Up, names: list[str]) -> None:
    """SIGKILL these instances and delete their data dirs before the launcher (stopped
    meanwhile) starts them again: a new host with an empty disk takes each one's place."""
    assert up.proc is not None
    os.kill(up.proc.pid, signal.SIGSTOP)
    try:
        pids = [pid for name in names if (pid := up.pid(name)) is not None]
        for pid in pids:
            os.killpg(pid, signal.SIGKILL)
        _until(lambda: all(_dead(pid) for pid in pids), 30)
        for name in names:
            shutil.rmtree(readiness.instance_dir(up.data_dir, name), ignore_errors=True)
    finally:
        os.kill(up.proc.pid, signal.SIGCONT)


def _dead(pid: int) -> bool:
    """Gone, or a zombie its (stopped) parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def _until(what: Callable[[], Any], timeout: float, waiting_for: str = "",
           state: Callable[[], object] = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := what():
            return value
        time.sleep(SAMPLE_EVERY_S)
    raise TimeoutError(f"no {waiting_for} within {timeout}s {state()}")


NEW_HOST = ("worker", "gateway", "aggregator", "sink")


@contextmanager
def new_host(up: Up, data_dir: Path, number: int = 3,
             services: tuple[str, ...] = NEW_HOST) -> Iterator[dict[str, Path]]:
    """One of each of `services` (`<service>-<number>`), alone in its own data dir under
    `data_dir`, pointed at the deployment's Kafka, Redis and file store, as on a host that
    joins; all stopped (SIGTERM: they leave their groups) on leaving. Yields each one's
    readiness marker."""
    endpoints = json.loads((up.data_dir / "endpoints.json").read_text())
    base = {k: v for k, v in os.environ.items() if not k.startswith("MILLRACE_")}
    base.update({
        "MILLRACE_KAFKA__BOOTSTRAP": endpoints["kafka_bootstrap"],
        "MILLRACE_REDIS_URL": endpoints["redis_url"],
        "MILLRACE_TOPIC_PREFIX": endpoints["topic_prefix"],
        "MILLRACE_FILE_STORE_URL": up.env.get("MILLRACE_FILE_STORE_URL",
                                              str(up.data_dir / "files")),
        "MILLRACE_WEBHOOK_SIGNING_KEY": (up.data_dir / "webhook_signing_key").read_text(),
        "MILLRACE_ENGINE": up.engine,
        "MILLRACE_WEBHOOK_ALLOW": "loopback",  # as the local `up` it joins
        **{k: v for k, v in up.env.items() if k != "MILLRACE_REPLICAS"},
    })
    procs: list[subprocess.Popen[bytes]] = []
    markers = {}
    try:
        for service in services:
            name = f"{service}-{number}"
            own = data_dir / name
            own.mkdir(parents=True, exist_ok=True)
            env = {**base, "MILLRACE_DATA_DIR": str(own), f"MILLRACE_{service.upper()}_NAME": name}
            if service == "gateway":
                env["MILLRACE_PORT"] = str(free_port())
            with (own / f"{name}.log").open("ab") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", SERVICES[service]], env=env, stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    preexec_fn=die_with_parent))
            markers[name] = own / "run" / f"{name}.ready"
        yield markers
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def scale_out(up: Up, receiver: Receiver, work: Path, *, lines: int = 2000,
              stream_lines: int = 400, lose_at: float = 0.1, add_at: float = 0.5,
              remove_at: float = 0.8, timeout: float = 600) -> ScaleOut:
    """The scenario of the module docstring on a running `up --replicas` deployment."""
    api = Api(up)
    endpoints = json.loads((up.data_dir / "endpoints.json").read_text())
    topics = Topics(endpoints["topic_prefix"])
    partitions = int(up.env.get("MILLRACE_PARTITIONS", "4"))
    stream_input = batch_file(stream_lines, "s").splitlines()
    result = ScaleOut(Round(1, "lose sink+aggregator+gateway, add and remove a host", 0, lines),
                      Round(2, "stream batch across the same", 0, stream_lines))
    file_id = api.create(lines, "f", receiver.url)
    progress = Progress(api, file_id)
    watcher = threading.Thread(target=progress.watch, daemon=True)
    watcher.start()
    stream = StreamBatch.open(up.base_url, up.api_key, kafka=endpoints["kafka_bootstrap"],
                              topic_prefix=topics.prefix, webhook_url=receiver.url)
    steps: list[tuple[str, float]] = []

    def state() -> str:
        return (f"(file batch: {progress.done}/{lines} lines, {progress.failed or 'watched'}; "
                f"stream batch: {(api.batch(stream.id) or {}).get('request_counts')})")

    def at(share: float) -> None:
        _until(lambda: progress.done >= lines * share, timeout, f"{share:.0%} done", state)

    try:
        for value in stream_input[:stream_lines // 2]:
            stream.send_raw(value)
        stream.flush()
        at(lose_at)
        file_p, stream_p = partition_of(file_id, partitions), partition_of(stream.id, partitions)
        if progress.done >= lines:
            raise RuntimeError(f"the batch ended before the faults {state()}: more lines")
        result.lost = [name for name in (
            owner(up, "sink", topics.responses, file_p),
            owner(up, "aggregator", topics.batch_events, file_p),
            owner(up, "gateway", topics.ingest, stream_p)) if name is not None]
        result.lost_at_done = progress.done
        steps.append(("hosts lost (SIGKILL)", time.monotonic()))
        lose_hosts(up, result.lost)
        for value in stream_input[stream_lines // 2:]:
            stream.send_raw(value)
        _until(lambda: _seal(stream), PHASE_S, "seal", state)
        at(add_at)
        steps.append(("host added", time.monotonic()))
        with new_host(up, work / "host-3") as markers:
            result.added = sorted(markers)
            _until(lambda: all(readiness.read_path(m) for m in markers.values()), PHASE_S,
                   "the new host's services ready", state)
            sink = markers["sink-3"]
            joined = _until(lambda: (info := readiness.read_path(sink))
                            and info.get("partitions", {}).get(topics.responses) and info,
                            PHASE_S, "partitions for the new sink", state)
            result.added_partitions = joined["partitions"][topics.responses]
            result.joined_s = round(time.monotonic() - steps[-1][1], 2)
            at(remove_at)
            steps.append(("host removed (SIGTERM)", time.monotonic()))
        finish(api, receiver, file_id, result.file, "f", timeout)
        finish(api, receiver, stream.id, result.stream, "s", timeout)
        watcher.join(timeout)
        ends = [when for _, when in steps[1:]] + [float("inf")]
        result.pauses = {name: progress.longest_pause(when, end)
                         for (name, when), end in zip(steps, ends, strict=True)}
        first = next(when for when, done in progress.samples if done > 0)
        result.before = progress.longest_pause(first, steps[0][1])
        result.batch_ids = [file_id, stream.id]
    finally:
        progress.stop.set()
        stream.close()
    return result


def finish(api: Api, receiver: Receiver, batch_id: str, result: Round, tag: str,
           timeout: float) -> None:
    """Wait for the batch to end, then check it line by line."""
    final = api.until(lambda: (b := api.batch(batch_id)) is not None
                      and b["status"] in TERMINAL and b, timeout)
    if not final:
        result.status = f"stuck:{(api.batch(batch_id) or {}).get('status')}"
        return
    check(result, final, api, tag)
    api.until(lambda: receiver.delivered(batch_id), 60)
    result.webhooks = receiver.delivered(batch_id)


def _seal(stream: StreamBatch) -> bool:
    try:
        stream.seal()
    except httpx.HTTPError:  # the gateway that answered was the lost one: try again
        return False
    return True


def table(result: ScaleOut) -> str:
    rows = [("batch", "status", "out", "err", "dup", "missing", "counts", "usage", "webhooks")]
    for one, name in ((result.file, "file"), (result.stream, "stream")):
        rows.append((name, one.status, str(one.output), str(one.errors), str(one.duplicated),
                     str(one.missing), "exact" if one.counts_exact else "WRONG",
                     "exact" if one.usage_exact else "WRONG", str(one.webhooks)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.append(f"\nhosts lost at {result.lost_at_done}/{result.file.lines} lines: "
                 f"{', '.join(result.lost)}; host added: {', '.join(result.added)} "
                 f"(sink-3: responses partitions {result.added_partitions}, "
                 f"{result.joined_s:.2f} s after the host started)")
    lines.append(f"longest pause in progress: before the steps {result.before:.2f} s; " +
                 ", ".join(f"{step} {seconds:.2f} s" for step, seconds in result.pauses.items()))
    lines.append("ok" if result.ok else "NOT ok")
    return "\n".join(lines)


def run(work: Path, env: dict[str, str], *, lines: int = 2000,
        say: Callable[[str], None] = lambda _: None) -> ScaleOut:
    """A fresh `up --replicas` deployment in `work`, the scenario, and the deployment
    stopped again."""
    receiver = Receiver()
    up = Up(work / "up", free_port(), "echo", {
        "MILLRACE_REPLICAS": REPLICAS, **SLOW_ECHO, **env})
    try:
        up.start()
        say(f"up --replicas {REPLICAS} in {up.data_dir}")
        result = scale_out(up, receiver, work, lines=lines)
        up.stop()
        result.count_webhooks(receiver)
        return result
    finally:
        receiver.close()
        if up.proc is not None and up.proc.poll() is None:
            up.stop()
