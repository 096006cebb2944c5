"""File storage over pyarrow.fs: a local directory by default, any `s3://` URI in production."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import IO
from urllib.parse import parse_qsl, unquote, urlsplit

import pyarrow as pa
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
        self.url = url
        self.fs: pafs.FileSystem = fs
        self.root = root.rstrip("/")
        self.fs.create_dir(self.root, recursive=True)

    def presign(self, key: str, ttl_s: int) -> str | None:
        """An S3 pre-signed GET URL of `key` (SigV4, from the same URI's endpoint, region
        and credentials); None for a local store (the gateway signs those itself)."""
        if not isinstance(self.fs, pafs.S3FileSystem):
            return None
        import boto3  # only an s3:// store needs it
        from botocore.config import Config

        parts = urlsplit(self.url)
        query = dict(parse_qsl(parts.query))
        endpoint = query.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name=query.get("region"),
            aws_access_key_id=unquote(parts.username) if parts.username else None,
            aws_secret_access_key=unquote(parts.password) if parts.password else None,
            config=Config(signature_version="s3v4"))
        bucket, _, prefix = self.path(key).partition("/")
        url: str = client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": prefix}, ExpiresIn=ttl_s)
        return url

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def write_from(
        self, key: str, source: IO[bytes], max_bytes: int | None = None
    ) -> tuple[int, int]:
        """Stream `source` into `key` chunk by chunk; returns (bytes, lines).

        Raises TooLarge (leaving nothing behind) once more than `max_bytes` were read.
        """
        size = lines = 0
        last = b"\n"
        with self._output(key) as out:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise TooLarge(max_bytes)
                out.write(chunk)
                lines += chunk.count(b"\n")
                last = chunk[-1:]
        if last != b"\n":
            lines += 1  # a final line without its newline still counts
        return size, lines

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

    def read_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_chunks(key))

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._output(key) as out:
            out.write(data)

    @contextmanager
    def _output(self, key: str) -> Iterator[pa.NativeFile]:
        """Readers see the whole object or none of it: S3 makes an object visible when its
        upload completes; on a local disk it is written aside and renamed into place. If
        the writer raises, nothing is left behind."""
        path = self.path(key)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        local = isinstance(self.fs, pafs.LocalFileSystem)
        target = f"{path}.{uuid.uuid4().hex}.tmp" if local else path
        try:
            with self.fs.open_output_stream(target) as out:
                yield out
        except BaseException:
            with suppress(OSError):
                self.fs.delete_file(target)
            raise
        if local:
            self.fs.move(target, path)

    def exists(self, key: str) -> bool:
        return bool(self.fs.get_file_info(self.path(key)).type == pafs.FileType.File)

    def names(self, prefix: str) -> list[str]:
        """Names of the files directly under `prefix` (none if it does not exist)."""
        selector = pafs.FileSelector(self.path(prefix), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.File)

    def delete_tree(self, prefix: str) -> None:
        if self.fs.get_file_info(self.path(prefix)).type != pafs.FileType.NotFound:
            self.fs.delete_dir(self.path(prefix))
