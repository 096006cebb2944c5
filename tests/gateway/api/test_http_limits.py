"""Limits before work, on the real gateway: a body is never read for a caller without a valid
key, bodies and headers are bounded, headers must arrive in time, numbers are bounded, unknown
fields are refused — every refusal in OpenAI's envelope."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from gateway.api.http_limits import HEADER_TIMEOUT_S
from tests.deployment import Deployment


def raw(deployment: Deployment, request: bytes,
        timeout: float = 30) -> tuple[int, dict[str, object]]:
    """Send bytes as they are; the status and the JSON body of the answer."""
    port = int(deployment.base_url.rsplit(":", 1)[1].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_no_key_means_no_body_is_read(http: httpx.Client) -> None:
    started = time.monotonic()
    answer = http.post("/v1/batches", content=b"x" * (50 << 20),
                       headers={"content-type": "application/json"})
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    assert time.monotonic() - started < 10  # refused on its headers, not after 50 MB


def test_bodies_are_bounded(http: httpx.Client, deployment: Deployment) -> None:
    auth = {"Authorization": f"Bearer {deployment.api_key}"}
    body = (b'{"endpoint": "/v1/chat/completions", "completion_window": "24h", "x": "'
            + b"y" * (2 << 20) + b'"}')  # over JSON_MAX_BYTES (1 MiB)
    declared = http.post("/v1/webhook_endpoints", content=body,
                         headers={**auth, "content-type": "application/json"})
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "request_too_large"

    def chunked() -> object:  # no Content-Length: cut at the limit while streaming
        yield body

    streamed = http.post("/v1/webhook_endpoints", content=chunked(),  # type: ignore[arg-type]
                         headers={**auth, "content-type": "application/json"})
    assert streamed.status_code == 413

    # a create may carry inline `requests`: it takes what an input file may hold (200 MB),
    # and no more
    inline = http.post("/v1/batches", content=body,
                       headers={**auth, "content-type": "application/json"})
    assert inline.status_code == 400 and inline.json()["error"]["param"] == "x"
    status, answer = raw(deployment, (
        b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + deployment.api_key.encode() + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n{" % (201 << 20)))
    assert status == 413 and answer["error"]["code"] == "request_too_large"  # type: ignore[index]


def test_unknown_fields_and_unbounded_numbers_are_400s(http: httpx.Client,
                                                     deployment: Deployment) -> None:
    auth = {"Authorization": f"Bearer {deployment.api_key}"}
    create = {"input_file_id": "file-x", "endpoint": "/v1/chat/completions",
              "completion_window": "24h"}
    for body, param in (({**create, "surprise": 1}, "surprise"),
                        ({**create, "completion_window": "9" * 5000 + "h"},
                         "completion_window")):
        answer = http.post("/v1/batches", json=body, headers=auth)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param
    far = http.get("/v1/batches/batch_x/output", params={"after": 2**64}, headers=auth)
    assert far.status_code == 400 and far.json()["error"]["param"] == "after"
    rpm = http.post("/admin/api-keys", json={"project": "p", "rpm": 10**30}, headers=auth)
    assert rpm.status_code == 400 and rpm.json()["error"]["param"] == "rpm"


@pytest.mark.parametrize("headers", [
    b"Authorization: Bearer " + b"a" * 100_000 + b"\r\n",
    b"".join(b"X-%d: y\r\n" % i for i in range(10_000)),
])
def test_headers_are_bounded(deployment: Deployment, headers: bytes) -> None:
    status, body = raw(deployment, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    error = body["error"]
    assert status == 431 and isinstance(error, dict)
    assert error["code"] == "request_header_fields_too_large"


def test_headers_must_arrive_in_time(deployment: Deployment) -> None:
    started = time.monotonic()
    status, body = raw(deployment, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n",  # never ends
                       timeout=HEADER_TIMEOUT_S + 20)
    assert status == 408 and body["error"]["code"] == "request_timeout"  # type: ignore[index]
    assert time.monotonic() - started >= HEADER_TIMEOUT_S - 0.5


def test_filenames_are_kept_without_control_characters(deployment: Deployment) -> None:
    name = "report\x00\x1b[31m\u202e" + "é" * 300 + ".jsonl"  # raw, as a hostile client sends
    form = (b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nuser_data\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\""
            + name.encode() + b"\"\r\nContent-Type: application/jsonl\r\n\r\n{}\n\r\n--b--\r\n")
    status, uploaded = raw(deployment, b"POST /v1/files HTTP/1.1\r\nHost: x\r\n"
                           b"Authorization: Bearer " + deployment.api_key.encode() + b"\r\n"
                           b"Content-Type: multipart/form-data; boundary=b\r\n"
                           b"Connection: close\r\n"
                           b"Content-Length: " + str(len(form)).encode() + b"\r\n\r\n" + form)
    assert status == 200, uploaded
    kept = str(uploaded["filename"])
    assert kept.startswith("report[31mé") and len(kept) == 255
    assert not any(ord(c) < 32 or c == "\u202e" for c in kept)
