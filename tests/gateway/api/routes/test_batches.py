"""The OpenAI SDK flow end to end on the real deployment (real vLLM inference)."""

from __future__ import annotations

from pathlib import Path

import httpx
from openai import OpenAI

from tests.batch_flow import ORDER, read_lines, run_batch
from tests.conftest import chat_line, write_jsonl


def test_five_chat_lines_complete_with_real_model_text(
    client: OpenAI, model: str, tmp_path: Path
) -> None:
    ids = [f"req-{i}" for i in range(5)]
    questions = ["What is the capital of France?", "Name a colour.", "Say hello.",
                 "What is 2 + 2?", "Name an animal."]
    path = write_jsonl(tmp_path / "in.jsonl", [
        chat_line(cid, model, q, max_tokens=24, temperature=0)
        for cid, q in zip(ids, questions, strict=True)
    ])

    batch, seen = run_batch(client, path)

    assert batch.status == "completed"
    assert seen == [s for s in ORDER if s in seen], f"statuses out of order: {seen}"
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (5, 5, 0)
    assert batch.error_file_id is None
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    lines = read_lines(client, batch.output_file_id)
    assert sorted(line.custom_id for line in lines) == sorted(ids)
    prompt_total = completion_total = 0
    for line in lines:
        assert line.error is None and line.response is not None
        assert line.response.status_code == 200 and line.response.request_id
        body = line.response.body
        assert body["object"] == "chat.completion" and body["model"] == model
        text = body["choices"][0]["message"]["content"]
        assert isinstance(text, str) and text.strip()
        usage = body["usage"]
        assert usage["prompt_tokens"] > 5  # the chat template wraps every question
        assert 0 < usage["completion_tokens"] <= 24
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        prompt_total += usage["prompt_tokens"]
        completion_total += usage["completion_tokens"]
    assert batch.usage is not None
    assert (batch.usage.input_tokens, batch.usage.output_tokens) == (prompt_total,
                                                                      completion_total)
    france = next(line for line in lines if line.custom_id == "req-0")
    assert france.response is not None
    assert "Paris" in france.response.body["choices"][0]["message"]["content"]


def test_engine_rejections_are_line_errors_not_crashes(
    client: OpenAI, model: str, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [
        chat_line("good-1", model, "Say yes.", max_tokens=4),
        chat_line("bad-param", model, "Say yes.", max_tokens=4, temperature=-1),
        chat_line("too-long", model, "hello " * 9000, max_tokens=4),
        chat_line("good-2", model, "Say no.", max_tokens=4),
    ])

    batch, _ = run_batch(client, path)

    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 2)
    output = read_lines(client, batch.output_file_id)
    errors = {line.custom_id: line for line in read_lines(client, batch.error_file_id)}
    assert sorted(line.custom_id for line in output) == ["good-1", "good-2"]
    assert set(errors) == {"bad-param", "too-long"}
    bad_param = errors["bad-param"].response
    assert bad_param is not None and bad_param.status_code == 400
    assert bad_param.body["error"]["param"] == "temperature"
    too_long = errors["too-long"].response
    assert too_long is not None and too_long.status_code == 400
    assert "context length" in too_long.body["error"]["message"]


def test_a_batch_whose_every_line_failed_completes_without_output(
    client: OpenAI, model: str, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [
        chat_line(f"bad-{i}", model, "x", temperature=-1) for i in range(2)])
    batch, _ = run_batch(client, path)
    assert batch.status == "completed"
    assert batch.request_counts is not None and batch.request_counts.failed == 2
    assert batch.output_file_id is None
    assert len(read_lines(client, batch.error_file_id)) == 2


def test_unknown_and_mixed_models_fail_validation(
    client: OpenAI, model: str, embedding_model: str, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [
        chat_line("a", model, "x"),
        chat_line("b", "no-such-model", "x"),
        chat_line("c", embedding_model, "x"),
    ])
    batch, _ = run_batch(client, path, timeout=60)
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data is not None
    assert [(e.line, e.code, e.param) for e in batch.errors.data] == [
        (2, "model_not_found", "body.model"), (3, "model_mismatch", "body.model")]


def test_completions_endpoint_runs_prompts(client: OpenAI, model: str, tmp_path: Path) -> None:
    import json

    path = write_jsonl(tmp_path / "in.jsonl", [json.dumps({
        "custom_id": "c1", "method": "POST", "url": "/v1/completions",
        "body": {"model": model, "prompt": "The capital of France is", "max_tokens": 8,
                 "temperature": 0},
    })])

    batch, _ = run_batch(client, path, endpoint="/v1/completions")

    assert batch.status == "completed"
    [line] = read_lines(client, batch.output_file_id)
    assert line.response is not None
    assert line.response.body["object"] == "text_completion"
    assert "Paris" in line.response.body["choices"][0]["text"]


def test_bad_lines_fail_the_batch_with_line_errors(
    client: OpenAI, model: str, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [
        chat_line("ok", model, "hi"),
        "this is not json",
        '{"method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}',
        '{"custom_id": "no-body", "method": "POST", "url": "/v1/chat/completions"}',
        chat_line("ok", model, "duplicate id"),
        '{"custom_id": "u", "method": "POST", "url": "/v1/completions", "body": {"model": "m"}}',
    ])

    batch, _ = run_batch(client, path, timeout=60)

    assert batch.status == "failed"
    assert batch.failed_at and batch.errors is not None and batch.errors.data is not None
    found = {(e.line, e.code, e.param) for e in batch.errors.data}
    assert found == {
        (2, "invalid_json_line", None),
        (3, "invalid_request", "custom_id"),
        (4, "invalid_request", "body"),
        (5, "duplicate_custom_id", "custom_id"),
        (6, "url_mismatch", "url"),
    }
    assert all(e.message for e in batch.errors.data)
    assert batch.output_file_id is None and batch.error_file_id is None


def test_empty_file_fails_validation(client: OpenAI, tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    batch, _ = run_batch(client, path, timeout=60)
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data is not None
    assert [e.code for e in batch.errors.data] == ["empty_file"]


def test_create_params_are_checked_at_once(client: OpenAI, http: httpx.Client,
                                           deployment: object, tmp_path: Path) -> None:
    key = client.api_key
    headers = {"Authorization": f"Bearer {key}"}
    missing = http.post("/v1/batches", json={"endpoint": "/v1/chat/completions"},
                        headers=headers)
    assert missing.status_code == 400
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert missing.json()["error"]["param"] == "completion_window"
    no_input = http.post("/v1/batches", headers=headers, json={
        "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert no_input.status_code == 400 and no_input.json()["error"]["param"] == "input_file_id"
    unknown_file = http.post("/v1/batches", headers=headers, json={
        "input_file_id": "file-nope", "endpoint": "/v1/chat/completions",
        "completion_window": "24h"})
    assert unknown_file.status_code == 404
    assert unknown_file.json()["error"]["param"] == "input_file_id"
    not_json = http.post("/v1/batches", headers={**headers, "content-type": "application/json"},
                         content=b"{not json")
    assert not_json.status_code == 400
    assert set(not_json.json()["error"]) == {"message", "type", "param", "code"}
