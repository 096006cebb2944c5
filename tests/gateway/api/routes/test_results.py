"""Partial results while a batch runs on the real engine, paged by cursor, as JSONL and as a
JSON array; Parquet export once it has finished.

Machine-independent: the batch's last line must generate 600 tokens (`min_tokens`), and
once a first result is readable the worker is frozen (SIGSTOP, its engine too) while the
partial page is read, so the batch is still running then on any machine."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from openai import OpenAI

from gateway.api.routes.results import result_type
from tests.batch_flow import create_batch, wait_done
from tests.conftest import chat_line, write_jsonl
from tests.deployment import Deployment, wait_until


@pytest.mark.parametrize(("kind", "line", "typed"), [
    ("output", {"response": {"status_code": 200}}, "succeeded"),
    ("errors", {"response": {"status_code": 400}, "error": None}, "errored"),
    ("errors", {"error": {"code": "batch_cancelled"}}, "cancelled"),
    ("errors", {"error": {"code": "batch_expired"}}, "expired"),
    ("errors", {"error": {"code": "fetch_failed"}}, "errored"),
])
def test_each_line_s_result_is_typed_by_its_file_and_code(
        kind: str, line: dict[str, object], typed: str) -> None:
    assert result_type(kind, line) == typed


def test_lines_so_far_then_all_of_them_exactly_once(
        client: OpenAI, http: httpx.Client, deployment: Deployment, model: str,
        tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {deployment.api_key}"}
    ids = [f"p{i}" for i in range(48)]  # 16 run at once: three waves of results
    batch = create_batch(client, write_jsonl(tmp_path / "in.jsonl", [
        chat_line(cid, model, f"Write about the number {i}.", max_tokens=24) if i < 47 else
        chat_line(cid, model, f"Write about the number {i}.", max_tokens=600, min_tokens=600)
        for i, cid in enumerate(ids)]))
    early = http.get(f"/v1/batches/{batch.id}/output", params={"format": "parquet"},
                     headers=headers)
    assert early.status_code == 409 and early.json()["error"]["param"] == "format"

    collected: list[bytes] = []
    cursor = 0
    complete = False

    def next_page() -> int:
        nonlocal cursor, complete
        fmt = "json" if len(collected) % 2 else "jsonl"  # both shapes share the cursor
        page = http.get(f"/v1/batches/{batch.id}/output", headers=headers,
                        params={"after": cursor, "limit": 10, "format": fmt})
        assert page.status_code == 200, page.text
        lines = ([json.dumps(x).encode() for x in page.json()] if fmt == "json"
                 else page.content.splitlines())
        assert int(page.headers["x-millrace-next-cursor"]) == cursor + len(lines)
        collected.extend(lines)
        cursor += len(lines)
        complete = page.headers["x-millrace-complete"] == "true"
        return len(lines)

    wait_until(next_page, 300, "a first line to be readable", every=0.05)
    with deployment.frozen("worker"):
        assert not complete
        assert client.batches.retrieve(batch.id).status == "in_progress"
        while next_page():  # the rest of what is readable while it runs
            assert not complete
        # the typed results so far: the same lines, every one succeeded
        so_far = http.get(f"/v1/batches/{batch.id}/results", headers=headers,
                          params={"format": "json", "limit": 10_000})
        assert so_far.status_code == 200, so_far.text
        assert [r["custom_id"] for r in so_far.json()] == [
            json.loads(x)["custom_id"] for x in collected]
        assert {r["result"]["type"] for r in so_far.json()} == {"succeeded"}
        assert so_far.headers["x-millrace-next-cursor"] == f"{len(collected)}.0"
        assert so_far.headers["x-millrace-complete"] == "false"
    assert 0 < len(collected) < len(ids)
    wait_until(lambda: next_page() >= 0 and complete, 300, "the output to be complete",
               every=0.1)

    done = wait_done(client, batch.id)
    assert done.status == "completed" and complete
    sealed = client.files.content(done.output_file_id or "").text.splitlines()
    assert [json.loads(x) for x in collected] == [json.loads(x) for x in sealed]
    assert sorted(json.loads(x)["custom_id"] for x in collected) == sorted(ids)
    past_the_end = http.get(f"/v1/batches/{batch.id}/output", headers=headers,
                            params={"after": cursor})
    assert past_the_end.content == b"" and past_the_end.headers["x-millrace-complete"] == "true"
    no_errors = http.get(f"/v1/batches/{batch.id}/output", headers=headers,
                         params={"file": "errors", "format": "json"})
    assert no_errors.json() == [] and no_errors.headers["x-millrace-complete"] == "true"

    exported = http.get(f"/v1/batches/{batch.id}/output", params={"format": "parquet"},
                        headers=headers)
    assert exported.status_code == 200
    assert exported.headers["content-type"] == "application/vnd.apache.parquet"
    table = pq.read_table(io.BytesIO(exported.content)).to_pylist()
    assert sorted(row["custom_id"] for row in table) == sorted(ids)
    assert {row["file"] for row in table} == {"output"}
    assert {row["status_code"] for row in table} == {200}
    by_id = {json.loads(x)["custom_id"]: json.loads(x) for x in sealed}
    for row in table:
        assert json.loads(row["body"]) == by_id[row["custom_id"]]["response"]["body"]


def test_errors_are_pageable_and_exported_too(
        client: OpenAI, http: httpx.Client, deployment: Deployment, model: str,
        tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {deployment.api_key}"}
    batch = create_batch(client, write_jsonl(tmp_path / "in.jsonl", [
        chat_line("fine", model, "Say yes.", max_tokens=2),
        chat_line("bad", model, "Say yes.", max_tokens=2, temperature=-1),
    ]))
    done = wait_done(client, batch.id)
    assert done.request_counts is not None and done.request_counts.failed == 1
    errors = http.get(f"/v1/batches/{batch.id}/output", headers=headers,
                      params={"file": "errors", "format": "json"})
    [line] = errors.json()
    assert line["custom_id"] == "bad" and line["response"]["status_code"] == 400
    table = pq.read_table(io.BytesIO(http.get(
        f"/v1/batches/{batch.id}/output", params={"format": "parquet"},
        headers=headers).content)).to_pylist()
    rows = {row["custom_id"]: row for row in table}
    assert (rows["fine"]["file"], rows["bad"]["file"]) == ("output", "errors")
    assert rows["bad"]["status_code"] == 400
    assert json.loads(rows["bad"]["body"])["error"]["param"] == "temperature"
    other = http.get("/v1/batches/batch_nope/output", headers=headers)
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"

    # typed results, filtered; each beside its input line when asked
    def results(**params: object) -> list[dict[str, object]]:
        page = http.get(f"/v1/batches/{batch.id}/results", headers=headers,
                        params={"format": "json", **params})
        assert page.status_code == 200, page.text
        assert page.headers["x-millrace-complete"] == str(not params.get("limit")).lower()
        rows: list[dict[str, object]] = page.json()
        return rows

    assert [(r["custom_id"], r["result"]["type"]) for r in results()] == [  # type: ignore[index]
        ("fine", "succeeded"), ("bad", "errored")]
    [bad] = results(status="errored")
    assert bad["result"]["response"]["status_code"] == 400  # type: ignore[index]
    assert [r["custom_id"] for r in results(status="succeeded")] == ["fine"]
    assert results(status="cancelled") == [] and results(status="expired") == []
    [fine] = results(custom_id="fine", include_input="true")
    assert fine["input"] == json.loads(chat_line("fine", model, "Say yes.", max_tokens=2))
    # one row a page: the cursor walks the output file, then the error file
    first = http.get(f"/v1/batches/{batch.id}/results", headers=headers, params={"limit": 1})
    assert first.headers["x-millrace-next-cursor"] == "1.0"
    second = http.get(f"/v1/batches/{batch.id}/results", headers=headers,
                      params={"limit": 1, "after": "1.0"})
    assert json.loads(second.content)["custom_id"] == "bad"
    for refused in ({"after": "seven"}, {"status": "failed"}):
        answer = http.get(f"/v1/batches/{batch.id}/results", headers=headers, params=refused)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == next(iter(refused)), answer.text
