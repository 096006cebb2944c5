"""Files API: upload limits, expiry, listing with the SDK's pagination parameters."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.deployment import Deployment


def gateway_peak_rss(deployment: Deployment) -> int:
    """VmHWM (peak resident memory) of the deployment's gateway process, in bytes."""
    for pid in deployment.child_pids():
        proc = Path(f"/proc/{pid}")
        if (proc / "cmdline").read_bytes().startswith(b"millrace gateway"):
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    raise AssertionError("no gateway process found")


def test_upload_retrieve_content_delete(client: OpenAI) -> None:
    body = b'{"custom_id": "a"}\n{"custom_id": "b"}\n'
    uploaded = client.files.create(file=("in.jsonl", body), purpose="batch")
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (len(body), "in.jsonl",
                                                                     "batch")
    # a batch input file given no expires_after is kept 30 days (OpenAI's default)
    assert uploaded.id.startswith("file-")
    assert uploaded.expires_at == uploaded.created_at + 30 * 86400
    other = client.files.create(file=("notes.jsonl", body), purpose="user_data")
    assert other.expires_at is None  # other purposes: until deleted
    client.files.delete(other.id)
    assert client.files.retrieve(uploaded.id) == uploaded
    assert client.files.content(uploaded.id).content == body
    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_expires_after_sets_expires_at(client: OpenAI) -> None:
    uploaded = client.files.create(file=("e.jsonl", b"{}\n"), purpose="batch",
                                   expires_after={"anchor": "created_at", "seconds": 3600})
    assert uploaded.expires_at == uploaded.created_at + 3600
    with pytest.raises(openai.BadRequestError) as raised:
        client.files.create(file=("e.jsonl", b"{}\n"), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 60})
    assert raised.value.body["param"] == "expires_after"  # type: ignore[index]


def test_listing_pages_with_after_limit_order_and_purpose(
    deployment: Deployment, http: httpx.Client
) -> None:
    # a fresh project, so the listing holds exactly what this test uploads
    admin = {"Authorization": f"Bearer {deployment.api_key}"}
    key = http.post("/admin/api-keys", json={"project": "files-list"}, headers=admin).json()
    client = OpenAI(base_url=deployment.base_url, api_key=key["key"], max_retries=0)
    ids = [client.files.create(file=(f"{i}.jsonl", b"{}\n"),
                               purpose="batch" if i % 2 else "user_data").id for i in range(5)]
    newest_first = [f.id for f in client.files.list()]
    assert newest_first == ids[::-1]
    page = client.files.list(limit=2)
    assert [f.id for f in page.data] == ids[:2:-1] and page.has_more
    following = client.files.list(limit=2, after=page.data[-1].id)
    assert [f.id for f in following.data] == [ids[2], ids[1]]
    assert [f.id for f in client.files.list(order="asc")] == ids
    assert [f.id for f in client.files.list(purpose="batch")] == [ids[3], ids[1]]
    assert [f.id for f in client.files.list(after=ids[0])] == []


def test_a_batch_upload_over_the_size_limit_is_413(
    deployment: Deployment, http: httpx.Client, tmp_path: Path
) -> None:
    big = tmp_path / "big.jsonl"
    with big.open("wb") as f:
        f.truncate(200 * 1024 * 1024 + 1)  # sparse: cheap to make, 200 MiB + 1 byte to send
    headers = {"Authorization": f"Bearer {deployment.api_key}"}
    peak_before = gateway_peak_rss(deployment)
    started = time.monotonic()
    with big.open("rb") as f:
        response = http.post("/v1/files", data={"purpose": "batch"},
                             files={"file": ("over-the-limit.jsonl", f)}, headers=headers,
                             timeout=120)
    assert response.status_code == 413, response.text
    # streamed in chunks: 200 MiB through the gateway must not raise its peak memory by much
    assert gateway_peak_rss(deployment) - peak_before < 64 * 1024 * 1024
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("file_too_large", "file")
    assert time.monotonic() - started < 120
    listed = http.get("/v1/files", headers=headers).json()["data"]
    assert "over-the-limit.jsonl" not in [f["filename"] for f in listed]
