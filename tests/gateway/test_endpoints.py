"""Every endpoint a batch may name, answered by vLLM's own serving layer on the real engine:
chat with tools and logit_bias, Responses, embeddings, score and rerank; what vLLM refuses
is that line's error with vLLM's status and message, and the other lines run."""

from __future__ import annotations

import base64
import json
import math
import struct
from pathlib import Path
from typing import Any

import jsonschema
from openai import OpenAI

from tests.batch_flow import read_lines, run_batch
from tests.conftest import MAX_MODEL_LEN, chat_line, write_jsonl

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.", "parameters": CITY,
    "strict": True}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.", "strict": True,
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                   "required": ["zone"], "additionalProperties": False}}}


def line(custom_id: str, url: str, **body: object) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def bodies(client: OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    return {x.custom_id: x.response.body for x in read_lines(client, file_id) if x.response}


def test_embeddings_score_and_rerank_on_the_embedding_model(
    client: OpenAI, embedding_model: str, model: str, tmp_path: Path
) -> None:
    def embed(custom_id: str, **body: object) -> str:
        return line(custom_id, "/v1/embeddings", model=embedding_model, **body)

    batch, _ = run_batch(client, write_jsonl(tmp_path / "in.jsonl", [
        embed("one", input="The cat sat on the mat."),
        embed("many", input=["A cat.", "A kitten.", "Stock prices."]),
        embed("b64", input="The cat sat on the mat.", encoding_format="base64"),
        embed("dims", input="x", dimensions=8),  # all-MiniLM is not a Matryoshka model
    ]), endpoint="/v1/embeddings")

    assert batch.status == "completed", batch.errors
    out = bodies(client, batch.output_file_id)
    errors = {x.custom_id: x.response for x in read_lines(client, batch.error_file_id)}
    assert set(out) == {"one", "many", "b64"} and set(errors) == {"dims"}
    one = out["one"]["data"][0]["embedding"]
    assert len(one) == 384 and math.isclose(math.hypot(*one), 1.0, rel_tol=1e-3)
    assert out["one"]["usage"]["prompt_tokens"] > 0
    cat, kitten, stocks = (d["embedding"] for d in out["many"]["data"])
    assert [d["index"] for d in out["many"]["data"]] == [0, 1, 2]

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(cat, kitten) > cosine(cat, stocks)  # real semantics, not noise
    decoded = struct.unpack("<384f", base64.b64decode(out["b64"]["data"][0]["embedding"]))
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(decoded, one, strict=True))
    dims = errors["dims"]
    assert dims is not None and dims.status_code == 400
    assert "matryoshka" in dims.body["error"]["message"].lower()
    assert batch.usage is not None
    assert batch.usage.input_tokens == sum(b["usage"]["prompt_tokens"] for b in out.values())

    # a generative model named on the embeddings endpoint: vLLM serves no such route for it
    wrong, _ = run_batch(client, write_jsonl(tmp_path / "wrong.jsonl", [
        line("chat-model", "/v1/embeddings", model=model, input="x")]),
        endpoint="/v1/embeddings")
    assert wrong.status == "completed" and wrong.output_file_id is None
    [refused] = read_lines(client, wrong.error_file_id)
    assert refused.response is not None and refused.response.status_code == 400
    assert refused.response.body["error"]["message"] == (
        "Model does not support endpoint: /v1/embeddings")

    # score and rerank: the embedding model's cosine similarity, through vLLM's ServingScores
    scored, _ = run_batch(client, write_jsonl(tmp_path / "score.jsonl", [
        line("pair", "/v1/score", model=embedding_model, text_1="A cat sleeps.",
             text_2=["A kitten naps.", "Bond yields rose."])]), endpoint="/v1/score")
    [score] = bodies(client, scored.output_file_id).values()
    near, far = (d["score"] for d in score["data"])
    assert score["object"] == "list" and near > far
    ranked, _ = run_batch(client, write_jsonl(tmp_path / "rerank.jsonl", [
        line("docs", "/v1/rerank", model=embedding_model, query="A cat sleeps.",
             documents=["Bond yields rose.", "A kitten naps."])]), endpoint="/v1/rerank")
    [rerank] = bodies(client, ranked.output_file_id).values()
    assert [r["index"] for r in rerank["results"]] == [1, 0]


def test_tool_choice_required_and_named_give_calls_that_match_the_schema(
    client: OpenAI, model: str, tmp_path: Path
) -> None:
    questions = ["What is the weather in Paris?", "Is it raining in Oslo?",
                 "Tell me the weather for Lima.", "How warm is it in Cairo today?"]
    named = {"type": "function", "function": {"name": "get_weather"}}
    batch, _ = run_batch(client, write_jsonl(tmp_path / "in.jsonl", [
        chat_line(f"{how}-{i}", model, q, max_tokens=200, temperature=0, tools=[WEATHER, TIME],
                  tool_choice=choice, parallel_tool_calls=False)
        for i, q in enumerate(questions)
        for how, choice in (("required", "required"), ("named", named))]))

    assert batch.status == "completed"
    out = bodies(client, batch.output_file_id)
    assert len(out) == 2 * len(questions), read_lines(client, batch.error_file_id)
    schemas = {"get_weather": CITY, "get_time": TIME["function"]["parameters"]}  # type: ignore[index]
    for custom_id, body in out.items():
        calls = body["choices"][0]["message"].get("tool_calls")
        assert calls, (custom_id, json.dumps(body["choices"]))
        for call in calls:
            arguments = json.loads(call["function"]["arguments"])
            jsonschema.validate(arguments, schemas[call["function"]["name"]])
            if custom_id.startswith("named"):
                assert call["function"]["name"] == "get_weather"


def test_logit_bias_keeps_a_token_out_or_forces_it(
    client: OpenAI, model: str, tmp_path: Path
) -> None:
    questions = ["What is the capital of France?", "What is the capital of Italy?",
                 "What is the capital of Spain?"]

    def ask(custom_id: str, question: str, **body: object) -> str:
        return chat_line(custom_id, model, question, max_tokens=10, temperature=0,
                         return_token_ids=True, **body)

    plain, _ = run_batch(client, write_jsonl(tmp_path / "plain.jsonl", [
        ask(f"q{i}", q) for i, q in enumerate(questions)]))
    answers = bodies(client, plain.output_file_id)
    token = answers["q0"]["choices"][0]["token_ids"][0]  # what the model says first, unbiased

    biased, _ = run_batch(client, write_jsonl(tmp_path / "biased.jsonl", [
        *(ask(f"ban{i}", q, logit_bias={str(token): -100}) for i, q in enumerate(questions)),
        ask("force", questions[0], logit_bias={str(token): 100})]))

    out = bodies(client, biased.output_file_id)
    assert len(out) == len(questions) + 1
    for i in range(len(questions)):
        generated = out[f"ban{i}"]["choices"][0]["token_ids"]
        assert generated and token not in generated
    assert set(out["force"]["choices"][0]["token_ids"]) == {token}


def test_a_responses_file_completes_with_response_objects_and_their_usage(
    client: OpenAI, model: str, tmp_path: Path
) -> None:
    batch, _ = run_batch(client, write_jsonl(tmp_path / "in.jsonl", [
        line("plain", "/v1/responses", model=model, input="What is the capital of France?",
             max_output_tokens=16, temperature=0),
        line("instructed", "/v1/responses", model=model, instructions="Answer in one word.",
             input=[{"role": "user", "content": "Name a colour."}], max_output_tokens=8),
        line("bad", "/v1/responses", model=model, input="x", max_output_tokens=-1),
    ]), endpoint="/v1/responses")

    assert batch.status == "completed", batch.errors
    out = bodies(client, batch.output_file_id)
    assert set(out) == {"plain", "instructed"}
    for body in out.values():
        assert body["object"] == "response" and body["status"] in ("completed", "incomplete")
        assert body["output"][0]["type"] == "message"
    assert "Paris" in out["plain"]["output"][0]["content"][0]["text"]
    [bad] = read_lines(client, batch.error_file_id)
    assert bad.response is not None and bad.response.status_code == 400
    usage = batch.usage
    assert usage is not None
    assert usage.input_tokens == sum(b["usage"]["input_tokens"] for b in out.values()) > 0
    assert usage.output_tokens == sum(b["usage"]["output_tokens"] for b in out.values()) > 0


def test_vllm_judges_each_line_and_refuses_what_it_would_drop(
    client: OpenAI, model: str, tmp_path: Path
) -> None:
    batch, _ = run_batch(client, write_jsonl(tmp_path / "in.jsonl", [
        chat_line("ok", model, "Say hi.", max_tokens=4),
        chat_line("too-long", model, "hello " * MAX_MODEL_LEN, max_tokens=4),
        chat_line("greedy-n", model, "Say hi.", max_tokens=4, temperature=0, n=2),
        chat_line("typo", model, "Say hi.", max_token=4),
        chat_line("bad-top", model, "Say hi.", logprobs=True, top_logprobs=50),
    ]))

    assert batch.status == "completed"
    assert set(bodies(client, batch.output_file_id)) == {"ok"}
    errors = {x.custom_id: x.response for x in read_lines(client, batch.error_file_id)}
    assert set(errors) == {"too-long", "greedy-n", "typo", "bad-top"}
    refused = {k: (v.status_code, v.body["error"]) for k, v in errors.items() if v}
    assert all(status == 400 for status, _ in refused.values())
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in (
        refused["too-long"][1]["message"])
    assert refused["greedy-n"][1]["message"] == "n must be 1 when using greedy sampling, got 2."
    assert refused["typo"][1]["param"] == "max_token"  # never dropped without a word
    assert refused["bad-top"][1]["param"] == "logprobs"
