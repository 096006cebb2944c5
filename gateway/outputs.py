"""What a batch's files give back to its owner, whichever surface asks: a pre-signed download
URL (files, PLai, the dashboard) and the error file summarised (PLai, the dashboard)."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel

from millrace import signed
from millrace.filestore import FileStore
from millrace.protocol import Batch
from millrace.result_files import final_key
from millrace.settings import Settings

EXAMPLES = 5  # error lines shown per batch


class FileUrl(BaseModel):
    object: Literal["file.url"] = "file.url"
    id: str
    url: str
    expires_at: int


def download_url(settings: Settings, files: FileStore, file_id: str, path: str) -> FileUrl:
    """A pre-signed URL of a file: S3's own on an s3:// store, else signed by the gateway,
    on the deployment's public URL (never the request's `Host`, which the caller chose)."""
    ttl = settings.signed_url_ttl_s
    url = files.presign(path, ttl)
    if url is not None:
        return FileUrl(id=file_id, url=url, expires_at=int(time.time()) + ttl)
    url, expires = signed.sign(settings, settings.gateway_url(), file_id)
    return FileUrl(id=file_id, url=url, expires_at=expires)


def processing_errors(files: FileStore, batch: Batch) -> dict[str, Any]:
    """The error file summarised: lines per code and the first few lines."""
    codes: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    if batch.error_file_id is not None:
        key = final_key(batch.id, "errors")
        for raw in files.iter_lines(key) if files.exists(key) else []:
            if not raw.strip():
                continue
            line = json.loads(raw)
            body = ((line.get("response") or {}).get("body") or {}).get("error") or {}
            error = line.get("error") or body
            codes[str(error.get("code") or "error")] += 1
            if len(examples) < EXAMPLES:
                examples.append({"custom_id": line.get("custom_id"), "code": error.get("code"),
                                 "message": error.get("message")})
    return {"total": sum(codes.values()), "by_code": dict(codes), "examples": examples}
