"""The file store on local disk and on S3 (a real S3 HTTP endpoint: moto's server)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from millrace.filestore import FileStore, TooLarge


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> FileStore:
    if request.param == "local":
        return FileStore(str(tmp_path / "files"))
    return FileStore(request.getfixturevalue("s3_url"))


def test_write_read_delete(store: FileStore) -> None:
    data = b'{"a": 1}\n{"b": 2}\nlast line without newline'
    assert store.write_from("x/y.jsonl", io.BytesIO(data)) == (len(data), 3)
    assert b"".join(store.iter_chunks("x/y.jsonl")) == data
    assert list(store.iter_lines("x/y.jsonl")) == data.split(b"\n")
    store.delete("x/y.jsonl")
    with pytest.raises(FileNotFoundError):
        list(store.iter_chunks("x/y.jsonl"))


def test_lines_spanning_chunks(store: FileStore) -> None:
    lines = [b"x" * 700_000, b"y" * 900_000, b"z"]  # crosses the 1 MiB read size
    store.write_from("big.jsonl", io.BytesIO(b"\n".join(lines) + b"\n"))
    assert list(store.iter_lines("big.jsonl")) == lines


def test_too_large_leaves_nothing_behind(store: FileStore) -> None:
    with pytest.raises(TooLarge):
        store.write_from("big.bin", io.BytesIO(b"0" * (3 << 20)), max_bytes=2 << 20)
    with pytest.raises(FileNotFoundError):
        list(store.iter_chunks("big.bin"))


def test_whole_objects_listing_and_tree_delete(store: FileStore) -> None:
    assert store.names("p/q") == [] and not store.exists("p/q/1.jsonl")
    store.write_bytes("p/q/2.jsonl", b"two\n")
    store.write_bytes("p/q/1.jsonl", b"one\n")
    assert store.names("p/q") == ["1.jsonl", "2.jsonl"]  # nothing half-written is listed
    assert store.exists("p/q/1.jsonl")
    assert list(store.iter_lines("p/q/2.jsonl")) == [b"two"]
    store.delete_tree("p")
    assert store.names("p/q") == [] and not store.exists("p/q/1.jsonl")
    store.delete_tree("p")  # already gone: nothing to do


def test_an_s3_store_presigns_sigv4_urls_that_s3_serves(s3_url: str) -> None:
    """(Expiry and the signature itself are S3's to enforce; moto's server checks neither.)"""
    import httpx

    store = FileStore(s3_url)
    store.write_bytes("outputs/b1/output.jsonl", b'{"custom_id": "a"}\n')
    url = store.presign("outputs/b1/output.jsonl", 60)
    assert url is not None and "X-Amz-Signature=" in url and "X-Amz-Expires=60" in url
    assert httpx.get(url).content == b'{"custom_id": "a"}\n'  # no credentials but the URL's
    assert FileStore(str(Path("/tmp"))).presign("x", 60) is None  # local: the gateway signs
