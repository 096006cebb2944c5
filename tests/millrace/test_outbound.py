"""The outbound guard (SSRF): hostile URLs of every form are refused before anything is sent,
a name is resolved once and the connection goes to the address that was checked.

No test here sends a packet to a non-loopback address: names resolve through an injected
resolver, refused targets are refused before connecting, and the one request goes to a
server on 127.0.0.1."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import httpx
import pytest

from millrace.outbound import Guard, UnsafeTarget, address_class
from millrace.settings import Settings
from millrace.webhooks import check_target, webhook_guard


def resolving(*answers: list[str]) -> tuple[list[str], object]:
    """A resolver that gives each answer in turn (and records the names asked)."""
    asked: list[str] = []
    queue = list(answers)

    async def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return asked, resolver


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("0.0.0.0", "loopback"), ("::", "loopback"),
    ("10.1.2.3", "private"), ("192.168.0.5", "private"), ("172.16.9.9", "private"),
    ("fd00::1", "private"), ("100.64.0.1", "private"), ("192.0.2.1", "private"),
    ("224.0.0.1", "private"), ("255.255.255.255", "private"), ("ff02::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    # IPv6 forms that carry an IPv4 address are as internal as it
    ("::ffff:10.0.0.1", "private"), ("::ffff:127.0.0.1", "loopback"),
    ("::10.0.0.1", "private"),  # IPv4-compatible (deprecated)
    ("2002:a00:1::", "private"),  # 6to4 for 10.0.0.1 (`ipaddress` calls it global)
    ("2002:7f00:1::1", "loopback"),  # 6to4 for 127.0.0.1
    ("2002:a9fe:a9fe::", "link-local"),  # 6to4 for 169.254.169.254
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "private"),  # Teredo
    ("64:ff9b::a00:1", "private"),  # NAT64 for 10.0.0.1
    ("64:ff9b::7f00:1", "loopback"),  # NAT64 for 127.0.0.1
    ("64:ff9b:1::a9fe:a9fe", "link-local"),  # local-use NAT64 for 169.254.169.254
    ("8.8.8.8", None), ("2606:4700::1111", None), ("2002:808:808::", None),
    ("64:ff9b::808:808", None),  # NAT64 for a public address
])
def test_addresses_are_classified_after_unwrapping_ipv4(address: str, kind: str | None) -> None:
    assert address_class(address) == kind


HOSTILE = [
    "http://10.0.0.7/hook", "http://169.254.169.254/latest/meta-data",
    "http://[fd00::1]/x", "http://[::ffff:192.168.1.1]/x", "http://[2002:a00:1::]/",
    "http://[2002:a9fe:a9fe::]/latest/meta-data", "http://[64:ff9b::a00:1]/",
    "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "http://[::10.0.0.1]/",
    "http://0.0.0.0:8000/", "http://[::]/", "http://224.0.0.1/",
    "http://[fe80::1%25eth0]/",
]


@pytest.mark.parametrize("url", HOSTILE)
async def test_internal_targets_are_refused_before_anything_is_sent(url: str) -> None:
    asked, resolver = resolving(["127.0.0.1"])
    guard = Guard(allow=set(), resolver=resolver)  # type: ignore[arg-type]
    with pytest.raises(UnsafeTarget) as refused:
        await guard.check(url)
    assert refused.value.code == "invalid_webhook_url" and refused.value.status_code == 400
    assert asked == []  # an address literal is never resolved


@pytest.mark.parametrize("answer", [["10.0.0.5"], ["8.8.8.8", "192.168.1.1"],
                                    ["2002:a00:1::"], ["64:ff9b::a9fe:a9fe"]])
async def test_a_name_is_refused_if_any_of_its_addresses_is_internal(answer: list[str]) -> None:
    _, resolver = resolving(answer)
    with pytest.raises(UnsafeTarget, match="address"):
        await Guard(allow=set(), resolver=resolver).check(  # type: ignore[arg-type]
            "https://hooks.example.com/x")


async def test_policy_schemes_credentials_and_malformed_urls() -> None:
    _, resolver = resolving(["8.8.8.8"])
    production = Guard(allow=set(), https_only=True, resolver=resolver)  # type: ignore[arg-type]
    with pytest.raises(UnsafeTarget, match="https"):
        await production.check("http://example.com/hook")
    target = await production.check("https://example.com:8443/h?x=1")
    assert (target.address, target.port, target.path, target.host_header) == (
        "8.8.8.8", 8443, "/h?x=1", "example.com:8443")
    assert target.request_url() == "https://8.8.8.8:8443/h?x=1"
    for url in ("ftp://example.com/x", "example.com/hook", "https://", "file:///etc/passwd",
                "https://user:pw@example.com/x", "http://[::1", "http://h:99999/x",
                "http://h:port/x", "gopher://127.0.0.1/"):
        with pytest.raises(UnsafeTarget):
            await Guard(allow={"loopback"}, resolver=resolver).check(url)  # type: ignore[arg-type]


async def test_the_settings_decide_what_is_allowed() -> None:
    local = Settings(webhook_allow="loopback")  # what `millrace up` runs with
    assert (await check_target("http://127.0.0.1:8080/hook", local)).address == "127.0.0.1"
    assert Settings().webhook_allow == ""  # every other service: nothing internal
    private = await check_target("http://10.0.0.7/hook", Settings(webhook_allow="private"))
    assert private.address == "10.0.0.7"
    # one answer for an internal address and a name that does not resolve: it maps nothing
    texts = set()
    for url in ("http://127.0.0.1/hook", "http://10.1.2.3:6379/", "http://[::1]:9/",
                "http://no-such-host.invalid/hook", f"http://{'a' * 300}.com/hook",
                "http://localhost:8000/openapi.json"):
        with pytest.raises(UnsafeTarget) as refused:
            await check_target(url, Settings())
        texts.add(refused.value.message.replace(str(urlsplit(url).hostname)[:100], "HOST"))
    assert texts == {"webhook_url: address not allowed ('HOST' does not resolve to a public "
                     "address only; a deployment allows internal ones with "
                     "MILLRACE_WEBHOOK_ALLOW)"}


@pytest.fixture
def loopback_server() -> Iterator[tuple[int, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            seen.append({"host": str(self.headers.get("host")), "path": self.path})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1]), seen
    server.shutdown()
    server.server_close()


async def test_rebinding_cannot_move_the_connection(
        loopback_server: tuple[int, list[dict[str, str]]]) -> None:
    """A name that answers an allowed address when checked and a private one after: the
    guard resolves it once and the request goes to the address it checked."""
    port, seen = loopback_server
    asked, resolver = resolving(["127.0.0.1"], ["10.0.0.1"])
    guard = webhook_guard(Settings(webhook_allow="loopback"), resolver)  # type: ignore[arg-type]
    target = await guard.check(f"http://rebind.example:{port}/hook?a=1")
    async with httpx.AsyncClient(timeout=5) as client:
        status = await guard.post(client, target, "{}", {"content-type": "application/json"})
    assert status == 204
    assert asked == ["rebind.example"]  # one resolution, no second one to connect
    assert seen == [{"host": f"rebind.example:{port}", "path": "/hook?a=1"}]
