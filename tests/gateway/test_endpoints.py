"""Each batch endpoint and the OpenAI parameters it maps onto vLLM, on the real engine."""

from __future__ import annotations

import base64
import json
import math
import struct
from pathlib import Path

from openai import OpenAI

from tests.batch_flow import read_lines, run_batch
from tests.conftest import chat_line, write_jsonl


def embedding_line(custom_id: str, model: str, **body: object) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
                       "body": {"model": model, **body}})


def test_embeddings_run_on_the_pooling_runner(
    client: OpenAI, embedding_model: str, model: str, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [
        embedding_line("one", embedding_model, input="The cat sat on the mat."),
        embedding_line("many", embedding_model, input=["A cat.", "A kitten.", "Stock prices."]),
        embedding_line("b64", embedding_model, input="The cat sat on the mat.",
                       encoding_format="base64"),
        embedding_line("dims", embedding_model, input="x", dimensions=8),
    ])

    batch, _ = run_batch(client, path, endpoint="/v1/embeddings")

    assert batch.status == "completed", batch.errors
    out = {x.custom_id: x.response.body for x in read_lines(client, batch.output_file_id)
           if x.response}
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
    assert dims.body["error"]["param"] == "dimensions"

    # a generative model named on the embeddings endpoint is a line error, not a crash
    wrong, _ = run_batch(client, write_jsonl(tmp_path / "wrong.jsonl", [
        embedding_line("chat-model", model, input="x")]), endpoint="/v1/embeddings")
    assert wrong.status == "completed" and wrong.output_file_id is None
    [line] = read_lines(client, wrong.error_file_id)
    assert line.response is not None and line.response.body["error"]["param"] == "model"


def test_sampling_parameters_map_onto_vllm(client: OpenAI, model: str, tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"], "additionalProperties": False}
    path = write_jsonl(tmp_path / "in.jsonl", [
        chat_line("json", model, "Name a city as JSON.", max_tokens=40, temperature=0,
                  response_format={"type": "json_schema",
                                   "json_schema": {"name": "city", "schema": schema}}),
        chat_line("logprobs", model, "Say hi.", max_tokens=3, logprobs=True, top_logprobs=2),
        chat_line("n", model, "Say hi.", max_tokens=4, n=2, seed=7, temperature=1.0),
        chat_line("stop", model, "Count: 1, 2, 3, 4, 5, 6", max_tokens=30, stop=["\n"],
                  temperature=0),
        chat_line("tools", model, "x", tools=[{"type": "function",
                                               "function": {"name": "f"}}]),
        chat_line("bad-top", model, "x", logprobs=True, top_logprobs=50),
    ])

    batch, _ = run_batch(client, path)

    out = {x.custom_id: x.response.body for x in read_lines(client, batch.output_file_id)
           if x.response}
    errors = {x.custom_id: x.response for x in read_lines(client, batch.error_file_id)}
    assert set(out) == {"json", "logprobs", "n", "stop"}
    city = json.loads(out["json"]["choices"][0]["message"]["content"])
    assert set(city) == {"city"} and isinstance(city["city"], str)
    content = out["logprobs"]["choices"][0]["logprobs"]["content"]
    assert len(content) == out["logprobs"]["usage"]["completion_tokens"]
    assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in content)
    assert [c["index"] for c in out["n"]["choices"]] == [0, 1]
    assert "\n" not in out["stop"]["choices"][0]["message"]["content"]
    assert {k: v.body["error"]["param"] for k, v in errors.items() if v} == {
        "tools": "tools", "bad-top": "top_logprobs"}
