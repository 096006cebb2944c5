"""Per-batch spool files: append each response line once, seal into the file store.

Each batch spools to `<data_dir>/sink/<batch_id>/{output,errors}.jsonl` on local disk,
appending as responses arrive. The set of custom_ids already written is rebuilt from the
spool after a restart, so a redelivered response is never written twice. A torn last line
(crash mid-write) is cut off on rebuild.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from millrace.filestore import FileStore
from millrace.protocol import FileObject, LineResponse, OutputLine
from millrace.records import ResponseRecord

log = logging.getLogger(__name__)

KINDS = ("output", "errors")


def output_line(record: ResponseRecord) -> OutputLine:
    response = None
    if record.status_code is not None and record.body is not None:
        response = LineResponse(
            status_code=record.status_code, request_id=record.request_id or "", body=record.body
        )
    return OutputLine(id=record.id, custom_id=record.custom_id, response=response,
                      error=record.error)


def sealed_file_id(batch_id: str, kind: str) -> str:
    """Deterministic, so sealing again after a crash re-registers the same file."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


def sealed_key(batch_id: str, kind: str) -> str:
    return f"outputs/{batch_id}/{kind}.jsonl"


@dataclass
class Spool:
    directory: Path
    custom_ids: set[str] = field(default_factory=set)
    total: int | None = None
    project: str = ""

    @property
    def sealed(self) -> bool:
        return (self.directory / "sealed").exists()

    def path(self, kind: str) -> Path:
        return self.directory / f"{kind}.jsonl"

    def rebuild(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for kind in KINDS:
            path = self.path(kind)
            if not path.exists():
                continue
            data = path.read_bytes()
            keep = data[: data.rfind(b"\n") + 1]
            if len(keep) != len(data):
                log.warning("cutting a torn line off %s", path)
                path.write_bytes(keep)
            for raw in keep.splitlines():
                self.custom_ids.add(json.loads(raw)["custom_id"])

    def append(self, record: ResponseRecord) -> bool:
        if record.custom_id in self.custom_ids or self.sealed:
            return False
        kind = "output" if record.ok else "errors"
        with self.path(kind).open("ab") as f:
            f.write(output_line(record).model_dump_json().encode() + b"\n")
        self.custom_ids.add(record.custom_id)
        return True

    @property
    def complete(self) -> bool:
        return self.total is not None and len(self.custom_ids) >= self.total


@dataclass(frozen=True)
class Sealed:
    batch_id: str
    project: str
    files: dict[str, FileObject | None]
    lines: int


class Assembler:
    def __init__(self, spool_root: Path, files: FileStore) -> None:
        self.root = spool_root
        self.files = files
        self._spools: dict[str, Spool] = {}

    def spool(self, batch_id: str) -> Spool:
        spool = self._spools.get(batch_id)
        if spool is None:
            spool = Spool(self.root / batch_id)
            spool.rebuild()
            self._spools[batch_id] = spool
        return spool

    def add(self, record: ResponseRecord) -> bool:
        spool = self.spool(record.batch_id)
        spool.project = spool.project or record.project
        return spool.append(record)

    def finalizing(self, batch_id: str, total: int, project: str) -> None:
        spool = self.spool(batch_id)
        spool.total = total
        spool.project = project

    def sealable(self) -> list[str]:
        return [b for b, s in self._spools.items() if s.complete and not s.sealed]

    def seal(self, batch_id: str) -> Sealed:
        """Copy the spool files into the file store; empty files get no id."""
        spool = self.spool(batch_id)
        sealed: dict[str, FileObject | None] = {}
        for kind in KINDS:
            path = spool.path(kind)
            if not path.exists() or path.stat().st_size == 0:
                sealed[kind] = None
                continue
            with path.open("rb") as src:
                size, _ = self.files.write_from(sealed_key(batch_id, kind), src)
            sealed[kind] = FileObject(
                id=sealed_file_id(batch_id, kind), bytes=size, created_at=int(time.time()),
                filename=f"{batch_id}_{kind}.jsonl", purpose="batch_output",
            )
        return Sealed(batch_id, spool.project, sealed, len(spool.custom_ids))

    def mark_sealed(self, batch_id: str) -> None:
        spool = self.spool(batch_id)
        for kind in KINDS:
            spool.path(kind).unlink(missing_ok=True)
        (spool.directory / "sealed").touch()
        spool.custom_ids.clear()
        del self._spools[batch_id]
