"""PromptLoop's v0 API (seed 000), driven by a plain HTTP client as its users write one, on the
real engine: tasks, data rows, validation, launch, status, results, link inputs, limits and
the webhook with the rows."""

from __future__ import annotations

import json

import httpx
import pytest
from standardwebhooks import Webhook

from tests.deployment import Deployment, wait_until
from tests.receiver import receiving
from tests.website import serving

TERMINAL = {"completed", "failed"}


def mint(deployment: Deployment, http: httpx.Client, project: str) -> dict[str, str]:
    admin = {"Authorization": f"Bearer {deployment.api_key}"}
    minted = http.post("/admin/api-keys", json={"project": project}, headers=admin).json()
    return {"x-api-key": minted["key"], "_id": minted["id"]}


def key_headers(minted: dict[str, str]) -> dict[str, str]:
    return {"x-api-key": minted["x-api-key"]}


@pytest.fixture(scope="module")
def team(deployment: Deployment, http: httpx.Client) -> dict[str, str]:
    return key_headers(mint(deployment, http, "promptloop-team"))


@pytest.fixture(scope="module")
def task(http: httpx.Client, team: dict[str, str]) -> dict[str, object]:
    response = http.post("/v0/tasks", headers=team, json={
        "name": "describe",
        "instructions": "Describe the product for a catalogue.",
        "inputs": [{"name": "product", "type": "string"}, {"name": "color", "type": "string"}],
        "outputs": [{"name": "headline", "type": "string", "description": "a short title"},
                    {"name": "in_stock", "type": "boolean"}],
        "max_tokens": 96,
    })
    assert response.status_code == 200, response.text
    return dict(response.json())


def jsonl(rows: list[object]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def finished_job(http: httpx.Client, headers: dict[str, str], job_id: str) -> dict[str, object]:
    def done() -> dict[str, object] | None:
        job = http.get(f"/v0/job-status/{job_id}", headers=headers).json()
        return job if job["status"] in TERMINAL else None
    return wait_until(done, 600, f"job {job_id}", every=0.5)


def test_a_task_runs_over_twenty_rows_and_answers_its_output_fields(
    http: httpx.Client, team: dict[str, str], task: dict[str, object]
) -> None:
    colors = ["red", "blue", "green", "black"]
    rows = [{"data_uuid": f"u{i}", "inputs": [f"mug {i}", colors[i % 4]]} for i in range(20)]
    launched = http.post(f"/v0/launch-job?task_id={task['id']}&name=mugs", headers={
        **team, "content-type": "application/jsonl"}, content=jsonl(rows))
    assert launched.status_code == 200, launched.text
    assert launched.json()["rows"] == 20 and launched.json()["job_id"].startswith("batch_")

    job = finished_job(http, team, launched.json()["job_id"])
    assert job["status"] == "completed" and job["millrace_status"] == "completed"
    assert job["progress"] == {"total": 20, "completed": 20, "failed": 0}
    assert (job["name"], job["task_id"], job["task_version"]) == ("mugs", task["id"], 1)

    results = http.get(f"/v0/batch/{job['id']}/results", headers=team).json()
    assert sorted(r["data_uuid"] for r in results) == sorted(r["data_uuid"] for r in rows)
    for row in results:  # exactly the task's fields, typed as declared (structured outputs)
        assert set(row) == {"data_uuid", "headline", "in_stock"}, row
        assert isinstance(row["headline"], str) and isinstance(row["in_stock"], bool)

    streamed = http.get(f"/v0/batches/{job['id']}/results?output_type=stream", headers=team)
    assert streamed.headers["content-type"].startswith("application/jsonl")
    lines = [json.loads(x) for x in streamed.text.splitlines()]
    assert sorted(lines, key=lambda r: r["data_uuid"]) == sorted(
        results, key=lambda r: r["data_uuid"])


def test_one_row_runs_now_and_a_new_version_is_kept_apart(
    http: httpx.Client, team: dict[str, str], task: dict[str, object]
) -> None:
    answer = http.post(f"/v0/tasks/{task['id']}", headers=team,
                       json={"inputs": ["teapot", "white"], "data_uuid": "t1"})
    assert answer.status_code == 200, answer.text
    row = answer.json()
    assert row["data_uuid"] == "t1" and isinstance(row["in_stock"], bool)
    assert row["usage"]["completion_tokens"] > 0

    changed = http.put(f"/v0/tasks/{task['id']}", headers=team, json={
        "name": "describe", "instructions": "Name the product.",
        "inputs": [{"name": "product"}], "outputs": [{"name": "name"}]}).json()
    assert changed["version"] == 2
    assert http.get(f"/v0/tasks/{task['id']}?version=1", headers=team).json() == {
        **task, "updated_at": task["updated_at"]}
    # rows for version 2 have one input; the job records the version it ran with
    launched = http.post(f"/v0/launch-job?task_id={task['id']}", headers=team,
                         content=jsonl([{"data_uuid": "a", "inputs": ["kettle"]}])).json()
    job = finished_job(http, team, launched["job_id"])
    assert job["task_version"] == 2
    renamed = http.put(f"/v0/batches/{job['id']}", headers=team,
                       json={"name": "kettles", "metadata": {"team": "kitchen"}})
    assert renamed.status_code == 200, renamed.text
    assert (renamed.json()["name"], renamed.json()["metadata"]) == ("kettles", {"team": "kitchen"})
    assert http.get(f"/v0/batches/{job['id']}", headers=team).json()["name"] == "kettles"
    too_many = {f"k{i}": "v" for i in range(17)}
    assert http.put(f"/v0/batches/{job['id']}", headers=team,
                    json={"metadata": too_many}).status_code == 400
    http.put(f"/v0/tasks/{task['id']}", headers=team, json={  # back as it was for the others
        k: task[k] for k in ("name", "instructions", "inputs", "outputs", "max_tokens")})


def test_bad_rows_get_a_400_listing_each_and_nothing_is_launched(
    http: httpx.Client, team: dict[str, str], task: dict[str, object]
) -> None:
    bad = b"\n".join([
        json.dumps({"data_uuid": "ok", "inputs": ["a", "b"]}).encode(),
        b"{not json",
        json.dumps({"inputs": ["a", "b"]}).encode(),
        json.dumps({"data_uuid": "ok", "inputs": ["a", "b"]}).encode(),
        json.dumps({"data_uuid": "many", "inputs": ["a", "b", "c"]}).encode(),
        json.dumps({"data_uuid": "few", "inputs": ["a"]}).encode(),
        json.dumps({"data_uuid": "typed", "inputs": [{"x": 1}, "b"]}).encode(),
    ])
    checked = http.post(f"/v0/batches/validate-data?task_id={task['id']}", headers=team,
                        content=bad)
    assert checked.status_code == 400
    body = checked.json()
    assert body["error"]["code"] == "invalid_data" and body["valid"] is False
    assert [(e["line"], e["data_uuid"], e["code"]) for e in body["errors"]] == [
        (2, None, "invalid_json_line"), (3, None, "missing_data_uuid"),
        (4, "ok", "duplicate_data_uuid"), (5, "many", "too_many_inputs"),
        (6, "few", "too_few_inputs"), (7, "typed", "incorrect_input_type")]
    assert body["errors"][3]["message"].startswith("Too many inputs")

    before = len(http.get("/v0/batches", headers=team).json())
    refused = http.post(f"/v0/launch-job?task_id={task['id']}", headers=team, content=bad)
    assert refused.status_code == 400 and len(refused.json()["errors"]) == 6
    assert len(http.get("/v0/batches", headers=team).json()) == before

    good = http.post(f"/v0/batches/validate-data?task_id={task['id']}", headers=team,
                     files={"file": ("rows.jsonl", bad.split(b"\n")[0])})
    assert (good.status_code, good.json()) == (200, {"valid": True, "rows": 1})
    assert http.post("/v0/batches/validate-data?task_id=task_nope", headers=team,
                     content=bad).status_code == 404


PAGES = {"/a": b"<html><head><script>var x=1;</script></head><body><h1>Blue kettle</h1>"
               b"<p>Holds two litres.</p></body></html>",
         "/b": b"<html><body><p>A red teapot for four cups.</p></body></html>"}


def test_link_inputs_are_fetched_once_per_job_and_a_missing_page_fails_its_row(
    deployment: Deployment, http: httpx.Client, team: dict[str, str]
) -> None:
    task = http.post("/v0/tasks", headers=team, json={
        "name": "summarise a page", "instructions": "Summarise the page.",
        "inputs": [{"name": "page", "type": "link"}],
        "outputs": [{"name": "summary", "max_length": 100}], "max_tokens": 96}).json()
    not_a_link = http.post(f"/v0/batches/validate-data?task_id={task['id']}", headers=team,
                           content=jsonl([{"data_uuid": "x", "inputs": ["kettle"]}]))
    assert not_a_link.json()["errors"][0]["message"].startswith("Incorrect input type")

    with serving(PAGES) as web, receiving() as receiver:
        site = web.url
        rows = [{"data_uuid": "a1", "inputs": [f"{site}/a"]},
                {"data_uuid": "a2", "inputs": [f"{site}/a"]},
                {"data_uuid": "b", "inputs": [f"{site}/b"]},
                {"data_uuid": "gone", "inputs": [f"{site}/gone"]}]
        launched = http.post(f"/v0/launch-job?task_id={task['id']}&webhook_url={receiver.url}",
                             headers=team, content=jsonl(rows)).json()
        job = finished_job(http, team, launched["job_id"])
        hook = receiver.wait_for(1, 120)[0]
    assert web.hits == {"/a": 1, "/b": 1, "/gone": 1}  # one fetch per URL per job
    results = {r["data_uuid"]: r for r in http.get(
        f"/v0/batch/{job['id']}/results", headers=team).json()}
    assert results["gone"]["error"]["code"] == "fetch_failed"
    assert "HTTP 404" in results["gone"]["error"]["message"]
    assert all(isinstance(results[u]["summary"], str) for u in ("a1", "a2", "b")), results
    assert job["progress"] == {"total": 4, "completed": 3, "failed": 1}

    # PromptLoop's webhook: the rows themselves, signed with the project's secret
    secret = http.get("/v1/webhook_secret", headers=team).json()["secret"]
    payload = Webhook(secret).verify(hook.body, hook.headers)
    assert payload["job_id"] == job["id"] and payload["status"] == job["status"] == "completed"
    assert sorted(r["data_uuid"] for r in payload["data"]) == ["a1", "a2", "b", "gone"]


def test_each_route_has_its_per_minute_limit_and_a_key_can_be_given_more(
    deployment: Deployment, http: httpx.Client, task: dict[str, object]
) -> None:
    minted = mint(deployment, http, "promptloop-team")
    headers = key_headers(minted)

    def fresh_minute() -> bool | None:  # the window is a clock minute: start early in one
        reset = http.get("/v0/tasks", headers=headers).headers["x-ratelimit-reset"]
        return int(reset) >= 20 or None
    wait_until(fresh_minute, 30, "a minute with 20 s left", every=2)
    first = http.post(f"/v0/tasks/{task['id']}", headers=headers, json={"inputs": []})
    # answers within the budget carry it (a bad row is answered, and counted)
    assert first.status_code == 400
    assert (first.headers["x-ratelimit-limit"], first.headers["x-ratelimit-remaining"]) == (
        "5", "4")
    for _ in range(4):
        assert http.post(f"/v0/tasks/{task['id']}", headers=headers,
                         json={"inputs": []}).status_code == 400
    limited = http.post(f"/v0/tasks/{task['id']}", headers=headers, json={"inputs": []})
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert 0 < int(limited.headers["retry-after"]) <= 60
    # another route has its own budget
    assert http.get("/v0/tasks", headers=headers).headers["x-ratelimit-limit"] == "20"

    admin = {"Authorization": f"Bearer {deployment.api_key}"}
    raised = http.patch(f"/admin/api-keys/{minted['_id']}", headers=admin,
                        json={"routes": {"POST /v0/tasks/{id}": 100}})
    assert raised.status_code == 200, raised.text

    def allowed() -> bool:
        return http.post(f"/v0/tasks/{task['id']}", headers=headers,
                         json={"inputs": []}).status_code == 400
    wait_until(allowed, 10, "the raised limit to apply")
    assert http.patch("/admin/api-keys/" + "0" * 64, headers=admin,
                      json={"rpm": 1}).status_code == 404
