"""Per-batch spools: append each result line once, count what the files hold, and write the
final output and error files into the file store once every line is in.

Each batch spools to `<data_dir>/sink/<batch_id>/` on local disk:
- `output.jsonl`, `errors.jsonl`: its result lines, appended as responses arrive; a
  custom_id already written is skipped (the index is rebuilt from these files after a
  restart, and a torn last line is cut off);
- `meta.json`: what the sink learnt from batch-events (project, number of lines, output
  expiry), written before the events' offsets are committed;
- `written`: the `files_ready` record, left once the final files are registered; later
  records are ignored, and the record can be announced again.

A spool is also published as partial-result segments in the shared file store (every
`sink_partial_every_s`, and whenever the sink's partitions are revoked). A sink that takes a
batch over copies the published lines its own disk lacks into its spool first, so no line
depends on the disk of the sink that spooled it, nor on Kafka still holding its record.

The counts and usage of a batch are those of its spool lines, so `request_counts` and
`usage` always equal what the files hold.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from millrace.filestore import FileStore
from millrace.protocol import FileObject
from millrace.records import BatchFilesReady, BatchProgress, SpooledResponse, Tokens, usage_of
from millrace.result_files import (
    KINDS,
    final_file_id,
    final_key,
    partial_dir,
    segment_key,
    segments,
)

log = logging.getLogger(__name__)


class BatchMeta(BaseModel):
    project: str = ""
    total: int | None = None  # lines of the batch, once known
    output_expires_after_s: int | None = None


@dataclass
class Spool:
    directory: Path
    meta: BatchMeta = field(default_factory=BatchMeta)
    custom_ids: set[str] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    tokens: Tokens = field(default_factory=Tokens)
    # bytes in each spool file, and how many lines / bytes of it are published as
    # partial-result segments
    sizes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    published: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    published_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    published_at: float = 0.0

    @property
    def batch_id(self) -> str:
        return self.directory.name

    @property
    def written(self) -> bool:
        return (self.directory / "written").exists()

    def files_ready(self) -> BatchFilesReady | None:
        """The announcement of the batch's final files, once they are written."""
        path = self.directory / "written"
        return BatchFilesReady.model_validate_json(path.read_bytes()) if path.exists() else None

    def path(self, kind: str) -> Path:
        return self.directory / f"{kind}.jsonl"

    def rebuild(self, published: dict[str, int] | None = None) -> None:
        """Reload meta, index, counts and usage from disk; `published` = lines of each kind
        already in partial-result segments (read back from the file store)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = self.directory / "meta.json"
        if meta.exists():
            self.meta = BatchMeta.model_validate_json(meta.read_bytes())
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
                line = json.loads(raw)
                self.custom_ids.add(line["custom_id"])
                self._count(kind, usage_of((line.get("response") or {}).get("body")))
                offset += len(raw)
            if self.counts[kind] == done:
                self.published_bytes[kind] = offset
            self.published[kind] = done
        for kind in KINDS:
            # segments published by another sink (which had this batch's partition) cover
            # lines not spooled here yet: they come again from Kafka in the same order, and
            # only what follows them is published from here
            ahead = (published or {}).get(kind, 0)
            if ahead > self.counts[kind]:
                self.published[kind] = ahead
                self.published_bytes[kind] = -1

    def seed(self, files: FileStore, found: dict[str, list[tuple[int, int, str]]]) -> bool:
        """Append the lines of published segments (`found`: each kind's, in line order) that
        this spool lacks: another sink spooled and published them while it had the batch's
        partition, and Kafka may no longer hold their records (a broker that lost its
        data). True if any line was added."""
        added = False
        for kind in KINDS:
            new = []
            for _, end, key in found.get(kind, []):
                if end <= self.counts[kind]:  # this spool holds the published prefix
                    continue
                for raw in files.read_bytes(key).splitlines(keepends=True):
                    custom_id = json.loads(raw)["custom_id"]
                    if custom_id not in self.custom_ids:
                        self.custom_ids.add(custom_id)
                        new.append(raw)
            if new:
                self._write_all({kind: b"".join(new)})
                added = True
        return added

    def _count(self, kind: str, tokens: Tokens) -> None:
        self.counts[kind] += 1
        self.tokens = self.tokens.plus(tokens)

    def learn(self, **changes: Any) -> None:
        """Remember what batch-events said (on disk: the events' offsets get committed)."""
        meta = self.meta.model_copy(update=changes)
        if meta == self.meta:
            return
        self.meta = meta
        path = self.directory / "meta.json"
        path.with_suffix(".tmp").write_text(meta.model_dump_json())
        path.with_suffix(".tmp").replace(path)

    def append(self, records: Iterable[SpooledResponse]) -> list[int]:
        """Write each record whose custom_id has no line yet: one write per file. Returns
        the input line numbers of the new lines (those known)."""
        if self.written:
            return []
        parts: dict[str, list[bytes]] = {kind: [] for kind in KINDS}
        taken: list[tuple[str, SpooledResponse]] = []
        ids = set()
        for record in records:
            if record.custom_id in self.custom_ids or record.custom_id in ids:
                continue
            ids.add(record.custom_id)
            kind = "output" if record.ok else "errors"
            parts[kind].append(record.output_line() + b"\n")
            taken.append((kind, record))
        self._write_all({kind: b"".join(new) for kind, new in parts.items() if new})
        for kind, record in taken:  # on disk: now they count
            self.custom_ids.add(record.custom_id)
            self._count(kind, record.tokens())
        return [record.line for _, record in taken if record.line is not None]

    def _write_all(self, data: dict[str, bytes]) -> None:
        """Append to each kind's file, all or nothing: a write that fails (a full disk) is
        cut back off every file, so a retry never finds half a line."""
        done: list[tuple[str, int]] = []
        try:
            for kind, chunk in data.items():
                path = self.path(kind)
                before = path.stat().st_size if path.exists() else 0
                done.append((kind, before))
                with path.open("ab") as f:
                    f.write(chunk)
                    f.flush()
                self.sizes[kind] = before + len(chunk)
        except OSError:
            for kind, before in done:
                with contextlib.suppress(OSError), self.path(kind).open("r+b") as f:
                    f.truncate(before)
                self.sizes[kind] = before
            raise

    @property
    def complete(self) -> bool:
        """Every line of the batch has its result line here."""
        total = self.meta.total
        return total is not None and len(self.custom_ids) >= total and not self.written

    def progress(self) -> BatchProgress:
        return BatchProgress(batch_id=self.batch_id, completed=self.counts["output"],
                             failed=self.counts["errors"], **self.tokens.usage())

    @property
    def unpublished(self) -> bool:
        return any(self.counts[k] > self.published[k] for k in KINDS)

    def unpublished_segments(self) -> Iterator[tuple[str, int, int, bytes]]:
        """(kind, first line, end line, bytes) of what is spooled but not yet published."""
        for kind in KINDS:
            if self.counts[kind] > self.published[kind]:
                if self.published_bytes[kind] < 0:
                    self.published_bytes[kind] = self._offset_of_line(kind,
                                                                      self.published[kind])
                with self.path(kind).open("rb") as f:
                    f.seek(self.published_bytes[kind])
                    data = f.read(self.sizes[kind] - self.published_bytes[kind])
                yield kind, self.published[kind], self.counts[kind], data

    def _offset_of_line(self, kind: str, line: int) -> int:
        """Bytes before the spool file's line `line` (0-based)."""
        offset = 0
        with self.path(kind).open("rb") as f:
            for _ in range(line):
                offset += len(f.readline())
        return offset

    def mark_published(self, kind: str, end: int, size: int) -> None:
        self.published[kind] = end
        self.published_bytes[kind] += size


@dataclass(frozen=True)
class Written:
    """A batch's final files, with what they hold."""

    batch_id: str
    project: str
    files: dict[str, FileObject | None]
    counts: dict[str, int]
    tokens: Tokens

    @property
    def lines(self) -> int:
        return sum(self.counts.values())


class Assembler:
    def __init__(self, spool_root: Path, files: FileStore, retention_s: int = 0) -> None:
        self.root = spool_root
        self.files = files
        # how long output and error files are kept when the batch gave no
        # `output_expires_after` (`OUTPUT_RETENTION_S`; 0: until deleted)
        self.retention_s = retention_s
        self._spools: dict[str, Spool] = {}
        # batches whose lines were all in before a restart are written at once
        for meta in spool_root.glob("*/meta.json"):
            if not (meta.parent / "written").exists():
                self.spool(meta.parent.name)

    def spool(self, batch_id: str) -> Spool:
        """The batch's spool, from disk the first time; lines that another sink published
        and this disk lacks are copied in from the file store first."""
        spool = self._spools.get(batch_id)
        if spool is None:
            found = {k: segments(self.files, batch_id, k) for k in KINDS}
            published = {k: max((end for _, end, _ in found[k]), default=0) for k in KINDS}
            spool = Spool(self.root / batch_id)
            spool.rebuild(published)
            if not spool.written and spool.seed(self.files, found):
                log.info("%s: spooled the lines another sink had published", batch_id)
                spool = Spool(self.root / batch_id)
                spool.rebuild(published)
            self._spools[batch_id] = spool
        return spool

    def publish_all(self) -> None:
        """Publish every spool's unpublished lines, then forget the spools: the batches'
        partitions may go to another sink, which copies them in (`Spool.seed`); when one
        comes back, its spool is read again with what the other sink added."""
        try:
            for batch_id in self.publish_due(0):
                self.publish(batch_id)
        finally:
            self._spools.clear()

    def add(self, records: Iterable[SpooledResponse]) -> dict[str, list[int]]:
        """Spool each response once; per batch with new lines, their input line numbers."""
        by_batch: dict[str, list[SpooledResponse]] = {}
        for record in records:
            by_batch.setdefault(record.batch_id, []).append(record)
        added: dict[str, list[int]] = {}
        for batch_id, group in by_batch.items():
            spool = self.spool(batch_id)
            before = len(spool.custom_ids)
            lines = spool.append(group)
            if len(spool.custom_ids) > before:
                if not spool.meta.project:
                    spool.learn(project=group[0].project)
                added[batch_id] = lines
        return added

    def learn(self, batch_id: str, **changes: Any) -> None:
        spool = self.spool(batch_id)
        if not spool.written:
            spool.learn(**changes)

    def complete(self) -> list[str]:
        return [b for b, s in self._spools.items() if s.complete]

    def publish_due(self, every_s: float) -> list[str]:
        """Batches with lines not yet published as partial results for `every_s`."""
        now = time.monotonic()
        return [b for b, s in self._spools.items()
                if s.unpublished and not s.written and now - s.published_at >= every_s]

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

    def write_files(self, batch_id: str) -> Written:
        """Copy the spool files into the file store; empty files get no id."""
        spool = self.spool(batch_id)
        expires_after = spool.meta.output_expires_after_s or self.retention_s
        files: dict[str, FileObject | None] = {}
        for kind in KINDS:
            path = spool.path(kind)
            if not path.exists() or path.stat().st_size == 0:
                files[kind] = None
                continue
            with path.open("rb") as src:
                size, _ = self.files.write_from(final_key(batch_id, kind), src)
            created = int(time.time())
            files[kind] = FileObject(
                id=final_file_id(batch_id, kind), bytes=size, created_at=created,
                filename=f"{batch_id}_{kind}.jsonl", purpose="batch_output",
                expires_at=created + expires_after if expires_after else None,
            )
        return Written(batch_id, spool.meta.project, files, dict(spool.counts),
                       spool.tokens)

    def forget_written(self, older_than_s: float) -> int:
        """Drop the markers of batches written that long ago (no late line comes after)."""
        cutoff = time.time() - older_than_s
        dropped = 0
        for marker in self.root.glob("*/written"):
            with contextlib.suppress(OSError):
                if marker.stat().st_mtime < cutoff:
                    shutil.rmtree(marker.parent)
                    dropped += 1
        return dropped

    def forget(self, batch_id: str) -> None:
        """A finished batch that has no files (failed validation, cancelled before any line
        ran): nothing will come for it."""
        spool = self.spool(batch_id)
        if not spool.written and not spool.custom_ids:
            shutil.rmtree(spool.directory, ignore_errors=True)
            del self._spools[batch_id]

    def mark_written(self, batch_id: str, ready: BatchFilesReady) -> None:
        """The files are registered: drop the spool, keep the announcement (late lines are
        ignored from now on)."""
        spool = self.spool(batch_id)
        marker = spool.directory / "written"
        marker.with_suffix(".tmp").write_bytes(ready.dumps())
        marker.with_suffix(".tmp").replace(marker)
        for kind in KINDS:
            spool.path(kind).unlink(missing_ok=True)
        spool.custom_ids.clear()
        del self._spools[batch_id]
        # the final files hold every published line, in the same order
        self.files.delete_tree(partial_dir(batch_id))
