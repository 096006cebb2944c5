"""What a batch's files give back: a download URL that opens exactly that file (S3's own on
an S3 store, the gateway's signature on the deployment's public URL otherwise), and the
error file summarised by code with its first lines."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from gateway.outputs import EXAMPLES, download_url, processing_errors
from millrace import signed
from millrace.errors import PermissionDeniedError
from millrace.filestore import FileStore
from millrace.lifecycle.status import BatchStatus
from millrace.protocol import Batch
from millrace.result_files import final_key
from millrace.settings import Settings


def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, public_url="https://batch.example/",
                    webhook_signing_key="whsec_" + "a" * 32, signed_url_ttl_s=600)


def test_a_local_store_s_url_is_signed_on_the_public_url(tmp_path: Path) -> None:
    config = settings(tmp_path)
    found = download_url(config, FileStore(str(tmp_path / "store")), "file-1", "files/file-1")
    url = urlsplit(found.url)
    assert (url.scheme, url.netloc, url.path) == ("https", "batch.example",
                                                  "/signed/files/file-1")
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert int(query["expires"]) == found.expires_at
    assert 0 < found.expires_at - time.time() <= 600
    signed.check(config, "file-1", found.expires_at, query["signature"])
    with pytest.raises(PermissionDeniedError):  # it opens no other file
        signed.check(config, "file-2", found.expires_at, query["signature"])


def test_an_s3_store_s_url_is_s3_s_own(tmp_path: Path, s3_url: str) -> None:
    files = FileStore(s3_url)
    files.write_bytes("files/file-s3", b'{"a": 1}\n')
    found = download_url(settings(tmp_path), files, "file-s3", "files/file-s3")
    assert "X-Amz-Signature" in found.url
    assert httpx.get(found.url).content == b'{"a": 1}\n'


def batch(error_file_id: str | None) -> Batch:
    return Batch(id="batch_e", endpoint="/v1/chat/completions", input_file_id="f",
                 completion_window="24h", status=BatchStatus.COMPLETED, created_at=1,
                 error_file_id=error_file_id)


def test_the_error_file_is_summarised_by_code(tmp_path: Path) -> None:
    files = FileStore(str(tmp_path / "store"))
    lines = [{"custom_id": f"v{n}", "response": {"status_code": 400, "body": {"error": {
        "code": "invalid_value", "message": f"bad {n}"}}}} for n in range(EXAMPLES + 2)]
    lines.append({"custom_id": "x", "response": None,
                  "error": {"code": "batch_expired", "message": "expired"}})
    lines.append({"custom_id": "y", "response": None, "error": {"message": "no code"}})
    files.write_bytes(final_key("batch_e", "errors"),
                      "\n".join(json.dumps(line) for line in lines).encode() + b"\n\n")
    summary = processing_errors(files, batch("file-err"))
    assert summary["total"] == len(lines)
    assert summary["by_code"] == {"invalid_value": EXAMPLES + 2, "batch_expired": 1,
                                  "error": 1}
    assert summary["examples"] == [{"custom_id": f"v{n}", "code": "invalid_value",
                                    "message": f"bad {n}"} for n in range(EXAMPLES)]
    empty = {"total": 0, "by_code": {}, "examples": []}
    assert processing_errors(files, batch(None)) == empty
    files.delete(final_key("batch_e", "errors"))  # the file gone (the janitor): nothing
    assert processing_errors(files, batch("file-err")) == empty
