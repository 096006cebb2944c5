"""Batches API parameters: windows, metadata, listing over many batches, dry runs, cancel."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.batch_flow import run_batch
from tests.conftest import chat_line
from tests.deployment import Deployment, wait_until


def project_client(deployment: Deployment, http: httpx.Client, project: str) -> OpenAI:
    admin = {"Authorization": f"Bearer {deployment.api_key}"}
    key = http.post("/admin/api-keys", json={"project": project}, headers=admin).json()["key"]
    return OpenAI(base_url=deployment.base_url, api_key=key, max_retries=0)


@pytest.mark.parametrize(("params", "param"), [
    ({"completion_window": "48h"}, "completion_window"),
    ({"completion_window": "soon"}, "completion_window"),
    ({"endpoint": "/v1/images"}, "endpoint"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata"),
])
def test_bad_create_params_are_400_with_param(
    client: OpenAI, params: dict[str, object], param: str
) -> None:
    uploaded = client.files.create(file=("in.jsonl", b"{}\n"), purpose="batch")
    create = {"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions",
              "completion_window": "24h", **params}
    with pytest.raises(openai.BadRequestError) as raised:
        client.batches.create(**create)  # type: ignore[arg-type]
    assert raised.value.status_code == 400
    assert raised.value.body["param"] == param  # type: ignore[index]


def test_input_file_must_have_purpose_batch(client: OpenAI) -> None:
    uploaded = client.files.create(file=("in.jsonl", b"{}\n"), purpose="user_data")
    with pytest.raises(openai.BadRequestError) as raised:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    assert raised.value.body["code"] == "invalid_file_purpose"  # type: ignore[index]


def test_listing_more_than_a_hundred_batches_pages_newest_first(
    deployment: Deployment, http: httpx.Client
) -> None:
    client = project_client(deployment, http, "many-batches")
    empty = client.files.create(file=("empty.jsonl", b"\n"), purpose="batch")
    created = [client.batches.create(input_file_id=empty.id, endpoint="/v1/chat/completions",
                                     completion_window="24h", metadata={"n": str(i)}).id
               for i in range(105)]
    first = client.batches.list(limit=100)
    assert [b.id for b in first.data] == created[::-1][:100]
    assert first.has_more
    rest = client.batches.list(limit=100, after=first.data[-1].id)
    assert [b.id for b in rest.data] == created[::-1][100:]
    assert not rest.has_more
    assert [b.id for b in client.batches.list().data] == created[::-1][:20]  # default 20
    # the SDK's auto-pagination walks every page
    assert [b.id for b in client.batches.list(limit=40)] == created[::-1]
    assert client.batches.retrieve(created[7]).metadata == {"n": "7"}


def test_dry_run_validation_creates_nothing(
    deployment: Deployment, http: httpx.Client, model: str, embedding_model: str
) -> None:
    client = project_client(deployment, http, "dry-run")
    good = client.files.create(file=("g.jsonl", (chat_line("a", model, "x") + "\n").encode()),
                               purpose="batch")
    bad = client.files.create(file=("b.jsonl", b"nope\n" + chat_line("a", model, "x").encode()),
                              purpose="batch")
    headers = {"Authorization": f"Bearer {client.api_key}"}
    # it says what is served: each model with the endpoints its workers advertise
    ok = wait_until(lambda: (r := http.post("/v1/batches/validate", headers=headers,
                                            json={"input_file_id": good.id}).json())
                    and all(r["served"].values()) and r, 30, "the workers on the board")
    # and what admission at create would find (no max_tokens: the default 256 counts)
    estimate = ok.pop("estimate")
    assert (estimate["model"], estimate["max_output_tokens"]) == (model, 256), estimate
    assert 1 + 4 <= estimate["prompt_tokens"] < 20, estimate  # "x", and the chat template's
    assert ok == {"valid": True, "total": 1, "errors": [], "served": {
        model: ["/v1/chat/completions", "/v1/completions", "/v1/responses"],
        embedding_model: ["/pooling", "/rerank", "/score", "/v1/embeddings", "/v1/rerank",
                          "/v1/score", "/v2/rerank"]}}
    # an endpoint no served model answers: refused, for the dry run and for a batch alike
    for route, window in (("/v1/batches/validate", {}), ("/v1/batches",
                                                         {"completion_window": "24h"})):
        unserved = http.post(route, headers=headers, json={
            "input_file_id": good.id, "endpoint": "/classify", **window})
        assert unserved.status_code == 400, unserved.text
        assert unserved.json()["error"]["param"] == "endpoint"
        assert "/v1/responses" in unserved.json()["error"]["message"]
    failed = http.post("/v1/batches/validate", json={"input_file_id": bad.id}, headers=headers)
    body = failed.json()
    assert (body["valid"], body["total"]) == (False, 2)
    assert [(e["line"], e["code"]) for e in body["errors"]] == [(1, "invalid_json_line")]
    uploaded = http.post("/v1/batches/validate", headers=headers, data={
        "endpoint": "/v1/completions"}, files={"file": ("x.jsonl", b"\n" + chat_line(
            "a", model, "x").encode() + b"\n")})
    assert uploaded.status_code == 200
    assert [(e["line"], e["code"]) for e in uploaded.json()["errors"]] == [(2, "url_mismatch")]
    assert uploaded.json()["estimate"] is None  # no valid line: nothing to estimate
    counted = http.post("/v1/batches/validate", headers=headers, files={
        "file": ("x.jsonl", chat_line("a", model, "x"))}, data={"priority": "-5"})
    assert counted.json()["estimate"]["prompt_tokens"] == estimate["prompt_tokens"]
    bad_priority = http.post("/v1/batches/validate", headers=headers, data={
        "priority": "urgent"}, files={"file": ("x.jsonl", chat_line("a", model, "x"))})
    assert bad_priority.status_code == 400 and bad_priority.json()["error"]["param"] == "priority"
    missing = http.post("/v1/batches/validate", json={}, headers=headers)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "input_file_id"
    assert client.batches.list().data == []
    assert [f.id for f in client.files.list()] == [bad.id, good.id]  # validating stored none


def test_more_lines_than_the_limit_fails_with_too_many_requests(
    client: OpenAI, model: str, tmp_path: Path
) -> None:
    template = chat_line("{}", model, "x")
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(template.replace('"{}"', f'"{i}"') for i in range(50_001)))
    batch, _ = run_batch(client, path, timeout=120)
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data is not None
    assert [(e.line, e.code) for e in batch.errors.data] == [(50_001, "too_many_requests")]
    assert batch.request_counts is not None and batch.request_counts.total == 0


def test_cancel_of_unknown_or_finished_batches(
    client: OpenAI, deployment: Deployment, http: httpx.Client
) -> None:
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_nope")
    empty = client.files.create(file=("empty.jsonl", b"\n"), purpose="batch")
    batch = client.batches.create(input_file_id=empty.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    from tests.deployment import wait_until

    wait_until(lambda: client.batches.retrieve(batch.id).status == "failed", 30,
               "validation to fail")
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)
