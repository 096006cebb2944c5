"""A deployment spread over hosts on one machine, for the faults of a real network.

Each host is a network namespace joined by veth pairs to up to three networks, each a bridge
in the machine's own namespace (which is on all three: it is where an operator, a client
and a webhook receiver sit):

- `front`: clients → the gateways, the sinks → webhook receivers;
- `kafka`: every service → the broker (through the `proxy` host, which can add latency and
  loss: this kernel has no netem);
- `redis`: every service → Redis.

The broker and Redis each run on their own host; `millrace up` runs on the gateway host and
starts every other instance on its own host (`MILLRACE_NETNS`). Cutting a host off one
network (`cut`) sets its veth down on the bridge side: its packets go nowhere, with no reset
to tell the process, as when a cable or a switch port fails; `heal` sets it up again.

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and `ip`. Names start with `mr<tag>`; `close`
removes everything it made.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from millrace.errors import ComponentError
from ops.embedded import broker_argv, redis_argv, redis_binary, spawn, tansu_binary

NETS = ("front", "kafka", "redis")
BROKER_PORT = 9092
REDIS_PORT = 6379


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Host:
    name: str
    netns: str
    addresses: dict[str, str]  # network → this host's address on it
    links: dict[str, str]  # network → the bridge side of this host's veth

    @property
    def run(self) -> list[str]:
        """The prefix that runs a command on this host."""
        return ["ip", "netns", "exec", self.netns]


@dataclass
class Hosts:
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    hosts: dict[str, Host] = field(default_factory=dict)
    subnet: int = field(default_factory=lambda: random.randrange(256))

    def __post_init__(self) -> None:
        if os.geteuid() != 0:
            raise ComponentError("hosts in network namespaces need root (ip netns, veth)")
        for i, net in enumerate(NETS):
            bridge = self.bridge(net)
            _ip("link", "add", bridge, "type", "bridge")
            _ip("addr", "add", f"{self._address(i, 1)}/24", "dev", bridge)
            _ip("link", "set", bridge, "up")

    def bridge(self, net: str) -> str:
        return f"mr{self.tag}-{net}"

    def _address(self, net_index: int, host: int) -> str:
        return f"10.{200 + net_index}.{self.subnet}.{host}"

    def here(self, net: str) -> str:
        """This machine's own address on `net` (clients, receivers)."""
        return self._address(NETS.index(net), 1)

    def add(self, name: str, nets: tuple[str, ...]) -> Host:
        number = len(self.hosts) + 2
        netns = f"mr{self.tag}-{name}"
        _ip("netns", "add", netns)
        _ip("-n", netns, "link", "set", "lo", "up")
        host = Host(name, netns, {}, {})
        for net in nets:
            i = NETS.index(net)
            outer = f"mr{self.tag}{number}{net[0]}"
            _ip("link", "add", outer, "type", "veth", "peer", "name", net, "netns", netns)
            _ip("link", "set", outer, "master", self.bridge(net), "up")
            host.addresses[net] = self._address(i, number)
            _ip("-n", netns, "addr", "add", f"{host.addresses[net]}/24", "dev", net)
            _ip("-n", netns, "link", "set", net, "up")
            host.links[net] = outer
        self.hosts[name] = host
        return host

    def cut(self, name: str, net: str) -> None:
        _ip("link", "set", self.hosts[name].links[net], "down")

    def heal(self, name: str, net: str) -> None:
        _ip("link", "set", self.hosts[name].links[net], "up")

    def close(self) -> None:
        for host in self.hosts.values():
            pids = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True,
                                  text=True, check=False).stdout.split()
            for pid in pids:
                with suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            with suppress(subprocess.CalledProcessError):
                _ip("netns", "del", host.netns)
        for net in NETS:
            with suppress(subprocess.CalledProcessError):
                _ip("link", "del", self.bridge(net))


# --- latency and loss: a TCP proxy ------------------------------------------------------
@dataclass
class Impairment:
    """What the proxy does to each chunk a client sends the broker (as netem on each host's
    way out would): hold it `delay_ms`; a `loss` share of chunks is held a retransmission
    timeout longer, which is what a lost segment costs a TCP stream (the bytes still
    arrive, in order)."""

    delay_ms: float = 0.0
    loss: float = 0.0
    rto_ms: float = 600.0


def set_impairment(control: Path, impairment: Impairment) -> None:
    tmp = control.with_suffix(".tmp")
    tmp.write_text(json.dumps(impairment.__dict__))
    tmp.replace(control)


class Proxy:
    """Forwards each connection to `target`; what clients send goes through `Impairment`,
    read from the `control` file whenever it changes."""

    def __init__(self, target: tuple[str, int], control: Path) -> None:
        self.target = target
        self.control = control
        self.current = Impairment()
        self.seen = 0.0
        self.held = 0  # chunks held `delay_ms`
        self.lost = 0  # of those, held a retransmission timeout longer

    def impairment(self) -> Impairment:
        with suppress(OSError, ValueError, TypeError):
            mtime = self.control.stat().st_mtime
            if mtime != self.seen:
                self.seen = mtime
                self.current = Impairment(**json.loads(self.control.read_text()))
        return self.current

    def due(self, impaired: bool) -> float:
        due = time.monotonic()
        if impaired:
            now = self.impairment()
            due += now.delay_ms / 1000
            self.held += now.delay_ms > 0
            if random.random() < now.loss:
                due += now.rto_ms / 1000
                self.lost += 1
        return due

    async def report(self) -> None:
        """What it did so far, every second, beside the control file (`Spread.impaired`)."""
        while True:
            await asyncio.sleep(1.0)
            stats = self.control.with_suffix(".stats")
            with suppress(OSError):
                stats.with_suffix(".tmp").write_text(
                    json.dumps({"held": self.held, "lost": self.lost}))
                stats.with_suffix(".tmp").replace(stats)

    async def pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   impaired: bool) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(_send(queue, writer))
        last = 0.0
        try:
            while chunk := await reader.read(65536):
                last = max(last, self.due(impaired))  # in order, as TCP delivers
                queue.put_nowait((last, chunk))
            queue.put_nowait((0.0, b""))
            await sender
        except OSError:
            pass
        finally:
            sender.cancel()
            writer.close()

    async def serve(self, client_r: asyncio.StreamReader,
                    client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self.pipe(client_r, server_w, True),
                             self.pipe(server_r, client_w, False))


async def _send(queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
    while True:
        due, chunk = await queue.get()
        if not chunk:
            return
        await asyncio.sleep(max(due - time.monotonic(), 0))
        writer.write(chunk)
        await writer.drain()


async def _serve_proxy(listen: tuple[str, int], proxy: Proxy) -> None:
    server = await asyncio.start_server(proxy.serve, *listen)
    reporting = asyncio.create_task(proxy.report())
    async with server:
        await server.serve_forever()
    reporting.cancel()


def proxy_main(argv: list[str]) -> None:
    listen_host, listen_port, target_host, target_port, control = argv
    proxy = Proxy((target_host, int(target_port)), Path(control))
    asyncio.run(_serve_proxy((listen_host, int(listen_port)), proxy))


# --- a deployment on hosts -----------------------------------------------------------------
SERVICE_NETS = {"gateway": ("front", "kafka", "redis"), "worker": ("kafka", "redis"),
                "aggregator": ("kafka", "redis"), "sink": ("front", "kafka", "redis")}


@dataclass
class Spread:
    """The broker (behind its proxy) and Redis each on a host of their own, `millrace up`
    and its gateways on the `gateway` host, and every other instance it starts on its own
    host: what `Up` is started with (`env`, `wrap`, `host`)."""

    hosts: Hosts
    data_dir: Path
    replicas: dict[str, int]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    redis_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))

    @property
    def control(self) -> Path:
        return self.data_dir / "proxy.json"

    def start(self) -> None:
        logs = self.data_dir / "logs"
        broker, proxy, redis_host = (self.hosts.add(name, (net,)) for name, net in (
            ("broker", "kafka"), ("proxy", "kafka"), ("redis", "redis")))
        broker_at, proxy_at = broker.addresses["kafka"], proxy.addresses["kafka"]
        redis_at = redis_host.addresses["redis"]
        set_impairment(self.control, Impairment())
        self._spawn(broker, [str(tansu_binary()), *broker_argv(
            BROKER_PORT, host=broker_at, advertised=f"tcp://{proxy_at}:{BROKER_PORT}")[1:]],
            logs / "broker.log")
        self._spawn(proxy, [sys.executable, "-m", "ops.network", proxy_at,
                            str(BROKER_PORT), broker_at, str(BROKER_PORT), str(self.control)],
                    logs / "proxy.log")
        self._spawn(redis_host, [str(redis_binary()), *redis_argv(
            REDIS_PORT, self.data_dir / "redis", host=redis_at,
            password=self.redis_password)[1:]], logs / "redis.log")
        wait_for(redis_at, REDIS_PORT)
        wait_for(proxy_at, BROKER_PORT)
        placed = []
        for service, count in self.replicas.items():
            for i in range(count):
                name = service if i == 0 else f"{service}-{i + 1}"
                if service != "gateway":  # `up` itself runs on the gateway host
                    placed.append(f"{name}={self.hosts.add(name, SERVICE_NETS[service]).netns}")
        self.hosts.add("gateway", SERVICE_NETS["gateway"])
        self.env = {
            "MILLRACE_KAFKA__BOOTSTRAP": f"{proxy_at}:{BROKER_PORT}",
            "MILLRACE_REDIS_URL": f"redis://:{self.redis_password}@{redis_at}:{REDIS_PORT}/0",
            "MILLRACE_REPLICAS": ",".join(f"{s}={n}" for s, n in self.replicas.items()),
            "MILLRACE_NETNS": ",".join(placed),
            "MILLRACE_HOST": self.host,
            "MILLRACE_WEBHOOK_ALLOW": "private",  # receivers on the front network
        }

    @property
    def host(self) -> str:
        """Where the API answers."""
        return self.hosts.hosts["gateway"].addresses["front"]

    @property
    def wrap(self) -> list[str]:
        return self.hosts.hosts["gateway"].run

    def _spawn(self, host: Host, argv: list[str], log: Path) -> None:
        self.procs.append(spawn(Path(shutil.which("ip") or "/usr/sbin/ip"), [*host.run, *argv],
                                log))

    def impair(self, impairment: Impairment) -> None:
        set_impairment(self.control, impairment)

    def impaired(self) -> dict[str, int]:
        """Chunks the proxy has held so far, and of those `lost` (held longer)."""
        try:
            return dict(json.loads(self.control.with_suffix(".stats").read_text()))
        except (OSError, ValueError):
            return {"held": 0, "lost": 0}

    def stop(self) -> None:
        for proc in self.procs:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_for(host: str, port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


if __name__ == "__main__":
    proxy_main(sys.argv[1:])
