"""`millrace chaos --rounds N`: a deployment put through random kills, checked line by line.

It starts `millrace up` in its own data dir (echo engine by default; `--engine vllm` for
real inference), then for each round creates a batch whose webhook goes to a receiver in
this process, waits a random part of the time a batch takes, and does one fault:

- `sigterm-all` / `sigkill-all`: stop the whole deployment (Ctrl-C; or SIGKILL of its
  process group, as a power loss does) and run `millrace up` again on the same data dir;
- `kill-<part>`: SIGKILL one of broker, redis, gateway, worker, aggregator, sink (the
  launcher restarts it);
- `pause`: freeze (SIGSTOP) the sink and the aggregator that hold the batch's partition for
  25 s, then let them go on (SIGCONT): what a long GC pause, a VM's live migration or a
  suspended laptop does. Their group sessions expire meanwhile; with `--replicas` another
  sink and aggregator take the partition over and may finish the batch before the frozen
  pair wakes up, still holding records they fetched (the owner epochs and versions fence
  them, docs/architecture.md "Fencing");
- `partition-worker`, `partition-sink`, `partition-gateway` (named with `--faults` only):
  the deployment runs spread over hosts on this machine, two of every service, each
  instance a network namespace of its own (`ops/network.py`, needs root); the host
  of a worker running the batch's lines is cut from the broker, that of the batch's sink
  from Redis, or the gateways' host from the broker, for 30 s, then healed;
- `disk-full` (named with `--faults` only): the deployment's file store is on a 64 MiB
  file system of its own, filled to the last byte for 20 s, then freed.

Then it waits for the batch to end and checks what a user would: a final status, every
input line in exactly one of the output and error files, `request_counts` and `usage`
equal to what the files hold, and the webhook delivered. Each round is a row of the table.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from millrace import readiness
from millrace.kafka import partition_of
from millrace.settings import BUNDLED_CHAT_MODEL
from millrace.topics import Topics
from ops.embedded import die_with_parent, free_port
from ops.network import Hosts, Spread

PARTS = ("broker", "redis", "gateway", "worker", "aggregator", "sink")
FAULTS = ("sigterm-all", "sigkill-all", *(f"kill-{p}" for p in PARTS), "pause")
# a deployment spread over hosts (ops/network.py): whose link is cut, from what
PARTITIONS = {"partition-worker": ("worker", "kafka"), "partition-sink": ("sink", "redis"),
              "partition-gateway": ("gateway", "kafka")}
EVERY_FAULT = (*FAULTS, *PARTITIONS, "disk-full")
CUT_S = 30.0  # a partition: five group sessions
FULL_S = 20.0  # a full file store
SMALL_STORE_MB = 64
# an echo engine as slow as a model on a GPU (250 ms a step, 8 lines a step): a batch lasts
# long enough for a fault to land while it runs
SLOW_ECHO = {"MILLRACE_ECHO_STEP_MS": "250", "MILLRACE_WORKER_MAX_IN_FLIGHT": "8"}
PAUSE_S = 25.0  # longer than a group session (6 s): the partitions move meanwhile
TERMINAL = {"completed", "failed", "expired", "cancelled"}


# --- a deployment driven from outside, as a user runs it --------------------------------
@dataclass
class Up:
    """`millrace up` in a data dir, on a fixed port (kept across restarts)."""

    data_dir: Path
    port: int
    engine: str = "echo"
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[str] | None = None
    api_key: str = ""
    stderr: list[str] = field(default_factory=list)
    pumps: list[threading.Thread] = field(default_factory=list)
    wrap: list[str] = field(default_factory=list)  # a command `up` runs under (unshare, …)
    host: str = "127.0.0.1"  # where the API answers
    spread: Spread | None = None  # the hosts it runs on, for partitions
    small: Path | None = None  # a small file system of its own, for a full disk

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 600) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MILLRACE_")}
        env.update({"MILLRACE_LOG_LEVEL": "INFO", **self.env})
        self.proc = subprocess.Popen(
            [*self.wrap, sys.executable, "-m", "ops", "up", "--port", str(self.port),
             "--data-dir", str(self.data_dir), "--engine", self.engine],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            preexec_fn=die_with_parent, start_new_session=True)
        ready: list[str] = []
        self.pumps = [threading.Thread(target=self._pump_out, args=(self.proc, ready),
                                       daemon=True),
                      threading.Thread(target=self._pump_err, args=(self.proc,), daemon=True)]
        for pump in self.pumps:
            pump.start()
        deadline = time.monotonic() + timeout
        while not ready:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("millrace up did not get ready:\n" + "".join(self.stderr[-40:]))
            time.sleep(0.1)
        self.api_key = ready[0].split("api_key=", 1)[1].split()[0]

    def _pump_out(self, proc: subprocess.Popen[str], ready: list[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("millrace ready: "):
                ready.append(line)

    def _pump_err(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        self.stderr.extend(proc.stderr)

    def pid(self, part: str) -> int | None:
        return readiness.pids(self.data_dir).get(part)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        """SIGTERM to the launcher (it stops everything), or SIGKILL to the whole group."""
        assert self.proc is not None
        if sig == signal.SIGKILL:
            os.killpg(self.proc.pid, signal.SIGKILL)
            _kill_leftovers(self.data_dir)
        else:
            self.proc.send_signal(sig)
        return reap(self.proc, self.pumps, timeout)


def reap(proc: subprocess.Popen[str], pumps: list[threading.Thread], timeout: float) -> int:
    """Wait for a stopped `millrace up`, its output read to the end and closed: its exit code."""
    code = proc.wait(timeout)
    for pump in pumps:
        pump.join(10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return code


def _kill_leftovers(data_dir: Path) -> None:
    """Every child leads its own process group (so Ctrl-C reaches only the launcher): a
    power loss takes them too."""
    for pid in readiness.pids(data_dir).values():
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


# --- a webhook receiver -------------------------------------------------------------------
class Receiver:
    """Records every webhook POST: (webhook-id, event type, batch id)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.events: list[tuple[str, str, str]] = []
        received = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    event = json.loads(body)
                    received.append((str(self.headers.get("webhook-id")),
                                      str(event.get("type")),
                                      str(event.get("data", {}).get("id"))))
                except ValueError:
                    pass
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer((host, 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/hook"

    def delivered(self, batch_id: str) -> int:
        return sum(1 for _, _, b in self.events if b == batch_id)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- one round ----------------------------------------------------------------------------
@dataclass
class Round:
    number: int
    fault: str
    fault_at_s: float  # after create
    lines: int
    status: str = ""
    output: int = 0
    errors: int = 0
    duplicated: int = 0
    missing: int = 0
    counts_exact: bool = False
    usage_exact: bool = False
    webhooks: int = 0
    recovered_s: float = 0.0  # fault → the deployment serves again
    finished_s: float = 0.0  # fault → the batch is final
    note: str = ""

    @property
    def ok(self) -> bool:
        return (self.status == "completed" and self.duplicated == self.missing == 0
                and self.output + self.errors == self.lines and self.counts_exact
                and self.usage_exact and self.webhooks >= 1)


def batch_file(lines: int, tag: str, model: str = BUNDLED_CHAT_MODEL) -> bytes:
    return "".join(json.dumps({
        "custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "max_tokens": 8,
                 "messages": [{"role": "user", "content": f"Count to {i % 7 + 1}."}]},
    }) + "\n" for i in range(lines)).encode()


class Api:
    """Raw HTTP, so an outage is a status code here, not an exception to unwind."""

    def __init__(self, up: Up) -> None:
        self.up = up

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        try:
            return httpx.request(method, self.up.base_url + path, timeout=30,
                                 headers={"Authorization": f"Bearer {self.up.api_key}"},
                                 **kwargs)
        except httpx.HTTPError:
            return None

    def until(self, what: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = what()
            if value:
                return value
            time.sleep(0.1)
        return None

    def create(self, lines: int, tag: str, webhook: str) -> str:
        upload = self.until(lambda: (r := self.call(
            "POST", "/files", files={"file": (f"{tag}.jsonl", batch_file(lines, tag))},
            data={"purpose": "batch"})) is not None and r.status_code == 200 and r, 120)
        created = self.until(lambda: (r := self.call("POST", "/batches", json={
            "input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h", "webhook_url": webhook,
        })) is not None and r.status_code == 200 and r, 120)
        if not created:
            raise RuntimeError("no batch could be created")
        return str(created.json()["id"])

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        r = self.call("GET", f"/batches/{batch_id}")
        return r.json() if r is not None and r.status_code == 200 else None

    def lines(self, file_id: str | None) -> list[dict[str, Any]]:
        if not file_id:
            return []
        r = self.call("GET", f"/files/{file_id}/content")
        assert r is not None and r.status_code == 200, r
        return [json.loads(x) for x in r.text.splitlines() if x.strip()]


def do_fault(up: Up, fault: str, batch_id: str) -> None:
    if fault == "pause":
        pause_owners(up, batch_id)
        return
    if fault in PARTITIONS:
        partition(up, batch_id, *PARTITIONS[fault])
        return
    if fault == "disk-full":
        disk_full(up)
        return
    if fault in ("sigterm-all", "sigkill-all"):
        up.stop(signal.SIGTERM if fault == "sigterm-all" else signal.SIGKILL)
        up.start()
        return
    part = fault.removeprefix("kill-")
    pid = up.pid(part)
    if pid is None:
        raise RuntimeError(f"no pid for {part}")
    os.kill(pid, signal.SIGKILL)


def pause_owners(up: Up, batch_id: str, seconds: float = PAUSE_S) -> dict[str, int]:
    """SIGSTOP the sink and the aggregator holding the batch's partition, `seconds`, then
    SIGCONT; their names → pids."""
    frozen = {}
    for service in ("sink", "aggregator"):
        name = holder(up, service, batch_id)
        pid = up.pid(name)
        if pid is None:
            raise RuntimeError(f"{name} has no pid")
        frozen[name] = pid
    for pid in frozen.values():
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)  # the length of the freeze is the fault
    finally:
        for pid in frozen.values():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    return frozen


def partition(up: Up, batch_id: str, service: str, net: str, seconds: float = CUT_S) -> str:
    """Cut the host of the `service` instance holding the batch (the gateways' host) off
    `net` for `seconds`, then heal it; the host's name."""
    if up.spread is None:
        raise RuntimeError("a partition needs a deployment spread over hosts "
                           "(ops/network.py)")
    host = "gateway" if service == "gateway" else holder(up, service, batch_id)
    up.spread.hosts.cut(host, net)
    try:
        time.sleep(seconds)  # the length of the cut is the fault
    finally:
        up.spread.hosts.heal(host, net)
    return host


def holder(up: Up, service: str, batch_id: str) -> str:
    """The instance of `service` (worker, sink, aggregator) holding the batch's partition
    (a worker: one of the partitions its lines are on, `millrace.topics.request_route`)."""
    endpoints = json.loads((up.data_dir / "endpoints.json").read_text())
    topics = Topics(endpoints["topic_prefix"])
    topic = {"worker": topics.requests_for(BUNDLED_CHAT_MODEL), "sink": topics.responses,
             "aggregator": topics.batch_events}[service]
    held = partition_of(batch_id, int(up.env.get("MILLRACE_PARTITIONS", "4")))
    name = Api(up).until(lambda: owner(up, service, topic, held), 60)
    if not name:
        raise RuntimeError(f"no {service} holds partition {held} of {topic}")
    return str(name)


def disk_full(up: Up, seconds: float = FULL_S) -> None:
    """Fill the deployment's own small file system (where its file store is) for
    `seconds`, then free it."""
    if up.small is None or up.proc is None:
        raise RuntimeError("a full disk needs a deployment with a small file store")
    filler = Path(f"/proc/{up.proc.pid}/root") / up.small.relative_to("/") / "filler"
    fill(filler)
    try:
        time.sleep(seconds)  # how long the disk stays full is the fault
    finally:
        filler.unlink()


def fill(path: Path) -> None:
    """Write until the file system refuses."""
    chunk = b"\0" * (1 << 20)
    with path.open("wb") as out:
        while True:
            try:
                out.write(chunk)
                out.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return


def owner(up: Up, service: str, topic: str, partition: int) -> str | None:
    """The instance of `service` whose marker says it holds `partition` of `topic`."""
    for path in readiness.markers(up.data_dir):
        if path.stem.split("-")[0] != service:
            continue
        held = (readiness.read_path(path) or {}).get("partitions", {}).get(topic, [])
        if partition in held:
            return path.stem
    return None


def recovered(up: Up, fault: str, before: int | None, api: Api, timeout: float) -> bool:
    """The part is back (a new pid, ready) and the API answers."""
    part = fault.removeprefix("kill-")

    def back() -> bool:
        pid = up.pid(part) if fault.startswith("kill-") else -1
        if pid is None or pid == before:
            return False
        r = api.call("GET", "/models")
        return r is not None and r.status_code == 200

    return bool(api.until(back, timeout))


def run_round(up: Up, receiver: Receiver, number: int, fault: str, lines: int,
              fault_at_s: float, timeout: float = 600) -> Round:
    api = Api(up)
    tag = f"r{number}"
    result = Round(number, fault, round(fault_at_s, 2), lines)
    batch_id = api.create(lines, tag, receiver.url)
    time.sleep(fault_at_s)  # the moment of the fault is the point of the round
    part = fault.removeprefix("kill-")
    before = up.pid(part) if fault.startswith("kill-") else None
    faulted = time.monotonic()
    do_fault(up, fault, batch_id)
    api = Api(up)  # a restarted `up` may print a new key only if the data dir lost it
    if recovered(up, fault, before, api, timeout):
        result.recovered_s = round(time.monotonic() - faulted, 2)
    final = api.until(lambda: (b := api.batch(batch_id)) is not None
                      and b["status"] in TERMINAL and _settled(b) and b, timeout)
    result.finished_s = round(time.monotonic() - faulted, 2)
    if not final:
        b = api.batch(batch_id) or {}
        result.status = f"stuck:{b.get('status')}"
        result.note = json.dumps(b.get("request_counts"))
        return result
    check(result, final, api, tag)
    api.until(lambda: receiver.delivered(batch_id), 60)
    result.webhooks = receiver.delivered(batch_id)
    return result


def _settled(batch: dict[str, Any]) -> bool:
    return batch["status"] != "expired" or bool(batch["output_file_id"] or batch["error_file_id"])


def check(result: Round, batch: dict[str, Any], api: Api, tag: str) -> None:
    result.status = batch["status"]
    output = api.lines(batch.get("output_file_id"))
    errors = api.lines(batch.get("error_file_id"))
    ids = [line["custom_id"] for line in output + errors]
    wanted = {f"{tag}-{i}" for i in range(result.lines)}
    result.output, result.errors = len(output), len(errors)
    result.duplicated = len(ids) - len(set(ids))
    result.missing = len(wanted - set(ids))
    counts = batch["request_counts"]
    result.counts_exact = (counts["total"], counts["completed"], counts["failed"]) == (
        result.lines, len(output), len(errors))
    prompt = sum(int(((x.get("response") or {}).get("body") or {}).get("usage", {})
                     .get("prompt_tokens", 0)) for x in output)
    completion = sum(int(((x.get("response") or {}).get("body") or {}).get("usage", {})
                         .get("completion_tokens", 0)) for x in output)
    usage = batch["usage"]
    result.usage_exact = (usage["input_tokens"], usage["output_tokens"]) == (prompt, completion)
    if errors:
        result.note = ",".join(sorted({str((e.get("error") or {}).get("code") or
                                           (e.get("response") or {}).get("status_code"))
                                       for e in errors}))


# --- the command --------------------------------------------------------------------------
@contextmanager
def deployment(data_dir: Path, engine: str, env: dict[str, str], *, hosts: bool = False,
               small_store: bool = False) -> Iterator[Up]:
    """`millrace up` in `data_dir`; with `hosts`, spread over hosts with two of every
    service (ops/network.py); with `small_store`, its file store on a small file
    system of its own (a tmpfs in a mount namespace of the deployment's)."""
    with ExitStack() as stack:
        up = Up(data_dir, free_port(), engine, env)
        if hosts:
            network = stack.enter_context(spread_over_hosts(data_dir / "hosts"))
            up.env = {**network.env, **env}
            up.wrap, up.host, up.spread = network.wrap, network.host, network
        if small_store:
            up.small = data_dir / "small"
            up.small.mkdir(parents=True, exist_ok=True)
            up.env["MILLRACE_FILE_STORE_URL"] = str(up.small / "store")
            up.wrap = [*up.wrap, "unshare", "-m", "--propagation", "private", "sh", "-c",
                       f'mount -t tmpfs -o size={SMALL_STORE_MB}m tmpfs "{up.small}" '
                       '&& exec "$@"', "sh"]
        up.start()
        try:
            yield up
        finally:
            if up.proc is not None and up.proc.poll() is None:
                up.stop()


@contextmanager
def spread_over_hosts(data_dir: Path) -> Iterator[Spread]:
    data_dir.mkdir(parents=True, exist_ok=True)
    hosts = Hosts()
    try:
        network = Spread(hosts, data_dir, {"gateway": 2, "worker": 2, "aggregator": 2,
                                           "sink": 2})
        try:
            network.start()
            yield network
        finally:
            network.stop()
    finally:
        hosts.close()


def table(rounds: list[Round]) -> str:
    head = ("round", "fault", "at s", "status", "out", "err", "dup", "missing", "counts",
            "usage", "hooks", "recover s", "final s")
    rows = [head] + [(str(r.number), r.fault, f"{r.fault_at_s:.2f}", r.status, str(r.output),
                      str(r.errors), str(r.duplicated), str(r.missing),
                      "exact" if r.counts_exact else "WRONG",
                      "exact" if r.usage_exact else "WRONG", str(r.webhooks),
                      f"{r.recovered_s:.1f}", f"{r.finished_s:.1f}") for r in rounds]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    ok = sum(r.ok for r in rounds)
    lines.append(f"\n{ok}/{len(rounds)} rounds: final, every line exactly once, counts and "
                 "usage exact, webhook delivered")
    return "\n".join(lines)


def chaos(data_dir: Path, rounds: int, *, engine: str = "echo", lines: int = 5000,
          seed: int | None = None, faults: tuple[str, ...] = FAULTS,
          env: dict[str, str] | None = None,
          say: Callable[[str], None] = lambda _: None) -> list[Round]:
    rng = random.Random(seed)
    results: list[Round] = []
    receiver: Receiver | None = None
    try:
        with deployment(data_dir, engine, env or {}, hosts=any(f in PARTITIONS for f in faults),
                        small_store="disk-full" in faults) as up:
            receiver = Receiver(up.spread.hosts.here("front") if up.spread else "127.0.0.1")
            # one batch without a fault: how long a batch takes, where faults may land
            start = time.monotonic()
            api = Api(up)
            first = api.create(lines, "warmup", receiver.url)
            api.until(lambda: (b := api.batch(first)) is not None and b["status"] in TERMINAL,
                      600)
            span = max(time.monotonic() - start, 0.5)
            say(f"a {lines}-line batch takes {span:.1f}s here; faults land within it")
            deck: list[str] = []
            for number in range(1, rounds + 1):
                if not deck:  # every fault once per len(faults) rounds, in random order
                    deck = rng.sample(faults, len(faults))
                fault = deck.pop()
                result = run_round(up, receiver, number, fault, lines, rng.uniform(0, span))
                results.append(result)
                say(table([result]).splitlines()[2])
    finally:
        if receiver is not None:
            receiver.close()
    return results
