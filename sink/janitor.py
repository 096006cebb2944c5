"""Removing what no one can read any more, so a long-running deployment's disk stays bounded:
files past their `expires_at` (input files with `expires_after`, output files with
`output_expires_after`), and this sink's markers of batches written long ago."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from millrace.filestore import FileStore
from millrace.registry import Registry
from millrace.storage.store import Store
from sink.assembler import Assembler

log = logging.getLogger(__name__)

WRITTEN_KEEP_S = 24 * 3600.0  # a written batch's marker ignores late lines this long


class Janitor:
    def __init__(self, store: Store, registry: Registry, files: FileStore,
                 assembler: Assembler, every_s: float = 60.0) -> None:
        self.every_s = every_s  # how often it runs (`janitor_every_s`)
        self.store = store
        self.registry = registry
        self.files = files
        self.assembler = assembler

    async def clean_up(self, now: float) -> int:
        """Delete the files expired at `now` (one sink at a time: a lease) and drop old
        markers; returns how many files went."""
        await asyncio.to_thread(self.assembler.forget_written, WRITTEN_KEEP_S)
        if not await self.store.take_lease(self.store.keys.janitor, self.every_s * 0.9):
            return 0
        expired = await self.store.expired_files(now)
        for found in expired:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(self.files.delete, found.path)
            await self.registry.delete_file(found.obj.id, found.project)
        if expired:
            log.info("deleted %d expired files", len(expired))
        return len(expired)
