"""A real `millrace up` deployment driven from tests: broker, Redis, services, engine."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from openai import OpenAI

from millrace.kafka import KafkaConfig, ensure_topics
from millrace.settings import KafkaSettings, Settings
from millrace.topics import Topics
from ops.chaos import reap
from ops.embedded import die_with_parent, free_port

T = TypeVar("T")

if TYPE_CHECKING:
    from millrace.storage.store import Store

# the `on_store` fixture: runs an async scenario on a Store of a fresh Redis namespace
OnStore = Callable[[Callable[["Store"], Awaitable[T]]], T]


def wait_until(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.05) -> T:
    """Return check()'s first truthy value; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


@dataclass
class Deployment:
    proc: subprocess.Popen[str]
    data_dir: Path
    api_key: str
    endpoints: dict[str, object]
    stderr_lines: list[str] = field(default_factory=list)
    pumps: list[threading.Thread] = field(default_factory=list)
    ready_line: str = ""
    clients: list[OpenAI] = field(default_factory=list)  # closed by `stop`

    @property
    def base_url(self) -> str:
        return str(self.endpoints["base_url"])

    def sdk(self, key: str | None = None) -> OpenAI:
        """The unmodified OpenAI SDK on this deployment (its admin key unless `key`), no
        retries; closed when the deployment stops."""
        client = OpenAI(base_url=self.base_url, api_key=key or self.api_key, max_retries=0)
        self.clients.append(client)
        return client

    def ready_info(self, service: str) -> dict[str, object] | None:
        try:
            return json.loads((self.data_dir / "run" / f"{service}.ready").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def child_pids(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True, check=False).stdout
        return [int(p) for p in out.split()]

    def log(self, service: str) -> Path:
        return self.data_dir / "logs" / f"{service}.log"

    @contextmanager
    def frozen(self, service: str) -> Iterator[None]:
        """`service` and every process it started (vLLM's engine core) stopped with SIGSTOP
        until the block ends: nothing it would do happens meanwhile, whatever the
        machine's speed; then SIGCONT, and it carries on (a freeze past its session makes
        its group rebalance, as after any pause)."""
        info = self.ready_info(service)
        assert info is not None, f"{service} is not ready"
        pids = [int(str(info["pid"])), *descendants(int(str(info["pid"])))]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """SIGTERM to the launcher, or SIGINT to its process group as Ctrl-C does."""
        for client in self.clients:
            client.close()
        if sig == signal.SIGINT:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        return reap(self.proc, self.pumps, timeout)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True,
                         check=True).stdout
    children: dict[int, list[int]] = {}
    for row in out.splitlines():
        child, parent = map(int, row.split())
        children.setdefault(parent, []).append(child)
    found, frontier = [], [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child)
    return found


@contextmanager
def extra_worker(deployment: Deployment, model: str, env: dict[str, str]
                 ) -> Iterator[tuple[subprocess.Popen[str], threading.Event, list[str]]]:
    """One more `millrace worker` serving `model`, joining the deployment's group: the
    process, an event set once the group gave it partitions of a requests topic, and its
    log lines so far."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops", "worker", "--data-dir", str(deployment.data_dir),
         "--model", model],
        env={**os.environ,
             "MILLRACE_KAFKA__BOOTSTRAP": str(deployment.endpoints["kafka_bootstrap"]),
             "MILLRACE_REDIS_URL": str(deployment.endpoints["redis_url"]),
             "MILLRACE_WORKER_NAME": "worker-extra", "MILLRACE_LOG_LEVEL": "INFO", **env},
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        preexec_fn=die_with_parent)
    assigned = threading.Event()
    log: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            if re.search(r" assigned .*requests", line):
                assigned.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        yield proc, assigned, log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)
        reader.join(10)
        assert proc.stderr is not None
        proc.stderr.close()


def start(data_dir: Path, *, engine: str = "vllm", timeout: float = 600,
          extra_env: dict[str, str] | None = None) -> Deployment:
    """Run `millrace up` and return once it printed its ready line."""
    port = free_port()
    env = {**os.environ, "MILLRACE_LOG_LEVEL": "INFO", **(extra_env or {})}
    env.pop("MILLRACE_KAFKA__BOOTSTRAP", None)
    env.pop("MILLRACE_REDIS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops", "up", "--port", str(port),
         "--data-dir", str(data_dir), "--engine", engine],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=die_with_parent,  # a crashed test run leaves no deployment behind
        start_new_session=True,  # its own process group, like a terminal running `make up`
    )
    lines: queue.Queue[str | None] = queue.Queue()
    stderr_lines: list[str] = []

    def pump_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def pump_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr_lines.append(line)

    pumps = [threading.Thread(target=pump_stdout, daemon=True),
             threading.Thread(target=pump_stderr, daemon=True)]
    for pump in pumps:
        pump.start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        raise AssertionError(
            "millrace up printed no ready line:\n" + "".join(stderr_lines)
        ) from None
    if line is None or not line.startswith("millrace ready: "):
        proc.kill()
        raise AssertionError(f"unexpected first line {line!r}:\n" + "".join(stderr_lines))
    base_url, key_part = line.split()[2:4]
    api_key = key_part.removeprefix("api_key=")
    endpoints = json.loads((data_dir / "endpoints.json").read_text())
    assert endpoints["base_url"] == base_url
    return Deployment(proc, data_dir, api_key, endpoints, stderr_lines, pumps, line)


def own_topics(deployment: Deployment, tmp_path: Path, prefix: str = "agg"
               ) -> tuple[Settings, Topics, KafkaConfig]:
    """Settings of a test's own topic prefix (its own topics and Redis keys) on the
    session's broker and Redis, with its topics made."""
    settings = Settings(
        topic_prefix=f"{prefix}{uuid.uuid4().hex[:8]}", data_dir=tmp_path,
        redis_url=str(deployment.endpoints["redis_url"]),
        kafka=KafkaSettings(bootstrap=str(deployment.endpoints["kafka_bootstrap"])))
    topics = Topics.from_settings(settings)
    kafka = KafkaConfig.of(settings, "test")
    ensure_topics(kafka, topics.layout(settings), configs=topics.configs())
    return settings, topics, kafka
