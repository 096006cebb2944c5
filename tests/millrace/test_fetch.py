"""What millrace fetches for a caller (`millrace/fetch.py`), against real local servers: one
deadline for the whole fetch, the byte cap, and failure classes that do not tell the
services behind them apart."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from millrace.fetch import Fetcher, FetchFailed
from millrace.filestore import FileStore
from millrace.settings import Settings
from ops.embedded import free_port
from tests.website import serving

LOCAL = Settings(webhook_allow="loopback", fetch_timeout_s=1.5)


@contextmanager
def raw_server(answer: bytes, *, drip: bool = False) -> Iterator[int]:
    """A TCP server that reads a request and sends `answer` (a byte every 0.2 s with
    `drip`), as a service that is not an HTTP server, or a hostile one, would."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        with listener:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                with conn:
                    try:
                        conn.recv(65536)
                        if not drip:
                            conn.sendall(answer)
                            continue
                        for byte in answer:
                            if stop.wait(0.2):
                                break
                            conn.sendall(bytes([byte]))
                    except OSError:
                        pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)


def reason(url: str, settings: Settings = LOCAL) -> str:
    async def fetch() -> str:
        fetcher = Fetcher(settings)
        try:
            await fetcher.text(url)
        except FetchFailed as exc:
            return exc.text
        finally:
            await fetcher.aclose()
        raise AssertionError(f"{url} was fetched")

    return asyncio.run(fetch())


def test_a_dripping_server_is_cut_at_the_deadline() -> None:
    # headers trickle in, then the body: each read is quick, the whole never ends
    slow = b"HTTP/1.1 200 OK\r\ncontent-length: 400\r\n\r\n" + b"x" * 400
    with raw_server(slow, drip=True) as port:
        started = time.monotonic()
        said = reason(f"http://127.0.0.1:{port}/in.jsonl")
        took = time.monotonic() - started
    assert said == "could not fetch (timed out)"
    assert LOCAL.fetch_timeout_s <= took < LOCAL.fetch_timeout_s + 5


def test_more_bytes_than_the_cap_is_too_large(tmp_path: Path) -> None:
    page = b"x" * 5000

    async def fetch(url: str) -> str:
        fetcher = Fetcher(LOCAL)
        try:
            await fetcher.to_store(url, FileStore(str(tmp_path)), "files/f", most=4096)
        except FetchFailed as exc:
            return exc.text
        finally:
            await fetcher.aclose()
        raise AssertionError("fetched")

    with serving({"/big": page}) as site:
        assert asyncio.run(fetch(f"{site.url}/big")) == "could not fetch (too large)"
    assert not (tmp_path / "files" / "f").exists()  # nothing stored


def test_what_answered_is_not_told_apart() -> None:
    """Allowed loopback (the local `up`): a closed port, a service that is not HTTP and a
    reset read the same; an HTTP server's own status is its answer."""
    with raw_server(b"-ERR unknown command 'GET'\r\n") as redis_like, \
            raw_server(b"") as hangs_up, serving({}) as site:
        said = {reason(f"http://127.0.0.1:{port}/x")
                for port in (free_port(), redis_like, hangs_up)}
        assert said == {"could not fetch (no usable answer)"}
        assert reason(f"{site.url}/missing") == "could not fetch (HTTP 404)"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "10.0.0.1",
                                  "169.254.169.254", "no-such-host.invalid"])
def test_by_default_every_internal_address_is_not_allowed(host: str) -> None:
    assert reason(f"http://{host}:9/x", Settings()) == "could not fetch (address not allowed)"
