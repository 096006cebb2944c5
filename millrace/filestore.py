"""File storage over pyarrow.fs: a local directory by default, any `s3://` URI in production."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, cast

import pyarrow.fs as pafs

from millrace.errors import MillraceError

CHUNK = 1 << 20


class TooLarge(MillraceError):
    """The stream was longer than the limit it was written under."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


class FileStore:
    def __init__(self, url: str) -> None:
        fs, root = pafs.FileSystem.from_uri(url)
        self.fs: pafs.FileSystem = fs
        self.root = root.rstrip("/")
        self.fs.create_dir(self.root, recursive=True)

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def write_from(
        self, key: str, source: IO[bytes], max_bytes: int | None = None
    ) -> tuple[int, int]:
        """Stream `source` into `key` chunk by chunk; returns (bytes, lines).

        Raises TooLarge (leaving nothing behind) once more than `max_bytes` were read.
        """
        path = self.path(key)
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        size = lines = 0
        last = b"\n"
        with self.fs.open_output_stream(path) as out:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    out.close()
                    self.fs.delete_file(path)
                    raise TooLarge(max_bytes)
                out.write(chunk)
                lines += chunk.count(b"\n")
                last = chunk[-1:]
        if last != b"\n":
            lines += 1  # a final line without its newline still counts
        return size, lines

    def open(self, key: str) -> IO[bytes]:
        return cast(IO[bytes], self.fs.open_input_stream(self.path(key)))

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        with self.fs.open_input_stream(self.path(key)) as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def iter_lines(self, key: str) -> Iterator[bytes]:
        """Yield each line (without its newline), reading the file in bounded chunks."""
        tail = b""
        for chunk in self.iter_chunks(key):
            parts = (tail + chunk).split(b"\n")
            tail = parts.pop()
            yield from parts
        if tail:
            yield tail

    def delete(self, key: str) -> None:
        self.fs.delete_file(self.path(key))
