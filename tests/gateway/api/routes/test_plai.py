"""PLai's batch API (seed 001) with a plain HTTP client, and the `/v1` abilities it brought:
input files fetched from a URL, pre-signed downloads, unknown fields refused."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from standardwebhooks import Webhook

from tests.conftest import chat_line
from tests.deployment import Deployment, wait_until
from tests.receiver import receiving
from tests.website import serving

TERMINAL = {"completed", "failed", "expired", "cancelled"}


@pytest.fixture(scope="module")
def keys(deployment: Deployment, http: httpx.Client) -> dict[str, dict[str, str]]:
    admin = {"Authorization": f"Bearer {deployment.api_key}"}
    return {project: {"Authorization": "Bearer " + http.post(
        "/admin/api-keys", json={"project": project}, headers=admin).json()["key"]}
        for project in ("plai-a", "plai-b")}


def finished(http: httpx.Client, headers: dict[str, str], batch_id: str) -> dict[str, object]:
    return wait_until(lambda: (b := http.get(f"/plai/batches/{batch_id}", headers=headers)
                               .json())["status"] in TERMINAL and b, 600, batch_id, every=0.5)


def test_a_plai_batch_runs_from_a_url_and_calls_back_signed(
    deployment: Deployment, http: httpx.Client, keys: dict[str, dict[str, str]], model: str
) -> None:
    a = keys["plai-a"]
    lines = [chat_line(f"r{i}", model, f"Say {i}.", max_tokens=5) for i in range(3)]
    lines.append(chat_line("bad", model, "x", max_tokens=5, n=0))  # a processing error
    with serving({"/in.jsonl": "\n".join(lines).encode()}) as web, receiving() as receiver:
        site = web.url
        created = http.post("/plai/batches", headers=a, json={
            "name": "nightly", "description": "three questions", "type": "COMPLETIONS",
            "input_file_url": f"{site}/in.jsonl", "callback_url": receiver.url})
        assert created.status_code == 200, created.text
        batch = created.json()
        assert batch["status"] == "validating" and batch["name"] == "nightly"
        assert batch["created_at"].endswith("Z") and batch["output_available"] is False
        done = finished(http, a, batch["id"])
        hook = receiver.wait_for(1, 120)[0]

    assert done["status"] == "completed" and done["request_counts"]["total"] == 4
    assert (done["type"], done["input_file_url"], done["callback_url"]) == (
        "COMPLETIONS", f"{site}/in.jsonl", receiver.url)
    assert done["output_available"] and done["errors_available"]
    details = done["error_details"]["processing_errors"]
    assert details["total"] == 1 and details["examples"][0]["custom_id"] == "bad"
    again = http.get(f"/plai/batches/{batch['id']}", headers=a).json()  # kept, not re-read
    assert again["error_details"] == done["error_details"]

    secret = http.get("/v1/webhook_secret", headers=a).json()["secret"]
    event = Webhook(secret).verify(hook.body, hook.headers)
    assert event["type"] == "batch.completed" and event["data"]["id"] == batch["id"]

    # pre-signed downloads: no key needed, the right bytes
    urls = http.get(f"/plai/batches/{batch['id']}/download", headers=a).json()
    assert urls["expires_at"] > time.time()
    output = httpx.get(urls["output_file_url"])
    assert output.status_code == 200
    assert sorted(json.loads(x)["custom_id"] for x in output.text.splitlines()) == [
        "r0", "r1", "r2"]
    assert json.loads(httpx.get(urls["errors_file_url"]).text)["custom_id"] == "bad"

    listed = http.get("/plai/batches?skip=0&take=100&order=desc", headers=a).json()
    assert batch["id"] in [b["id"] for b in listed]
    assert http.get("/plai/batches?take=101", headers=a).status_code == 400


def test_an_embeddings_batch_from_a_url(
    http: httpx.Client, keys: dict[str, dict[str, str]], embedding_model: str
) -> None:
    a = keys["plai-a"]
    lines = [json.dumps({"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                         "body": {"model": embedding_model, "input": f"text {i}"}})
             for i in range(3)]
    with serving({"/emb.jsonl": "\n".join(lines).encode()}) as web:
        created = http.post("/plai/batches", headers=a, json={
            "name": "vectors", "type": "EMBEDDINGS", "input_file_url": f"{web.url}/emb.jsonl",
            "callback_url": "http://127.0.0.1:9/hook"}).json()
        done = finished(http, a, created["id"])
    assert (done["status"], done["type"], done["endpoint"]) == (
        "completed", "EMBEDDINGS", "/v1/embeddings")
    urls = http.get(f"/plai/batches/{created['id']}/download", headers=a).json()
    vectors = [json.loads(x)["response"]["body"]["data"][0]["embedding"]
               for x in httpx.get(urls["output_file_url"]).text.splitlines()]
    assert len(vectors) == 3 and all(len(v) == 384 for v in vectors)
    assert urls["errors_file_url"] is None


def test_download_urls_expire_and_open_no_other_file(
    deployment: Deployment, http: httpx.Client, keys: dict[str, dict[str, str]], model: str
) -> None:
    a, b = keys["plai-a"], keys["plai-b"]
    mine = http.post("/v1/files", headers=a, files={"file": ("a.jsonl", b"{}\n")},
                     data={"purpose": "batch"}).json()
    theirs = http.post("/v1/files", headers=b, files={"file": ("b.jsonl", b"secret\n")},
                       data={"purpose": "batch"}).json()
    signed = http.get(f"/v1/files/{mine['id']}/url", headers=a).json()
    assert httpx.get(signed["url"]).content == b"{}\n"
    assert http.get(f"/v1/files/{theirs['id']}/url", headers=a).status_code == 404

    # the signature names the file: another file's id under it is refused
    swapped = signed["url"].replace(mine["id"], theirs["id"])
    assert httpx.get(swapped).status_code == 403
    # a correct signature for a time that has passed is refused as expired
    key = (deployment.data_dir / "webhook_signing_key").read_text().strip().encode()
    url_key = hmac.new(key, b"millrace signed download urls", hashlib.sha256).digest()
    past = int(time.time()) - 1
    signature = hmac.new(url_key, f"{mine['id']}:{past}".encode(), hashlib.sha256).hexdigest()
    base = signed["url"].split("?")[0]
    expired = httpx.get(f"{base}?expires={past}&signature={signature}")
    assert expired.status_code == 403 and "expired" in expired.json()["error"]["message"]
    assert parse_qs(urlsplit(signed["url"]).query)["expires"] == [str(signed["expires_at"])]


def test_input_file_url_on_v1_and_what_a_bad_url_gets(
    http: httpx.Client, keys: dict[str, dict[str, str]], model: str
) -> None:
    a = keys["plai-a"]
    with serving({"/ok.jsonl": chat_line("x", model, "Hi.", max_tokens=3).encode()}) as web:
        site = web.url
        made = http.post("/v1/batches", headers=a, json={
            "input_file_url": f"{site}/ok.jsonl", "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}).json()
        gone = http.post("/v1/batches", headers=a, json={
            "input_file_url": f"{site}/missing.jsonl", "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}).json()
        ok = wait_until(lambda: (x := http.get(f"/v1/batches/{made['id']}", headers=a).json())[
            "status"] in TERMINAL and x, 300, "the fetched batch")
        failed = wait_until(lambda: (x := http.get(f"/v1/batches/{gone['id']}", headers=a)
                                     .json())["status"] in TERMINAL and x, 120, "the 404 batch")
    assert ok["status"] == "completed" and ok["request_counts"]["completed"] == 1
    fetched = http.get(f"/v1/files/{ok['input_file_id']}", headers=a).json()
    assert fetched["purpose"] == "batch" and fetched["filename"] == "ok.jsonl"
    assert failed["status"] == "failed"
    error = failed["errors"]["data"][0]
    assert (error["code"], error["param"]) == ("fetch_failed", "input_file_url")
    assert "HTTP 404" in error["message"]

    for url in ("http://10.0.0.1/in.jsonl", "http://[2002:a00:1::]/x", "file:///etc/passwd"):
        refused = http.post("/v1/batches", headers=a, json={
            "input_file_url": url, "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == (
            "input_file_url"), url


def test_unknown_fields_are_refused_by_name(
    deployment: Deployment, http: httpx.Client, keys: dict[str, dict[str, str]]
) -> None:
    a = keys["plai-a"]
    plai = http.post("/plai/batches", headers=a, json={
        "name": "n", "type": "COMPLETIONS", "input_file_url": "http://127.0.0.1:9/x",
        "callback_url": "http://127.0.0.1:9/hook", "priority": "high"})
    assert plai.status_code == 400
    assert (plai.json()["error"]["code"], plai.json()["error"]["param"]) == (
        "unknown_parameter", "priority")
    v1 = http.post("/v1/batches", headers=a, json={
        "input_file_id": "file-x", "endpoint": "/v1/chat/completions",
        "completion_window": "24h", "callback_url": "http://127.0.0.1:9/hook"})
    assert (v1.status_code, v1.json()["error"]["code"], v1.json()["error"]["param"]) == (
        400, "unknown_parameter", "callback_url")
    # the admin sweep under PLai's name: admin keys only
    assert http.post("/plai/batches/check-status", headers=a).status_code == 403
    admin = {"Authorization": f"Bearer {deployment.api_key}"}
    report = http.post("/plai/batches/check-status", headers=admin)
    assert report.status_code == 200 and "acted" in report.json()
