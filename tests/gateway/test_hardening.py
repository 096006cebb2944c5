"""Hardening: one project's slow or hostile input server delays only its own batches; the
defaults a standalone gateway runs with refuse every internal address for fetches and
webhooks, and say the same whatever is there; a forged response changes nothing; the
security headers, the API keys that name two callers, pre-signed URLs and a hostile Host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from confluent_kafka import Consumer, Producer
from prometheus_client.parser import text_string_to_metric_families

from millrace.records import ResponseRecord
from millrace.settings import Settings
from ops.embedded import die_with_parent, free_port
from ops.launcher import Launcher
from tests.conftest import FETCH_TIMEOUT_S, chat_line
from tests.deployment import Deployment, wait_until
from tests.website import serving

CHAT = "/v1/chat/completions"


@dataclass
class Drip:
    """An HTTP server that promises a body and sends it one byte a second, for ever."""

    url: str
    connected: threading.Event = field(default_factory=threading.Event)
    hung_up: threading.Event = field(default_factory=threading.Event)  # by the fetcher


@contextmanager
def dripping() -> Iterator[Drip]:
    listener = socket.create_server(("127.0.0.1", 0))
    drip = Drip(f"http://127.0.0.1:{listener.getsockname()[1]}/in.jsonl")
    stop = threading.Event()

    def serve() -> None:
        with listener:
            listener.settimeout(0.2)
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=drip_to, args=(conn,), daemon=True).start()

    def drip_to(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            drip.connected.set()
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
                while not stop.wait(1.0):
                    conn.sendall(b"{")
            except OSError:
                drip.hung_up.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield drip
    finally:
        stop.set()
        thread.join(5)


def project_key(http: httpx.Client, deployment: Deployment, project: str) -> dict[str, str]:
    made = http.post("/admin/api-keys", json={"project": project},
                     headers={"Authorization": f"Bearer {deployment.api_key}"})
    return {"Authorization": f"Bearer {made.json()['key']}"}


def test_a_dripping_input_server_delays_only_its_own_project(
        deployment: Deployment, http: httpx.Client, model: str) -> None:
    slow, other = (project_key(http, deployment, f"{name}-{uuid.uuid4().hex[:6]}")
                   for name in ("drip", "busy"))
    files = [http.post("/v1/files", headers=other, data={"purpose": "batch"}, files={
        "file": ("in.jsonl", chat_line(f"b{i}", model, "Hi.", max_tokens=1).encode())}
    ).json()["id"] for i in range(8)]
    with dripping() as drip:
        held = http.post("/v1/batches", headers=slow, json={
            "input_file_url": drip.url, "endpoint": CHAT, "completion_window": "24h"}).json()
        assert drip.connected.wait(30), "the gateway never fetched"
        left: dict[str, float] = {}
        created = {}
        for file_id in files:
            batch = http.post("/v1/batches", headers=other, json={
                "input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}).json()
            created[batch["id"]] = time.monotonic()

        def all_left() -> bool:
            for batch_id, at in created.items():
                if batch_id not in left and http.get(
                        f"/v1/batches/{batch_id}", headers=other).json()["status"] != "validating":
                    left[batch_id] = time.monotonic() - at
            return len(left) == len(created)

        wait_until(all_left, 60, "the other project's batches to leave validating")
        assert not drip.hung_up.is_set(), "the drip fetch ended before the others went on"
        assert max(left.values()) < 2.0, left
        failed = wait_until(lambda: (b := http.get(f"/v1/batches/{held['id']}", headers=slow)
                                     .json())["status"] == "failed" and b,
                            FETCH_TIMEOUT_S + 60, "the drip batch to fail at its deadline")
        assert drip.hung_up.wait(10), "the fetcher never hung up on the drip"
    [error] = failed["errors"]["data"]
    assert (error["code"], error["param"]) == ("fetch_failed", "input_file_url")
    assert error["message"].endswith(f"{drip.url}: could not fetch (timed out)")
    elapsed = failed["failed_at"] - failed["created_at"]
    assert FETCH_TIMEOUT_S - 1 <= elapsed <= FETCH_TIMEOUT_S + 30, elapsed
    # what was fetched of it is nowhere
    assert http.get(f"/v1/files/{failed['input_file_id']}", headers=slow).status_code == 404
    assert http.get("/v1/files", headers=slow).json()["data"] == []


def test_a_fetched_page_that_is_no_batch_is_not_kept(
        deployment: Deployment, http: httpx.Client) -> None:
    key = project_key(http, deployment, f"page-{uuid.uuid4().hex[:6]}")
    with serving({"/admin": b"<html>internal dashboard</html>"}) as site:
        made = http.post("/v1/batches", headers=key, json={
            "input_file_url": f"{site.url}/admin", "endpoint": CHAT,
            "completion_window": "24h"}).json()
        failed = wait_until(lambda: (b := http.get(f"/v1/batches/{made['id']}", headers=key)
                                     .json())["status"] == "failed" and b, 60, "validation")
    assert failed["errors"]["data"][0]["code"] == "invalid_json_line"
    assert http.get(f"/v1/files/{made['input_file_id']}/content",
                    headers=key).status_code == 404
    assert http.get("/v1/files", headers=key).json()["data"] == []


# --- the defaults of a standalone gateway -------------------------------------------------
def test_only_the_local_up_allows_loopback_and_says_so(deployment: Deployment) -> None:
    assert "webhooks and fetched URLs may reach loopback addresses" in deployment.ready_line
    assert Settings().webhook_allow == ""  # any service started alone
    local = Launcher(Settings())
    assert "loopback" in local._local_targets() and local.settings.webhook_allow == "loopback"
    chosen = Launcher(Settings(webhook_allow=""))  # MILLRACE_WEBHOOK_ALLOW= given to `up`
    assert chosen._local_targets() == "" and chosen.settings.webhook_allow == ""



@contextmanager
def standalone_gateway(deployment: Deployment, tmp_path: Path) -> Iterator[tuple[str, str,
                                                                                  str]]:
    """`millrace gateway` with nothing but where Kafka and Redis are (and a key): its own
    topics and keys, so the jobs it takes are its own. Yields its URL, key and prefix."""
    port, key, prefix = free_port(), "sk-mr-" + uuid.uuid4().hex, f"alone{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MILLRACE_")}
    env.update({"MILLRACE_KAFKA__BOOTSTRAP": str(deployment.endpoints["kafka_bootstrap"]),
                "MILLRACE_REDIS_URL": str(deployment.endpoints["redis_url"]),
                "MILLRACE_TOPIC_PREFIX": prefix, "MILLRACE_DATA_DIR": str(tmp_path),
                "MILLRACE_PORT": str(port), "MILLRACE_API_KEY": key,
                "MILLRACE_WEBHOOK_SIGNING_KEY": uuid.uuid4().hex})
    proc = subprocess.Popen([sys.executable, "-m", "ops", "gateway"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=die_with_parent)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 120, "the standalone gateway")
        yield url, key, prefix
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


@contextmanager
def unauthorized() -> Iterator[int]:
    """A local HTTP service that answers 401 to everything."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(401)
            self.send_header("content-length", "0")
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def internal_urls(redis_port: int, http_401: int) -> list[str]:
    """Each internal form, at a closed port, Redis and a service answering 401."""
    urls = ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/in.jsonl"]
    for port in (free_port(), redis_port, http_401):
        urls += [f"http://{host}:{port}/in.jsonl" for host in (
            "127.0.0.1", "localhost", "[::1]", "0.0.0.0", "[::ffff:127.0.0.1]", "2130706433",
            "127.1")]
    return urls


def same_text(messages: dict[str, str]) -> set[str]:
    """The messages with each one's own URL and host taken out."""
    return {m.replace(url, "URL").replace(str(urlsplit(url).hostname), "HOST")
            for url, m in messages.items()}


def test_a_standalone_gateway_refuses_internal_addresses_alike(
        deployment: Deployment, tmp_path: Path, model: str) -> None:
    redis_port = urlsplit(str(deployment.endpoints["redis_url"])).port
    assert redis_port is not None
    with standalone_gateway(deployment, tmp_path) as (url, key, prefix), \
            unauthorized() as http_401, httpx.Client(base_url=url, timeout=30, headers={
                "Authorization": f"Bearer {key}"}) as api:
        urls = internal_urls(redis_port, http_401)
        uploaded = api.post("/v1/files", data={"purpose": "batch"}, files={
            "file": ("in.jsonl", chat_line("a", model, "Hi.").encode())}).json()["id"]
        as_input, as_webhook, as_endpoint = {}, {}, {}
        for target in urls:
            refused = api.post("/v1/batches", json={
                "input_file_url": target, "endpoint": CHAT, "completion_window": "24h"})
            assert refused.status_code == 400, (target, refused.text)
            as_input[target] = refused.json()["error"]["message"]
            refused = api.post("/v1/batches", json={
                "input_file_id": uploaded, "endpoint": CHAT, "completion_window": "24h",
                "webhook_url": target})
            assert refused.status_code == 400, (target, refused.text)
            as_webhook[target] = refused.json()["error"]["message"]
            refused = api.post("/v1/webhook_endpoints", json={"url": target})
            assert refused.status_code == 400, (target, refused.text)
            as_endpoint[target] = refused.json()["error"]["message"]
        for said in (as_input, as_webhook, as_endpoint):
            [text] = same_text(said)
            assert "address not allowed" in text
        # nothing was stored: the one upload is the project's only file, and no batch exists
        assert [f["id"] for f in api.get("/v1/files").json()["data"]] == [uploaded]
        assert api.get("/v1/batches").json()["data"] == []

        # link parts: the explode fetches none of them; each line gets the same error
        lines = [json.dumps({"custom_id": f"l{i}", "method": "POST", "url": CHAT, "body": {
            "model": model, "messages": [{"role": "user", "content": [
                {"type": "link", "url": target}]}]}}) for i, target in enumerate(urls)]
        linked = api.post("/v1/files", data={"purpose": "batch"}, files={
            "file": ("links.jsonl", "\n".join(lines).encode())}).json()["id"]
        batch = api.post("/v1/batches", json={"input_file_id": linked, "endpoint": CHAT,
                                              "completion_window": "24h"}).json()
        errors = {urls[int(r.custom_id[1:])]: r for r in responses_of(
            deployment, f"{prefix}.responses", batch["id"], len(urls))}
    assert all(r.error is not None and r.error.code == "fetch_failed" for r in errors.values())
    [text] = same_text({u: r.error.message for u, r in errors.items() if r.error})
    assert text == "URL: could not fetch (address not allowed)"


def responses_of(deployment: Deployment, topic: str, batch_id: str, want: int
                 ) -> list[ResponseRecord]:
    consumer = Consumer({"bootstrap.servers": deployment.endpoints["kafka_bootstrap"],
                         "group.id": f"test-{uuid.uuid4().hex}", "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    found: dict[str, ResponseRecord] = {}
    try:
        def enough() -> bool:
            for msg in consumer.consume(100, 0.2):
                if msg.error() is None and msg.key() == batch_id.encode():
                    record = ResponseRecord.model_validate_json(msg.value() or b"")
                    found[record.custom_id] = record
            return len(found) >= want

        wait_until(enough, 120, f"{want} error lines of {batch_id}", every=0)
    finally:
        consumer.close()
    return list(found.values())


# --- a forged response ---------------------------------------------------------------------
def refused_responses(deployment: Deployment) -> float:
    urls = deployment.endpoints["metrics"]
    assert isinstance(urls, dict)
    text = httpx.get(str(urls["sink"]), timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == "millrace_records_refused_total"
               and s.labels.get("topic") == "responses")


def test_a_forged_response_reaches_no_file_and_no_count(
        deployment: Deployment, http: httpx.Client, model: str) -> None:
    """Someone who can write the responses topic, and knows a running stream batch's id,
    writes results for it: none is taken; the batch completes with its real line only."""
    key = project_key(http, deployment, f"forged-{uuid.uuid4().hex[:6]}")
    opened = http.post("/v1/batches", headers=key, json={
        "input": "stream", "endpoint": CHAT, "completion_window": "24h"}).json()
    batch_id, before = opened["id"], refused_responses(deployment)
    prefix = deployment.endpoints["topic_prefix"]
    producer = Producer({"bootstrap.servers": deployment.endpoints["kafka_bootstrap"]})
    forged = [ResponseRecord(batch_id=batch_id, project=project, custom_id=custom_id,
                             line=line, id="batch_req_x", request_id="req_x", status_code=200,
                             body={"usage": {"prompt_tokens": 1, "completion_tokens": 10**6}},
                             ticket=ticket)
              for project, custom_id, line, ticket in (
                  ("someone", "x1", 1, None),  # no ticket
                  ("someone", "x2", 2, "0" * 32),  # a made-up one
                  ("other-project", "x3", 1, None))]
    for record in forged:
        producer.produce(f"{prefix}.responses", record.dumps(), key=batch_id)
    assert producer.flush(30) == 0
    wait_until(lambda: refused_responses(deployment) - before >= 3, 60,
               "the sink to refuse the forged responses")
    # the batch's real line, with its token, then the seal
    producer.produce(f"{prefix}.ingest", chat_line("real", model, "Say ok.", max_tokens=2),
                     key=batch_id, headers={"millrace-ingest-token": opened["ingest_token"]})
    assert producer.flush(30) == 0
    assert http.post(f"/v1/batches/{batch_id}/seal", headers=key,
                     json={"total": 1}).status_code == 200
    done = wait_until(lambda: (b := http.get(f"/v1/batches/{batch_id}", headers=key).json())[
        "status"] == "completed" and b, 300, "the stream batch")
    assert done["request_counts"] == {"total": 1, "completed": 1, "failed": 0}
    assert done["usage"]["output_tokens"] <= 2
    output = http.get(f"/v1/files/{done['output_file_id']}/content", headers=key).text
    assert [json.loads(x)["custom_id"] for x in output.splitlines()] == ["real"]


# --- headers, keys, pre-signed URLs --------------------------------------------------------
def test_every_answer_carries_the_security_headers(http: httpx.Client,
                                                   deployment: Deployment) -> None:
    key = {"Authorization": f"Bearer {deployment.api_key}"}
    for path, headers in (("/v1/models", key), ("/v1/models", {}), ("/dashboard", {}),
                          ("/docs", {}), ("/redoc", {}), ("/dashboard/static/dashboard.js", {})):
        answer = http.get(path, headers=headers)
        csp = answer.headers["content-security-policy"]
        assert "script-src 'self';" in csp and "frame-ancestors 'none'" in csp, path
        assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert answer.headers["x-frame-options"] == "DENY"
    for page in ("/docs", "/redoc"):  # their scripts are ours, served from here
        html = http.get(page).text
        assert "cdn" not in html and "<script>" not in html
        for src in (part.split('"')[0] for part in html.split('src="')[1:]):
            assert src.startswith("/") and http.get(src).status_code == 200, src


@pytest.mark.parametrize("headers", [
    [("authorization", "Bearer KEY"), ("x-api-key", "sk-mr-other")],
    [("x-api-key", "KEY"), ("x-api-key", "sk-mr-other")],
    [("x-api-key", "KEY"), ("x-api-key", "KEY")],
    [("authorization", "Bearer KEY"), ("authorization", "Bearer KEY")],
])
def test_a_request_that_names_two_keys_is_refused(
        http: httpx.Client, deployment: Deployment, headers: list[tuple[str, str]]) -> None:
    sent = [(k, v.replace("KEY", deployment.api_key)) for k, v in headers]
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/files")):  # before a body too
        answer = http.request(method, path, headers=sent)
        assert answer.status_code == 401, (method, answer.text)
        assert answer.json()["error"]["code"] == "invalid_api_key"
        assert "one API key" in answer.json()["error"]["message"] or (
            "different API keys" in answer.json()["error"]["message"])
    same = [("authorization", f"Bearer {deployment.api_key}"), ("x-api-key", deployment.api_key)]
    assert http.get("/v1/models", headers=same).status_code == 200


def test_a_presigned_url_is_built_on_the_deployment_address_not_the_host_header(
        http: httpx.Client, deployment: Deployment) -> None:
    key = {"Authorization": f"Bearer {deployment.api_key}"}
    file_id = http.post("/v1/files", headers=key, data={"purpose": "batch"},
                        files={"file": ("a.jsonl", b"{}\n")}).json()["id"]
    signed = http.get(f"/v1/files/{file_id}/url",
                      headers={**key, "host": "attacker.example"}).json()["url"]
    assert urlsplit(signed).netloc == urlsplit(deployment.base_url).netloc
    assert httpx.get(signed).content == b"{}\n"
