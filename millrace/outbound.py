"""The one guard for every URL millrace itself calls or fetches (webhooks today; any later
outbound fetch goes through it too), against server-side request forgery.

- Scheme: http or https only (https only when `webhook_https_only`); no credentials in URLs.
- The host is resolved **once**, through an injectable resolver; every address it resolves
  to is classified — after unwrapping the IPv4 address that IPv6 forms embed (IPv4-mapped
  and -compatible, 6to4, Teredo, NAT64) — and the URL is refused unless every address is
  global unicast, or of a class the deployment allows (`webhook_allow`: `loopback`,
  `private`, `link-local`; the embedded default allows loopback).
- The connection goes to the address that was checked — the request is sent to it, with the
  original `Host` header and TLS server name — so a name that answers differently the second
  time (DNS rebinding) cannot move the connection inside.
- Webhooks: redirects are not followed, the response body is not read. Fetches (`get`):
  each redirect is checked as a new URL, at most `MAX_HOPS`; the caller bounds the bytes.
  Every call has a timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

import httpx

from millrace.errors import InvalidRequestError

log = logging.getLogger(__name__)

# What a failed call says (webhook attempts, fetches: "could not fetch (<class>)"): the
# classes of failure, never which service answered how.
NOT_ALLOWED = "address not allowed"
TIMED_OUT = "timed out"
TOO_LARGE = "too large"
NO_ANSWER = "no usable answer"

ADDRESS_CLASSES = ("loopback", "private", "link-local")
MAX_HOPS = 5
Resolver = Callable[[str, int], Awaitable[list[str]]]

# IPv6 prefixes whose last 32 bits are an IPv4 address (RFC 6052 and RFC 8215 NAT64)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible (::a.b.c.d)


class UnsafeTarget(InvalidRequestError):
    """A URL millrace refuses to call (scheme, credentials, an internal address)."""

    def __init__(self, message: str, param: str = "webhook_url",
                 code: str = "invalid_webhook_url") -> None:
        super().__init__(message, param=param, code=code)


def wrapped_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address only stands for: IPv4-mapped, IPv4-compatible,
    NAT64 (the IPv6 address itself reaches nothing else)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if any(ip in net for net in _NAT64) or (ip in _COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def tunnelled_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses a routable IPv6 address also leads to (6to4 relay, Teredo)."""
    found = [ip.sixtofour] if ip.sixtofour is not None else []
    return found + (list(ip.teredo) if ip.teredo is not None else [])


def _kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if ip.is_loopback or ip.is_unspecified:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_private or ip.is_reserved or ip.is_multicast or not ip.is_global:
        return "private"
    return None


def address_class(address: str) -> str | None:
    """'loopback', 'private' or 'link-local' for an internal address (an IPv6 address is as
    internal as the IPv4 address it embeds); None for a global unicast one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    kinds = [_kind(ip)]
    if isinstance(ip, ipaddress.IPv6Address):
        wrapped = wrapped_ipv4(ip)
        kinds = [_kind(wrapped)] if wrapped else kinds + [_kind(v) for v in tunnelled_ipv4(ip)]
    for kind in ("loopback", "link-local", "private"):  # the most internal wins
        if kind in kinds:
            return kind
    return None


async def resolve(host: str, port: int) -> list[str]:
    """The system resolver: every address of `host`."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class Target:
    """A URL that passed the guard, with the address it will be called at."""

    url: str
    scheme: str
    host: str
    port: int
    address: str
    path: str  # path and query

    def request_url(self) -> str:
        literal = f"[{self.address}]" if ":" in self.address else self.address
        return urlunsplit((self.scheme, f"{literal}:{self.port}", self.path, "", ""))

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


class Guard:
    def __init__(self, *, allow: set[str], https_only: bool = False,
                 resolver: Resolver = resolve) -> None:
        self.allow = allow
        self.https_only = https_only
        self.resolver = resolver

    async def check(self, url: str, param: str = "webhook_url",
                    code: str = "invalid_webhook_url") -> Target:
        """The target of `url`, or UnsafeTarget (nothing is sent anywhere)."""
        parts = self.parse(url, param, code)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        refused = UnsafeTarget(
            f"{param}: address not allowed ('{host[:100]}' does not resolve to a public "
            "address only; a deployment allows internal ones with MILLRACE_WEBHOOK_ALLOW)",
            param, code)
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
            addresses = [host]
        except ValueError:
            try:
                addresses = await self.resolver(host, port)
            except (OSError, UnicodeError) as exc:  # UnicodeError: a label IDNA cannot encode
                log.info("%s refused: cannot resolve %r: %s", param, host[:100], exc)
                raise refused from exc
        if not addresses:
            log.info("%s refused: %r has no address", param, host[:100])
            raise refused
        for address in addresses:
            kind = address_class(address)
            if kind is not None and kind not in self.allow:
                # the same words whether the name exists inside or nowhere: the answer maps
                # nothing; the log tells the operator which
                log.info("%s refused: %s (%s) is a %s address (MILLRACE_WEBHOOK_ALLOW=%s "
                         "allows it)", param, address, host[:100], kind, kind)
                raise refused
        path = urlunsplit(("", "", parts.path or "/", parts.query, ""))
        return Target(url, parts.scheme, host, port, addresses[0], path)

    def parse(self, url: str, param: str, code: str) -> SplitResult:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (raises ValueError for a port out of range or not a number)
        except ValueError as exc:
            raise UnsafeTarget(f"'{url[:200]}' is not a valid URL: {exc}", param, code) from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UnsafeTarget(f"'{url[:200]}' is not an http(s) URL", param, code)
        if self.https_only and parts.scheme != "https":
            raise UnsafeTarget("URLs must use https on this deployment", param, code)
        if parts.username or parts.password:
            raise UnsafeTarget("URLs may not carry credentials", param, code)
        return parts

    async def post(self, client: httpx.AsyncClient, target: Target, content: str,
                   headers: dict[str, str]) -> int:
        """POST to the checked address (Host and TLS name of the original host), without
        following redirects or reading the body; returns the status code."""
        request = client.build_request(
            "POST", target.request_url(), content=content,
            headers={**headers, "host": target.host_header},
            extensions={"sni_hostname": target.host} if target.scheme == "https" else None)
        response = await client.send(request, stream=True, follow_redirects=False)
        await response.aclose()
        return response.status_code

    async def get(self, client: httpx.AsyncClient, url: str, param: str,
                  code: str = "invalid_url") -> httpx.Response:
        """GET `url` at its checked address, following redirects only after checking each
        new URL the same way; the caller reads (and bounds) the streamed body, then closes
        it. A refused hop raises UnsafeTarget."""
        for _ in range(MAX_HOPS + 1):
            target = await self.check(url, param, code)
            request = client.build_request(
                "GET", target.request_url(), headers={"host": target.host_header},
                extensions={"sni_hostname": target.host} if target.scheme == "https" else None)
            response = await client.send(request, stream=True, follow_redirects=False)
            location = response.headers.get("location")
            if not (response.is_redirect and location):
                return response
            await response.aclose()
            url = urljoin(url, location)
        raise UnsafeTarget(f"more than {MAX_HOPS} redirects", param, code)
