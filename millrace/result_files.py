"""Where a batch's result lines live in the file store, final or still being written.

- `outputs/<batch>/<kind>.jsonl`: the final output / error file (`kind` output|errors).
- `partial/<batch>/<kind>/<first>-<end>.jsonl`: while the batch runs, the sink publishes
  the lines it has spooled, in segments; segment [first, end) holds lines first..end-1 in
  the order they were written.

The final file holds the segments' lines in the same order, so a cursor — the number of
lines read so far — means the same before and after the files are written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

from millrace.filestore import FileStore

KINDS = ("output", "errors")


def final_key(batch_id: str, kind: str) -> str:
    return f"outputs/{batch_id}/{kind}.jsonl"


def final_file_id(batch_id: str, kind: str) -> str:
    """Deterministic, so writing the files again after a crash registers the same ids."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


def partial_dir(batch_id: str, kind: str | None = None) -> str:
    return f"partial/{batch_id}" + (f"/{kind}" if kind else "")


def segment_key(batch_id: str, kind: str, first: int, end: int) -> str:
    return f"{partial_dir(batch_id, kind)}/{first:010d}-{end:010d}.jsonl"


def segments(files: FileStore, batch_id: str, kind: str) -> list[tuple[int, int, str]]:
    """(first, end, key) of each published segment, in line order."""
    found = []
    for name in files.names(partial_dir(batch_id, kind)):
        first, dash, end = name.removesuffix(".jsonl").partition("-")
        if name.endswith(".jsonl") and dash and first.isdigit() and end.isdigit():
            found.append((int(first), int(end), f"{partial_dir(batch_id, kind)}/{name}"))
    return sorted(found)


def published_lines(files: FileStore, batch_id: str, kind: str) -> int:
    """Lines covered by the published segments."""
    return max((end for _, end, _ in segments(files, batch_id, kind)), default=0)


@dataclass(frozen=True)
class Page:
    lines: list[bytes]
    # read from the final file: no line will be added to it
    final: bool
    # lines after this page exist already
    more: bool

    def cursor(self, after: int) -> int:
        return after + len(self.lines)


def read_page(files: FileStore, batch_id: str, kind: str, after: int, limit: int) -> Page:
    """Up to `limit` lines after the first `after`: from the final file once it exists,
    else from the published segments."""
    if files.exists(final_key(batch_id, kind)):
        return _page(islice(files.iter_lines(final_key(batch_id, kind)), after, None),
                     limit, final=True)
    try:
        return _page(_segment_lines(files, batch_id, kind, after), limit, final=False)
    except FileNotFoundError:  # written (and its segments removed) while we read
        return read_page(files, batch_id, kind, after, limit)


def _segment_lines(files: FileStore, batch_id: str, kind: str, after: int) -> Iterator[bytes]:
    for first, end, key in segments(files, batch_id, kind):
        if end > after:
            yield from islice(files.iter_lines(key), max(after - first, 0), None)


def _page(lines: Iterator[bytes], limit: int, final: bool) -> Page:
    taken = [line for line in islice(lines, limit + 1) if line]
    return Page(taken[:limit], final, more=len(taken) > limit)
