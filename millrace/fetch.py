"""What millrace fetches itself, through the one outbound guard (`millrace/outbound.py`):

- an input file named by URL (PLai's `input_file_url`, and `/v1/batches`' extension of the
  same name), streamed into the file store up to the batch size limit;
- a PromptLoop `link` input: the page, up to `link_max_bytes`, as readable text (HTML through
  BeautifulSoup, scripts and styles dropped), cut to `link_max_chars` characters.

A fetch that fails raises FetchFailed with what happened (the HTTP status, too large, not
allowed, timed out), which becomes the batch's or the row's `fetch_failed` error.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
from typing import IO

import httpx
from bs4 import BeautifulSoup

from millrace.filestore import FileStore, TooLarge
from millrace.outbound import Guard, UnsafeTarget
from millrace.settings import Settings
from millrace.webhooks import webhook_guard

TEXT_TYPES = ("text/plain", "text/markdown", "text/csv", "application/json")


class FetchFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Fetcher:
    def __init__(self, settings: Settings, guard: Guard | None = None) -> None:
        self.settings = settings
        self.guard = guard or webhook_guard(settings)
        self.client = httpx.AsyncClient(timeout=settings.fetch_timeout_s,
                                        follow_redirects=False)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _stream(self, url: str, out: IO[bytes], most: int) -> str:
        """The body of `url` into `out` (at most `most` bytes); returns its content type."""
        try:
            response = await self.guard.get(self.client, url, "url", "fetch_failed")
        except UnsafeTarget as exc:
            raise FetchFailed(f"not allowed: {exc.message}") from exc
        except httpx.HTTPError as exc:
            raise FetchFailed(f"{type(exc).__name__}: {exc}" if str(exc)
                              else type(exc).__name__) from exc
        try:
            if response.status_code != 200:
                raise FetchFailed(f"HTTP {response.status_code}")
            seen = 0
            async for chunk in response.aiter_bytes():
                seen += len(chunk)
                if seen > most:
                    raise FetchFailed(f"larger than {most} bytes")
                out.write(chunk)
            kind: str = response.headers.get("content-type", "")
            return kind.split(";")[0].strip().lower()
        except httpx.HTTPError as exc:
            raise FetchFailed(f"{type(exc).__name__}: {exc}" if str(exc)
                              else type(exc).__name__) from exc
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
                raise FetchFailed(f"larger than {most} bytes") from exc
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
            raise FetchFailed(f"unsupported content type '{kind}'")
        return text[: self.settings.link_max_chars]
