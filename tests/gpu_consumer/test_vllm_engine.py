"""A line answered through millrace is answered as vLLM answers it: the same lines through
`vllm run-batch` (chat and embeddings, what vLLM 0.32's batch runner takes) and `vllm
serve` (completions and Responses), on the same model with the same vLLM arguments as the
session deployment's worker; every body equal to vLLM's, ids and timestamps aside (and
floats to 1e-4: a batch of other requests beside a line may move a logprob's last digits)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from gpu_consumer import engine_args
from millrace.settings import Settings
from ops.bench.batch import vllm_env
from ops.embedded import die_with_parent, free_port
from tests.batch_flow import read_lines, run_batch
from tests.conftest import VLLM_MODEL_ARGS, chat_line, write_jsonl
from tests.deployment import Deployment, wait_until

pytestmark = pytest.mark.engine

# ids and times of a response; every other field must be vLLM's
VARYING = {"id", "created", "created_at"}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": CITY,
                                            "strict": True}}


def chat_lines(model: str) -> list[str]:
    ask = "What is the weather in Paris?"
    return [
        chat_line("plain", model, "What is the capital of France?", max_tokens=16,
                  temperature=0),
        chat_line("system", model, "Name a fruit.", max_tokens=12, temperature=0,
                  messages=[{"role": "system", "content": "Answer in one word."},
                            {"role": "user", "content": "Name a fruit."}]),
        chat_line("required", model, ask, max_tokens=120, temperature=0, tools=[WEATHER],
                  tool_choice="required"),
        chat_line("named", model, ask, max_tokens=120, temperature=0, tools=[WEATHER],
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}),
        chat_line("logit-bias", model, "What is the capital of France?", max_tokens=12,
                  temperature=0, logit_bias={"504": -100}),
        chat_line("n", model, "Say something nice.", max_tokens=12, n=2, temperature=0.8,
                  seed=7),
        chat_line("logprobs", model, "Say hi.", max_tokens=6, temperature=0, logprobs=True,
                  top_logprobs=3),
        chat_line("json-schema", model, "Name a city as JSON.", max_tokens=40, temperature=0,
                  response_format={"type": "json_schema",
                                   "json_schema": {"name": "city", "schema": CITY}}),
        chat_line("stop", model, "Count: 1, 2, 3, 4, 5, 6", max_tokens=30, temperature=0,
                  stop=["\n", "7"]),
        chat_line("penalties", model, "List some animals.", max_completion_tokens=20,
                  temperature=0, frequency_penalty=0.5, presence_penalty=0.3),
        chat_line("seeded", model, "Tell a short story.", max_tokens=16, temperature=1.0,
                  top_p=0.9, seed=42),
        chat_line("refused", model, "Say hi.", max_tokens=4, temperature=0, n=2),
    ]


def embedding_lines(model: str) -> list[str]:
    def embed(custom_id: str, **body: object) -> str:
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
                           "body": {"model": model, **body}})

    return [
        embed("one", input="The cat sat on the mat."),
        embed("many", input=["A cat.", "A kitten.", "Stock prices rose."]),
        embed("b64", input="Bread and butter.", encoding_format="base64"),
        embed("tokens", input=[101, 7592, 2088, 102]),
        embed("token-lists", input=[[101, 7592, 102], [101, 2088, 102]]),
        embed("refused", input="x", dimensions=8),
    ]


COMPLETIONS = [
    {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
    {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "logprobs": 2,
     "echo": True},
    {"prompt": "A list of colours:", "max_tokens": 10, "n": 2, "temperature": 0.7, "seed": 3},
    {"prompt": "x", "max_tokens": 4, "temperature": 0, "suffix": "y"},
]
RESPONSES = [
    {"input": "What is the capital of France?", "max_output_tokens": 16, "temperature": 0},
    {"instructions": "Answer in one word.", "max_output_tokens": 8, "temperature": 0,
     "input": [{"role": "user", "content": "Name a colour."}]},
    {"input": "x", "max_output_tokens": -1},
]


def same(ours: Any, theirs: Any, where: str = "body") -> None:
    """`ours` equals `theirs`, ids and timestamps aside, floats to 1e-4."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and set(ours) == set(theirs), (where, ours, theirs)
        for key in theirs:
            if key not in VARYING:
                same(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), (where, ours, theirs)
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, float) and isinstance(ours, float):
        assert math.isclose(ours, theirs, rel_tol=1e-4, abs_tol=1e-4), (where, ours, theirs)
    else:
        assert ours == theirs, (where, ours, theirs)


def vllm_args(deployment: Deployment, model: str) -> list[str]:
    """The vLLM command line the deployment's worker built for `model`."""
    folder = str(deployment.endpoints["models"][model])  # type: ignore[index]
    settings = Settings(vllm_model_args=VLLM_MODEL_ARGS)
    return engine_args.argv(settings, model, folder, cpu=engine_args.cpu_build())


def run_batch_vllm(deployment: Deployment, model: str, source: Path) -> dict[str, Any]:
    """`vllm run-batch` on the file: custom_id → (status, body or error)."""
    out = source.with_suffix(".vllm.jsonl")
    subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(source),
                    "-o", str(out), *vllm_args(deployment, model)],
                   env=vllm_env(Settings()), capture_output=True, check=True, timeout=600,
                   preexec_fn=die_with_parent)
    answers = {}
    for raw in out.read_text().splitlines():
        line = json.loads(raw)
        response = line["response"]
        answers[line["custom_id"]] = (response["status_code"], response["body"] or line["error"])
    return answers


def through_millrace(client: OpenAI, source: Path, endpoint: str) -> dict[str, Any]:
    batch, _ = run_batch(client, source, endpoint=endpoint)
    assert batch.status == "completed", batch.errors
    lines = read_lines(client, batch.output_file_id) + read_lines(client, batch.error_file_id)
    return {x.custom_id: (x.response.status_code, x.response.body)
            for x in lines if x.response is not None}


def assert_parity(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert set(ours) == set(theirs)
    for custom_id, (status, body) in theirs.items():
        assert ours[custom_id][0] == status, (custom_id, ours[custom_id], body)
        same(ours[custom_id][1], body, custom_id)


def test_chat_and_embedding_lines_are_answered_as_vllm_run_batch_answers_them(
    client: OpenAI, deployment: Deployment, model: str, embedding_model: str, tmp_path: Path
) -> None:
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_lines(model))
    embed = write_jsonl(tmp_path / "embed.jsonl", embedding_lines(embedding_model))
    ours_chat = through_millrace(client, chat, "/v1/chat/completions")
    ours_embed = through_millrace(client, embed, "/v1/embeddings")

    theirs_chat = run_batch_vllm(deployment, model, chat)
    theirs_embed = run_batch_vllm(deployment, embedding_model, embed)

    assert theirs_chat["refused"][0] == theirs_embed["refused"][0] == 400
    assert theirs_chat["required"][1]["choices"][0]["message"]["tool_calls"]
    assert_parity(ours_chat, theirs_chat)
    assert_parity(ours_embed, theirs_embed)


@pytest.fixture(scope="module")
def vllm_serve(deployment: Deployment, model: str) -> Iterator[str]:
    """`vllm serve` of the chat model, with the deployment worker's vLLM arguments (its
    module: the `vllm` command of the CPU wheel looks for a distribution named `vllm`)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
         *vllm_args(deployment, model), "--host", "127.0.0.1", "--port", str(port)],
        env=vllm_env(Settings()), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, "vllm serve exited"
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 300, "vllm serve to start", every=0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.parametrize(("endpoint", "requests"), [
    ("/v1/completions", COMPLETIONS), ("/v1/responses", RESPONSES)])
def test_completions_and_responses_lines_are_answered_as_vllm_serve_answers_them(
    client: OpenAI, model: str, vllm_serve: str, tmp_path: Path, endpoint: str,
    requests: list[dict[str, Any]],
) -> None:
    bodies = [{"model": model, **body} for body in requests]
    source = write_jsonl(tmp_path / "in.jsonl", [
        json.dumps({"custom_id": f"l{i}", "method": "POST", "url": endpoint, "body": body})
        for i, body in enumerate(bodies)])
    ours = through_millrace(client, source, endpoint)

    theirs = {}
    for i, body in enumerate(bodies):
        answer = httpx.post(f"{vllm_serve}{endpoint}", json=body, timeout=120)
        theirs[f"l{i}"] = (answer.status_code, answer.json())

    assert {status for status, _ in theirs.values()} == {200, 400}
    assert_parity(ours, theirs)


SYSTEM = ("You are a careful assistant for a library catalogue. " * 40).strip()


def test_lines_sharing_a_system_prompt_report_the_engine_s_cached_tokens(
        client: OpenAI, model: str, tmp_path: Path) -> None:
    """32 lines with one ~400-token system prompt: vLLM's prefix cache serves the shared
    prefix, and each line's usage and the batch's say how many prompt tokens came from it."""
    lines = [json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": model, "max_tokens": 2, "messages": [
                             {"role": "system", "content": SYSTEM},
                             {"role": "user", "content": f"Is book {i} on the shelf?"}]}})
             for i in range(32)]
    batch, _ = run_batch(client, write_jsonl(tmp_path / "in.jsonl", lines), timeout=600)
    assert batch.status == "completed"
    output = read_lines(client, batch.output_file_id)
    usages = [line.response.body["usage"] for line in output if line.response is not None]
    assert len(usages) == 32
    prompt = usages[0]["prompt_tokens"]
    assert prompt >= 400
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages]
    assert sum(1 for c in cached if c > 0) >= 16, cached  # all but the first wave's
    assert all(c <= prompt for c in cached)
    assert batch.usage is not None
    assert batch.usage.input_tokens_details.cached_tokens == sum(cached) > 0
