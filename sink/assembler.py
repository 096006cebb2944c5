"""Per-batch spool files: append each response line once, seal into the file store.

Each batch spools to `<data_dir>/sink/<batch_id>/{output,errors}.jsonl` on local disk,
appending as responses arrive. The set of custom_ids already written is rebuilt from the
spool after a restart, so a redelivered response is never written twice. A torn last line
(crash mid-write) is cut off on rebuild.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from millrace.filestore import FileStore
from millrace.protocol import FileObject, LineError, LineResponse, OutputLine
from millrace.records import BatchSealRequested, ResponseRecord
from millrace.results import (
    KINDS,
    partial_dir,
    published_lines,
    sealed_file_id,
    sealed_key,
    segment_key,
)

log = logging.getLogger(__name__)

FILL_CHUNK = 10_000  # fill lines written (and held) at a time


def output_line(record: ResponseRecord) -> OutputLine:
    response = None
    if record.status_code is not None and record.body is not None:
        response = LineResponse(
            status_code=record.status_code, request_id=record.request_id or "", body=record.body
        )
    return OutputLine(id=record.id, custom_id=record.custom_id, response=response,
                      error=record.error)


@dataclass
class Spool:
    directory: Path
    custom_ids: set[str] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    seal: BatchSealRequested | None = None
    project: str = ""
    # bytes in each spool file, and how many lines / bytes of it are published as
    # partial-result segments
    sizes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    published: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    published_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    published_at: float = 0.0

    @property
    def sealed(self) -> bool:
        return (self.directory / "sealed").exists()

    def path(self, kind: str) -> Path:
        return self.directory / f"{kind}.jsonl"

    def rebuild(self, published: dict[str, int] | None = None) -> None:
        """Reload the index from the spool files; `published` = lines of each kind already
        in partial-result segments (read back from the file store)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        request = self.directory / "seal.json"
        if request.exists():
            self.seal = BatchSealRequested.model_validate_json(request.read_bytes())
        for kind in KINDS:
            path = self.path(kind)
            if not path.exists():
                continue
            data = path.read_bytes()
            keep = data[: data.rfind(b"\n") + 1]
            if len(keep) != len(data):
                log.warning("cutting a torn line off %s", path)
                path.write_bytes(keep)
            self.sizes[kind] = len(keep)
            done = min((published or {}).get(kind, 0), keep.count(b"\n"))
            offset = 0
            for raw in keep.splitlines(keepends=True):
                if self.counts[kind] == done:
                    self.published_bytes[kind] = offset
                self.custom_ids.add(json.loads(raw)["custom_id"])
                self.counts[kind] += 1
                offset += len(raw)
            if self.counts[kind] == done:
                self.published_bytes[kind] = offset
            self.published[kind] = done

    def append(self, records: Iterable[ResponseRecord]) -> int:
        """Write each record whose custom_id has no line yet; returns how many were new."""
        if self.sealed:
            return 0
        return self._write(("output" if r.ok else "errors", output_line(r)) for r in records)

    def _write(self, lines: Iterable[tuple[str, OutputLine]]) -> int:
        """Append the lines of custom_ids not written yet: one write per file."""
        parts: dict[str, list[bytes]] = {kind: [] for kind in KINDS}
        for kind, line in lines:
            if line.custom_id not in self.custom_ids:
                self.custom_ids.add(line.custom_id)
                parts[kind].append(line.model_dump_json().encode() + b"\n")
        for kind, new in parts.items():
            if new:
                data = b"".join(new)
                with self.path(kind).open("ab") as f:
                    f.write(data)
                self.counts[kind] += len(new)
                self.sizes[kind] += len(data)
        return sum(len(new) for new in parts.values())

    @property
    def unpublished(self) -> bool:
        return any(self.counts[k] > self.published[k] for k in KINDS)

    def unpublished_segments(self) -> Iterator[tuple[str, int, int, bytes]]:
        """(kind, first line, end line, bytes) of what is spooled but not yet published."""
        for kind in KINDS:
            if self.counts[kind] > self.published[kind]:
                with self.path(kind).open("rb") as f:
                    f.seek(self.published_bytes[kind])
                    data = f.read(self.sizes[kind] - self.published_bytes[kind])
                yield kind, self.published[kind], self.counts[kind], data

    def mark_published(self, kind: str, end: int, size: int) -> None:
        self.published[kind] = end
        self.published_bytes[kind] += size

    def fill(self, custom_ids: Iterable[str], code: str, message: str) -> int:
        """Write an error line for every custom_id that has no result yet."""
        error = LineError(code=code, message=message)
        missing = (("errors", OutputLine(id=f"batch_req_{uuid.uuid4().hex}", custom_id=c,
                                         response=None, error=error))
                   for c in custom_ids if c not in self.custom_ids)
        added = 0
        while chunk := list(islice(missing, FILL_CHUNK)):  # bounded memory, few writes
            added += self._write(chunk)
        return added

    @property
    def complete(self) -> bool:
        """Every line has a result, or (when filling) every result counted upstream is here."""
        if self.seal is None:
            return False
        needed = self.seal.done if self.seal.fill else self.seal.total
        return len(self.custom_ids) >= needed


@dataclass(frozen=True)
class Sealed:
    batch_id: str
    project: str
    files: dict[str, FileObject | None]
    counts: dict[str, int]

    @property
    def lines(self) -> int:
        return sum(self.counts.values())


class Assembler:
    def __init__(self, spool_root: Path, files: FileStore) -> None:
        self.root = spool_root
        self.files = files
        self._spools: dict[str, Spool] = {}
        # seals that were requested before a restart and are still waiting
        for pending in spool_root.glob("*/seal.json"):
            if not (pending.parent / "sealed").exists():
                self.spool(pending.parent.name)

    def spool(self, batch_id: str) -> Spool:
        spool = self._spools.get(batch_id)
        if spool is None:
            spool = Spool(self.root / batch_id)
            spool.rebuild({k: published_lines(self.files, batch_id, k) for k in KINDS})
            self._spools[batch_id] = spool
        return spool

    def add(self, records: Iterable[ResponseRecord]) -> int:
        """Spool each response once; returns how many were new."""
        by_batch: dict[str, list[ResponseRecord]] = {}
        for record in records:
            by_batch.setdefault(record.batch_id, []).append(record)
        added = 0
        for batch_id, group in by_batch.items():
            spool = self.spool(batch_id)
            spool.project = spool.project or group[0].project
            added += spool.append(group)
        return added

    def seal_when_complete(self, request: BatchSealRequested) -> None:
        """Remember (on disk: its offset gets committed) to seal once the lines are in."""
        spool = self.spool(request.batch_id)
        if spool.sealed:
            return
        spool.seal = request
        spool.project = request.project
        pending = spool.directory / "seal.json"
        pending.with_suffix(".tmp").write_bytes(request.dumps())
        pending.with_suffix(".tmp").replace(pending)

    def publish_due(self, every_s: float) -> list[str]:
        """Batches with lines not yet published as partial results for `every_s`."""
        now = time.monotonic()
        return [b for b, s in self._spools.items()
                if s.unpublished and not s.sealed and now - s.published_at >= every_s]

    def publish(self, batch_id: str) -> int:
        """Publish the batch's new spooled lines as partial-result segments."""
        spool = self.spool(batch_id)
        published = 0
        for kind, first, end, data in list(spool.unpublished_segments()):
            self.files.write_bytes(segment_key(batch_id, kind, first, end), data)
            spool.mark_published(kind, end, len(data))
            published += end - first
        spool.published_at = time.monotonic()
        return published

    def sealable(self) -> list[str]:
        return [b for b, s in self._spools.items() if s.complete and not s.sealed]

    def seal(self, batch_id: str) -> Sealed:
        """Copy the spool files into the file store; empty files get no id."""
        spool = self.spool(batch_id)
        expires_after = spool.seal.output_expires_after_s if spool.seal else None
        sealed: dict[str, FileObject | None] = {}
        for kind in KINDS:
            path = spool.path(kind)
            if not path.exists() or path.stat().st_size == 0:
                sealed[kind] = None
                continue
            with path.open("rb") as src:
                size, _ = self.files.write_from(sealed_key(batch_id, kind), src)
            created = int(time.time())
            sealed[kind] = FileObject(
                id=sealed_file_id(batch_id, kind), bytes=size, created_at=created,
                filename=f"{batch_id}_{kind}.jsonl", purpose="batch_output",
                expires_at=created + expires_after if expires_after else None,
            )
        return Sealed(batch_id, spool.project, sealed, dict(spool.counts))

    def mark_sealed(self, batch_id: str) -> None:
        spool = self.spool(batch_id)
        (spool.directory / "sealed").touch()
        for kind in KINDS:
            spool.path(kind).unlink(missing_ok=True)
        (spool.directory / "seal.json").unlink(missing_ok=True)
        spool.custom_ids.clear()
        del self._spools[batch_id]
        # the sealed files hold every published line, in the same order
        self.files.delete_tree(partial_dir(batch_id))
