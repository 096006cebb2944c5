"""A LoRA adapter served as a model name, the vLLM way (`--enable-lora --lora-modules
name=path` in the model's vLLM arguments): the worker advertises it, the gateway takes it as
`body.model`, its lines run on the base model's engine with the adapter applied. The worker
serving it has `--max-model-len 512`: a line whose prompt is longer fails alone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import OpenAI
from safetensors.numpy import save_file

from millrace.protocol import OutputLine
from tests.batch_flow import read_lines, run_batch
from tests.conftest import chat_line, write_jsonl
from tests.deployment import Deployment, extra_worker, wait_until

pytestmark = pytest.mark.engine
ADAPTER = "smollm2-shout"
RANK = 8
MAX_MODEL_LEN = 512
QUESTIONS = ["What is the capital of France?", "Name a colour.", "Say hello."]


def write_adapter(folder: Path) -> Path:
    """A PEFT LoRA adapter for SmolLM2-135M (random weights: it changes every answer)."""
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(30):
        for name, width in (("q_proj", 576), ("v_proj", 192)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = rng.normal(0, 0.5, (RANK, 576)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.normal(0, 0.5, (width, RANK)).astype(np.float32)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK,
        "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "base_model_name_or_path": "smollm2-135m-instruct"}))
    return folder


@pytest.fixture
def lora_worker(deployment: Deployment, model: str, tmp_path: Path,
                http: httpx.Client) -> Iterator[None]:
    adapter = write_adapter(tmp_path / "adapter")
    args = (f"--max-model-len {MAX_MODEL_LEN} --enable-lora --max-lora-rank {RANK} "
            f"--lora-modules {ADAPTER}={adapter}")
    with extra_worker(deployment, model, {
            "MILLRACE_VLLM_MODEL_ARGS": json.dumps({model: args})}) as (proc, assigned, log):
        assert assigned.wait(300), "".join(log[-30:])
        # the gateways know the adapter once the worker reported it on the board
        wait_until(lambda: http.get(f"/v1/models/{ADAPTER}",
                                    headers={"Authorization": f"Bearer {deployment.api_key}"}
                                    ).status_code == 200, 60, "the adapter on the board")
        yield
        proc.terminate()
        assert proc.wait(60) == 0


def answers(client: OpenAI, path: Path, name: str, *extra: str
            ) -> tuple[dict[str, str], list[OutputLine]]:
    """The answers to QUESTIONS through model `name` (and the error lines of `extra`)."""
    batch, _ = run_batch(client, write_jsonl(path, [
        *(chat_line(f"q{i}", name, q, max_tokens=8, temperature=0)
          for i, q in enumerate(QUESTIONS)), *extra]))
    assert batch.status == "completed"
    out = read_lines(client, batch.output_file_id)
    assert len(out) == len(QUESTIONS), read_lines(client, batch.error_file_id)
    assert all(x.response is not None and x.response.body["model"] == name for x in out)
    return ({x.custom_id: x.response.body["choices"][0]["message"]["content"]
             for x in out if x.response is not None}, read_lines(client, batch.error_file_id))


def test_an_adapter_is_a_model_name_and_changes_the_answers(
    client: OpenAI, model: str, tmp_path: Path, lora_worker: None
) -> None:
    too_long = chat_line("too-long", ADAPTER, "hello " * MAX_MODEL_LEN, max_tokens=4)
    adapted, refused = answers(client, tmp_path / "adapter.jsonl", ADAPTER, too_long)
    base, _ = answers(client, tmp_path / "base.jsonl", model)
    assert "Paris" in base["q0"]
    assert all(adapted[k] != base[k] for k in base), (adapted, base)
    # the prompt over the worker's --max-model-len fails alone; the other lines ran
    [line] = refused
    assert line.custom_id == "too-long" and line.response is not None
    assert line.response.status_code == 400
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in (
        line.response.body["error"]["message"])
