"""`millrace up`: the embedded deployment — broker, Redis and the four services, each its
own process, supervised (a dead child is restarted and the restart logged) and stopped
cleanly on SIGINT/SIGTERM.

The embedded broker keeps its topics in memory. Whenever it starts — with the deployment,
after it died, or when it is recycled to bound its memory — the topics are created and every
unfinished batch is resumed from the data dir (`millrace/recovery.py`): nothing the services
need survives only in the broker. Redis writes every change to its append-only file before
answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx
from pydantic import SecretStr

from millrace import readiness
from millrace.errors import ComponentError
from millrace.kafka import KafkaConfig, ensure_topics
from millrace.metrics import prepare_gateway_dir
from millrace.registry import register_key
from millrace.settings import Settings, netns_of
from millrace.storage.principals import Principal, new_api_key
from millrace.topics import Topics
from ops import SERVICES, embedded

log = logging.getLogger("millrace.up")

STOP_GRACE_S = 40.0  # a worker finishes its running requests (worker_drain_s) first
CHECK_EVERY_S = 5.0  # broker memory and log sizes
LOG_MAX_BYTES = 64 << 20  # a child's log is rotated (copied to .1, emptied) beyond this
SAY_WAITING_EVERY_S = 3.0
WAITING_FOR = {
    "worker": "loading its models, then joining the workers' group",
    "gateway": "topics, then answering /health",
    "aggregator": "joining its group",
    "sink": "its spool and the broker",
}


@dataclass
class Child:
    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    proc: subprocess.Popen[bytes] | None = None
    starts: list[float] = field(default_factory=list)

    def launch(self) -> None:
        self.proc = self.start()
        self.starts.append(time.monotonic())

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Launcher:
    def __init__(self, settings: Settings) -> None:
        data_dir = settings.data_dir.resolve()
        self.settings = settings.model_copy(update={"data_dir": data_dir})
        self.logs = data_dir / "logs"
        self.children: list[Child] = []
        self.services: list[str] = []
        self._stop = False
        self._broker_port: int | None = None
        self._resume_pending = False
        self._last_check = 0.0
        self.metrics_ports: dict[str, int] = {}  # per service, kept across its restarts
        self.instance_dirs: dict[str, Path] = {}  # `--replicas`: each instance's data dir

    # --- lifecycle ---------------------------------------------------------------------
    def run(self, announce: Callable[[str], None]) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            if not embedded.port_free(self.settings.host, self.settings.port):
                raise ComponentError(
                    f"{self.settings.host}:{self.settings.port} is in use; pass --port"
                )
            self.settings.data_dir.mkdir(parents=True, exist_ok=True)
            self._start_infrastructure()
            api_key = self._bootstrap_key()
            self._webhook_signing_key()
            opened = self._local_targets()
            plan = self._service_plan()
            if unknown := set(netns_of(self.settings.netns or "")) - {p[0] for p in plan}:
                raise ComponentError(f"MILLRACE_NETNS names {', '.join(sorted(unknown))}: "
                                     f"not an instance this deployment starts")
            for name, command, env in plan:
                readiness.clear(self._own(name), name)
                self.services.append(name)
                self._add(Child(name, self._service_starter(name, command, env)))
            self._wait_ready()
            if self._stop:
                return 0
            base_url = f"http://{self.settings.host}:{self.settings.port}/v1"
            self._write_endpoints(base_url)
            announce(f"millrace ready: {base_url} api_key={api_key}{opened}")
            self._supervise()
            return 0
        finally:
            self._shutdown()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        self._stop = True

    def _add(self, child: Child) -> None:
        child.launch()
        self.children.append(child)
        log.info("started %s (pid %s)", child.name, child.proc.pid if child.proc else "?")

    # --- infrastructure ------------------------------------------------------------------
    def _start_infrastructure(self) -> None:
        s = self.settings
        if not s.redis_url:
            redis_port = embedded.free_port()
            redis_dir = s.data_dir / "redis"
            self._add(Child("redis", lambda: embedded.spawn(
                embedded.redis_binary(), embedded.redis_argv(redis_port, redis_dir),
                self.logs / "redis.log")))
            embedded.wait_for_redis(redis_port, 120, lambda: self.children[-1].alive)
            self._mark("redis")
            self.settings = self.settings.model_copy(
                update={"redis_url": f"redis://127.0.0.1:{redis_port}/0"})
        if not s.kafka.bootstrap:
            self._broker_port = embedded.free_port()
            port = self._broker_port
            self._add(Child("broker", lambda: embedded.spawn(
                embedded.tansu_binary(), embedded.broker_argv(port), self.logs / "broker.log")))
            embedded.wait_for_port(port, 30, lambda: self.children[-1].alive)
            self.settings = self.settings.with_kafka(bootstrap=f"127.0.0.1:{port}")
            self._broker_started()
        else:
            self._ensure_topics()

    def _broker_started(self) -> None:
        """A fresh embedded broker holds nothing: topics, then every unfinished batch."""
        self._mark("broker")
        self._ensure_topics()
        self._resume_pending = True
        self._resume()

    def _resume(self) -> None:
        from millrace.recovery import resume

        try:
            resumed = asyncio.run(resume(self.settings))
        except Exception:  # Redis away too: tried again while supervising
            log.exception("resuming the unfinished batches failed; will try again")
            return
        self._resume_pending = False
        if resumed.batches:
            log.info("resumed %d unfinished batches on the new broker (%d re-driven, %d "
                     "filled, %d exploded again)", resumed.batches, resumed.redriven,
                     resumed.filled, resumed.exploded)

    def _ensure_topics(self) -> None:
        kafka = KafkaConfig.of(self.settings, "up")
        topics = Topics.from_settings(self.settings)
        ensure_topics(kafka, topics.layout(self.settings), configs=topics.configs())

    def _mark(self, name: str) -> None:
        """A readiness marker with the pid of a component we started (chaos, tests)."""
        child = next(c for c in self.children if c.name == name)
        if child.proc is not None:
            readiness.mark_ready(self.settings, name, pid=child.proc.pid)

    def _kept_secret(self, name: str, make: Callable[[], str]) -> str:
        """A secret generated once and kept (mode 0600) in the data dir."""
        path = self.settings.data_dir / name
        if path.exists():
            return path.read_text().strip()
        value = make()
        path.touch(mode=0o600)
        path.write_text(value)
        return value

    def _webhook_signing_key(self) -> None:
        if self.settings.webhook_signing_key is None:
            key = self._kept_secret("webhook_signing_key", lambda: secrets.token_urlsafe(32))
            self.settings = self.settings.model_copy(
                update={"webhook_signing_key": SecretStr(key)})

    def _local_targets(self) -> str:
        """The local deployment lets webhooks and fetched URLs reach this machine's loopback
        addresses (a receiver or a file server on localhost), unless MILLRACE_WEBHOOK_ALLOW
        says otherwise; what the ready line says about it."""
        if "webhook_allow" in self.settings.model_fields_set:
            return ""
        self.settings = self.settings.model_copy(update={"webhook_allow": "loopback"})
        return (" (local: webhooks and fetched URLs may reach loopback addresses; "
                "MILLRACE_WEBHOOK_ALLOW= turns that off)")

    def _bootstrap_key(self) -> str:
        """The admin key: MILLRACE_API_KEY, else one generated once and kept in the data dir."""
        if self.settings.api_key is not None:
            key = self.settings.api_key.get_secret_value()
        else:
            key = self._kept_secret("api_key", new_api_key)

        asyncio.run(register_key(self.settings, key, Principal("default", admin=True)))
        return key

    # --- services ----------------------------------------------------------------------
    def _service_plan(self) -> list[tuple[str, str, dict[str, str]]]:
        """(name, command, extra env) of each service process: the workers (on CPU with
        vLLM each gets its own slice of the cores), the gateways, then the others.

        Under `--replicas` every instance gets its own data dir, as on its own host, and
        all share the file store (`file_store_url`, else this data dir's `files`)."""
        counts = self.settings.replica_counts()
        separate = counts is not None
        if counts is None:
            counts = {"worker": max(self.settings.workers, 1), "aggregator": 1, "sink": 1,
                      "gateway": max(self.settings.gateways, 1)}
        cpus = self.settings.cpus() or sorted(os.sched_getaffinity(0))
        workers = counts["worker"]
        split = (workers > 1 and self.settings.engine == "vllm" and not self.settings.cpu_set
                 and len(cpus) >= workers)
        metrics_dir = self.settings.run_dir / "metrics-gateway"
        prepare_gateway_dir(metrics_dir)
        plan = []
        for command in ("worker", "gateway", "aggregator", "sink"):
            for i in range(counts[command]):
                name = command if i == 0 else f"{command}-{i + 1}"
                env = {f"MILLRACE_{command.upper()}_NAME": name}
                if command == "worker" and split:
                    share = cpus[i * len(cpus) // workers:(i + 1) * len(cpus) // workers]
                    env["MILLRACE_CPU_SET"] = ",".join(map(str, share))
                if command == "gateway":  # all on one port; /metrics sums them
                    env["MILLRACE_GATEWAY_METRICS_DIR"] = str(metrics_dir)
                else:
                    self.metrics_ports[name] = embedded.free_port()
                    env["MILLRACE_METRICS_PORT"] = str(self.metrics_ports[name])
                if separate:
                    own = readiness.instance_dir(self.settings.data_dir, name)
                    own.mkdir(parents=True, exist_ok=True)
                    self.instance_dirs[name] = own
                    env["MILLRACE_DATA_DIR"] = str(own)
                    env["MILLRACE_FILE_STORE_URL"] = self.settings.files_url
                plan.append((name, command, env))
        return plan

    def _own(self, name: str) -> Settings:
        """The settings a service instance runs with, as far as its data dir goes."""
        own = self.instance_dirs.get(name)
        return self.settings if own is None else self.settings.model_copy(
            update={"data_dir": own})

    def _service_starter(
        self, name: str, command: str, extra_env: dict[str, str]
    ) -> Callable[[], subprocess.Popen[bytes]]:
        env = {**os.environ, **self.settings.as_env(), **extra_env}
        netns = netns_of(self.settings.netns or "").get(name)
        host = ["ip", "netns", "exec", netns] if netns else []  # `ip` execs: the same pid
        if netns:  # its metrics on its own host's loopback
            env["MILLRACE_HOST"] = "127.0.0.1"
        own = self._own(name)

        def start() -> subprocess.Popen[bytes]:
            readiness.clear(own, name)
            own.data_dir.mkdir(parents=True, exist_ok=True)
            self.logs.mkdir(parents=True, exist_ok=True)
            with (self.logs / f"{name}.log").open("ab") as out:
                return subprocess.Popen(
                    [*host, sys.executable, "-m", SERVICES[command]], env=env, stdout=out,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, preexec_fn=embedded.die_with_parent,
                )

        return start

    def _ready(self, name: str) -> bool:
        if readiness.read(self._own(name), name) is None:
            return False
        if not name.startswith("gateway"):
            return True
        try:  # a gateway marks itself ready when it starts up; then it must answer
            url = f"http://{self.settings.host}:{self.settings.port}/health"
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait_ready(self) -> None:
        started = time.monotonic()
        deadline = started + self.settings.ready_timeout_s
        waiting = set(self.services)
        said = started
        while waiting and not self._stop:
            if time.monotonic() > deadline:
                raise ComponentError(f"not ready after {self.settings.ready_timeout_s}s: "
                                     f"{', '.join(sorted(waiting))} (see {self.logs})")
            self._restart_dead()
            waiting = {name for name in waiting if not self._ready(name)}
            if waiting and time.monotonic() - said >= SAY_WAITING_EVERY_S:
                said = time.monotonic()
                log.info("%.0f s: waiting for %s", said - started,
                         ", ".join(f"{n} ({WAITING_FOR[n.split('-')[0]]})"
                                   for n in sorted(waiting)))
            time.sleep(0.2)
        log.info("every service ready in %.1f s", time.monotonic() - started)

    def _write_endpoints(self, base_url: str) -> None:
        worker = readiness.read(self._own("worker"), "worker") or {}
        endpoints = {
            "base_url": base_url,
            "kafka_bootstrap": self.settings.kafka.bootstrap,
            "redis_url": self.settings.redis_url,
            "topic_prefix": self.settings.topic_prefix,
            "models": worker.get("models", {}),
            "metrics": {
                "gateway": base_url.removesuffix("/v1") + "/metrics",
                **{name: f"http://{self.settings.host}:{port}/metrics"
                   for name, port in self.metrics_ports.items()},
            },
        }
        if self.instance_dirs:
            endpoints["data_dirs"] = {name: str(d) for name, d in self.instance_dirs.items()}
        path = self.settings.data_dir / "endpoints.json"
        path.write_text(json.dumps(endpoints, indent=2) + "\n")

    # --- supervision ---------------------------------------------------------------------
    def _supervise(self) -> None:
        while not self._stop:
            self._restart_dead()
            if self._resume_pending:
                self._resume()
            if time.monotonic() - self._last_check >= CHECK_EVERY_S:
                self._last_check = time.monotonic()
                self._bound_broker_memory()
                self._rotate_logs()
            time.sleep(0.2)

    def _bound_broker_memory(self) -> None:
        """The in-memory broker keeps every record ever produced: past `broker_max_rss_mb`
        it is started afresh while no batch is running (or, at twice that, at once), and
        the unfinished batches are resumed on the new one."""
        limit = self.settings.broker_max_rss_mb
        broker = next((c for c in self.children if c.name == "broker"), None)
        if not limit or broker is None or broker.proc is None or not broker.alive:
            return
        rss = embedded.rss_mb(broker.proc.pid)
        if rss < limit or (rss < 2 * limit and self._batches_running()):
            return
        log.warning("broker holds %.0f MiB (limit %d MiB): starting it afresh", rss, limit)
        broker.proc.kill()
        broker.proc.wait()
        self._restart_dead()

    def _batches_running(self) -> bool:
        from millrace.storage.store import Store

        async def count() -> int:
            store = Store.connect(self.settings.require_redis(), self.settings.topic_prefix)
            try:
                return len(await store.active_batches())
            finally:
                await store.close()

        try:
            return asyncio.run(count()) > 0
        except Exception:
            return True  # cannot tell: do not disturb

    def _rotate_logs(self) -> None:
        """Children append to their logs (O_APPEND): copy a big one aside, then empty it."""
        for path in self.logs.glob("*.log"):
            with contextlib.suppress(OSError):
                if path.stat().st_size > LOG_MAX_BYTES:
                    shutil.copyfile(path, path.with_suffix(".log.1"))
                    os.truncate(path, 0)

    def _restart_dead(self) -> None:
        for child in self.children:
            if child.alive or self._stop:
                continue
            code = child.proc.returncode if child.proc else None
            recent = [t for t in child.starts if time.monotonic() - t < 60]
            if len(recent) >= 5:
                continue  # crash loop: back off until the window slides
            log.warning("%s exited with code %s; restarting", child.name, code)
            _reap_group(child)
            child.launch()
            log.info("restarted %s (pid %s)", child.name, child.proc.pid if child.proc else "?")
            if child.name == "redis":
                port = int(str(self.settings.redis_url).rsplit(":", 1)[1].split("/")[0])
                embedded.wait_for_redis(port, 120)
                self._mark("redis")
            if child.name == "broker" and self._broker_port is not None:
                embedded.wait_for_port(self._broker_port, 30)
                self._broker_started()

    def _shutdown(self) -> None:
        services = [c for c in self.children if c.name in self.services]
        infrastructure = [c for c in self.children if c.name not in self.services]
        for group in (services, list(reversed(infrastructure))):
            for child in group:
                if child.alive and child.proc:
                    child.proc.terminate()
            deadline = time.monotonic() + STOP_GRACE_S
            for child in group:
                if child.proc is None:
                    continue
                try:
                    child.proc.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0fs; killing", child.name, STOP_GRACE_S)
                    child.proc.kill()
                    child.proc.wait()
                _reap_group(child)
        for name in [*self.services, "broker", "redis"]:
            readiness.clear(self._own(name), name)
        log.info("stopped")


def _reap_group(child: Child) -> None:
    """Kill what is left of a dead child's process group (each child leads its own): a
    worker killed with SIGKILL leaves its vLLM engine-core process behind."""
    if child.proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.proc.pid, signal.SIGKILL)


def up(settings: Settings, announce: Callable[[str], None]) -> int:
    return Launcher(settings).run(announce)

