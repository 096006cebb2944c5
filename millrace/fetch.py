"""What millrace fetches itself, through the one outbound guard (`millrace/outbound.py`):

- an input file named by URL (PLai's `input_file_url`, and `/v1/batches`' extension of the
  same name), streamed into the file store up to the batch size limit;
- a PromptLoop `link` input: the page, up to `link_max_bytes`, as readable text (HTML through
  BeautifulSoup, scripts and styles dropped), cut to `link_max_chars` characters.

Every fetch has one deadline for all of it (`fetch_timeout_s`: resolving, connecting, the
headers and the whole body) and a byte cap, so a server that drips a byte at a time holds
it no longer than the deadline.

A fetch that fails raises FetchFailed with a reason **class** the caller shows as "could
not fetch (<class>)": `address not allowed` (a refused URL or one that does not resolve),
`timed out`, `too large`, `unsupported content type`, `HTTP <status>` (the server's own
answer) and `no usable answer` for everything else — a closed port, a reset and a service
that does not speak HTTP read the same. Internal addresses are refused unless the
deployment allows their class, so by default every internal target reads `address not
allowed`. The detail goes to the log.
"""

from __future__ import annotations

import asyncio
import io
import logging
import tempfile
from typing import IO

import httpx
from bs4 import BeautifulSoup

from millrace.filestore import FileStore, TooLarge
from millrace.outbound import (
    NO_ANSWER,
    NOT_ALLOWED,
    TIMED_OUT,
    TOO_LARGE,
    Guard,
    UnsafeTarget,
)
from millrace.settings import Settings
from millrace.webhooks import webhook_guard

log = logging.getLogger(__name__)

TEXT_TYPES = ("text/plain", "text/markdown", "text/csv", "application/json")


class FetchFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def text(self) -> str:
        return f"could not fetch ({self.reason})"


class Fetcher:
    def __init__(self, settings: Settings, guard: Guard | None = None) -> None:
        self.settings = settings
        self.guard = guard or webhook_guard(settings)
        self.client = httpx.AsyncClient(timeout=settings.fetch_timeout_s,
                                        follow_redirects=False, trust_env=False)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _stream(self, url: str, out: IO[bytes], most: int) -> str:
        """The body of `url` into `out` (at most `most` bytes) within the deadline; returns
        its content type."""
        try:
            async with asyncio.timeout(self.settings.fetch_timeout_s):
                return await self._read(url, out, most)
        except TimeoutError as exc:
            log.info("fetch of %s: no complete answer within %s s", url[:200],
                     self.settings.fetch_timeout_s)
            raise FetchFailed(TIMED_OUT) from exc

    async def _read(self, url: str, out: IO[bytes], most: int) -> str:
        try:
            response = await self.guard.get(self.client, url, "url", "fetch_failed")
        except UnsafeTarget as exc:
            log.info("fetch of %s refused: %s", url[:200], exc.message)
            raise FetchFailed(NOT_ALLOWED) from exc
        except httpx.HTTPError as exc:
            log.info("fetch of %s failed: %s: %s", url[:200], type(exc).__name__, exc)
            raise FetchFailed(NO_ANSWER) from exc
        try:
            if response.status_code != 200:
                log.info("fetch of %s: HTTP %d", url[:200], response.status_code)
                raise FetchFailed(f"HTTP {response.status_code}")
            seen = 0
            async for chunk in response.aiter_bytes():
                seen += len(chunk)
                if seen > most:
                    log.info("fetch of %s: larger than %d bytes", url[:200], most)
                    raise FetchFailed(TOO_LARGE)
                out.write(chunk)
            kind: str = response.headers.get("content-type", "")
            return kind.split(";")[0].strip().lower()
        except httpx.HTTPError as exc:
            log.info("fetch of %s failed: %s: %s", url[:200], type(exc).__name__, exc)
            raise FetchFailed(NO_ANSWER) from exc
        finally:
            await response.aclose()

    async def to_store(self, url: str, files: FileStore, key: str, most: int) -> int:
        """Fetch `url` into the file store at `key`; its size."""
        with tempfile.TemporaryFile() as spool:
            await self._stream(url, spool, most)
            spool.seek(0)
            try:
                size, _ = await asyncio.to_thread(files.write_from, key, spool, most)
            except TooLarge as exc:
                raise FetchFailed(TOO_LARGE) from exc
        return size

    async def text(self, url: str) -> str:
        """The readable text of a page (or a plain-text document)."""
        page = io.BytesIO()  # at most link_max_bytes
        kind = await self._stream(url, page, self.settings.link_max_bytes)
        raw = page.getvalue()
        if kind in ("text/html", "application/xhtml+xml", ""):
            soup = BeautifulSoup(raw, "html.parser")
            for tag in soup(["script", "style", "noscript", "template"]):
                tag.decompose()
            text = " ".join(soup.get_text(" ").split())
        elif kind.startswith("text/") or kind in TEXT_TYPES:
            text = raw.decode("utf-8", "replace").strip()
        else:
            raise FetchFailed(f"unsupported content type {kind[:60]!r}")
        return text[: self.settings.link_max_chars]
