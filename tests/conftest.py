"""One real deployment per test session: tansu broker, redis-server, the four services and
vLLM on CPU with the bundled SmolLM2 model, all started by `millrace up`."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from openai import OpenAI

from millrace.settings import BUNDLED_CHAT_MODEL, BUNDLED_EMBEDDING_MODEL
from millrace.storage.store import Store
from ops.embedded import free_port
from tests.deployment import Deployment, OnStore, start

T = TypeVar("T")

MAX_MODEL_LEN = 2048
FETCH_TIMEOUT_S = 8
# the session deployment's per-model vLLM arguments (MILLRACE_VLLM_MODEL_ARGS)
VLLM_MODEL_ARGS = {BUNDLED_CHAT_MODEL: f"--max-model-len {MAX_MODEL_LEN}"}


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # 16 in flight (the engine would take 256): bigger batches keep a backlog in the worker,
    # so cancels and fair share have unstarted lines to act on, as on a busy GPU host.
    # Webhook retries start at ~1 s (not 5 s) and partial results are published every
    # 0.2 s, so the tests of both see several steps within seconds. The chat model gets a
    # vLLM argument of its own, as a user gives one: its context cut to MAX_MODEL_LEN, which
    # still fits the 1,500-token generations the cancel tests need to outlast any machine.
    # A fetch (input_file_url, link pages) ends after FETCH_TIMEOUT_S, so the test of a
    # server that never finishes sees its deadline within seconds.
    dep = start(tmp_path_factory.mktemp("millrace"),
                extra_env={"MILLRACE_FETCH_TIMEOUT_S": str(FETCH_TIMEOUT_S),
                           "MILLRACE_WORKER_MAX_IN_FLIGHT": "16",
                           "MILLRACE_WEBHOOK_RETRY_BASE_S": "1",
                           "MILLRACE_SINK_PARTIAL_EVERY_S": "0.2",
                           "MILLRACE_VLLM_MODEL_ARGS": json.dumps(VLLM_MODEL_ARGS)})
    yield dep
    code = dep.stop()
    assert code == 0, "".join(dep.stderr_lines[-50:])
    assert not [line for line in dep.stderr_lines if "killing" in line], "unclean stop"


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A deployment of the module's own on the echo engine (the pipeline without inference),
    for tests that would disturb the session's deployment or need many lines."""
    dep = start(tmp_path_factory.mktemp("echo"), engine="echo", timeout=180)
    yield dep
    assert dep.stop() == 0, "".join(dep.stderr_lines[-50:])


@pytest.fixture(scope="session")
def s3_url() -> Iterator[str]:
    """A real S3 HTTP endpoint (moto's server) with a bucket-creating pyarrow URI."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield (f"s3://test:test@millrace/files?endpoint_override=127.0.0.1:{port}"
           "&scheme=http&region=us-east-1&allow_bucket_creation=true")
    server.stop()


@pytest.fixture(scope="session")
def client(deployment: Deployment) -> OpenAI:
    return OpenAI(base_url=deployment.base_url, api_key=deployment.api_key, max_retries=0)


@pytest.fixture(scope="session")
def http(deployment: Deployment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=deployment.base_url.removesuffix("/v1"), timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def model(deployment: Deployment) -> str:
    """The served chat model (bundled SmolLM2)."""
    models = deployment.endpoints["models"]
    assert isinstance(models, dict) and BUNDLED_CHAT_MODEL in models
    return BUNDLED_CHAT_MODEL


@pytest.fixture(scope="session")
def embedding_model(deployment: Deployment) -> str:
    """The served embedding model (bundled all-MiniLM-L6-v2)."""
    models = deployment.endpoints["models"]
    assert isinstance(models, dict) and BUNDLED_EMBEDDING_MODEL in models
    return BUNDLED_EMBEDDING_MODEL


def chat_line(custom_id: str, model: str, content: str, **body: object) -> str:
    return json.dumps({
        "custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}], **body},
    })


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def on_store(deployment: Deployment) -> OnStore[object]:
    """Run `scenario(store)` on a `Store` of a fresh namespace of the session's Redis."""
    def run(scenario: Callable[[Store], Awaitable[T]]) -> T:
        async def main() -> T:
            store = Store.connect(str(deployment.endpoints["redis_url"]),
                                  f"st{uuid.uuid4().hex[:8]}")
            try:
                return await scenario(store)
            finally:
                await store.close()
        return asyncio.run(main())
    return run  # type: ignore[return-value]
