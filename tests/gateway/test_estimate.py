"""Admission at create (`gateway/estimate.py`): a file's tokens counted (by the model's own
tokenizer where the gateway has its folder, else 4 bytes a token), and, on an echo
deployment whose worker measured its throughput, the estimate `validate` returns, the
refusal of a batch that cannot finish in its window, and the project's enqueued-token quota —
neither refusal leaving anything behind (no batch, no file, no topic record)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition
from openai import OpenAI

from gateway.estimate import Tokenizers, count, duration, expected, window_text
from millrace.settings import Settings
from millrace.topics import Topics
from tests.batch_flow import wait_done
from tests.conftest import chat_line, write_jsonl
from tests.deployment import Deployment, start, wait_until

MODEL = "smollm2-135m-instruct"
DEPLOYMENT_QUOTA = 10_000_000  # enqueued prompt tokens a project may have per model
QUOTA = 20_000  # the same, for the project an admin gave a quota of its own
CHAT = "/v1/chat/completions"


def line(text: str, **body: object) -> bytes:
    return json.dumps({"custom_id": "x", "method": "POST", "url": CHAT,
                       "body": {"model": "m", **body,
                                "messages": [{"role": "user", "content": text}]}}).encode()


def test_without_a_tokenizer_a_token_is_four_bytes_and_outputs_are_the_most_allowed() -> None:
    tokenizers = Tokenizers(Settings(model="m"))
    lines = [line("x" * 40, max_tokens=10, n=2), line("y" * 8, max_completion_tokens=3),
             line("z" * 4), b"not json", b'{"body": 3}']
    counted = count(lines, CHAT, tokenizers, default_max_tokens=256)
    # 10 + 2 + 1 prompt tokens, 4 a message for the template; 10*2 + 3 + 256 output
    assert (counted.model, counted.lines) == ("m", 3)
    assert counted.prompt_tokens == 13 + 3 * 4
    assert counted.max_output_tokens == 20 + 3 + 256
    # a pooling endpoint generates nothing; token ids count as given
    embed = b'{"custom_id": "e", "body": {"model": "m", "input": [[1, 2, 3], "abcdefgh"]}}'
    counted = count([embed], "/v1/embeddings", tokenizers, default_max_tokens=256)
    assert (counted.prompt_tokens, counted.max_output_tokens) == (3 + 2, 0)


def test_the_models_own_tokenizer_counts_where_the_gateway_has_its_folder(
        tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(tmp_path / "tokenizer.json"))
    tokenizers = Tokenizers(Settings(model=f"m={tmp_path}"))
    counted = count([line("hello hello a much longer word")], CHAT, tokenizers, 1)
    assert counted.prompt_tokens == 6 + 4  # six words, not 30 bytes / 4


def test_outputs_count_at_what_a_request_generated_but_never_above_the_cap() -> None:
    assert expected(100, 4_096 * 10, 10, None) == 100 + 40_960  # nothing finished yet
    assert expected(100, 4_096 * 10, 10, 300.4) == 100 + 3_004
    assert expected(100, 50 * 10, 10, 300.0) == 100 + 500


@pytest.mark.parametrize(("seconds", "text"), [
    (0.02, "20ms"), (1, "1s"), (45, "45s"), (44.2, "45s"), (360, "6m0s"), (3723, "1h2m3s")])
def test_reset_durations_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert duration(seconds) == text


@pytest.mark.parametrize(("seconds", "text"), [
    (1, "1m"), (60, "1m"), (61, "2m"), (3600, "60m"), (3601, "2h"), (86_400, "24h")])
def test_the_window_named_is_the_shortest_that_holds(seconds: int, text: str) -> None:
    assert window_text(seconds) == text


# --- on a deployment ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def admitting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # no model folder: prompts are counted at 4 bytes a token whatever ran before
    dep = start(tmp_path_factory.mktemp("admission"), engine="echo", timeout=180, extra_env={
        "MILLRACE_WORKER_MAX_IN_FLIGHT": "4", "MILLRACE_ECHO_STEP_MS": "20",
        "MILLRACE_ENQUEUED_TOKEN_LIMIT": str(DEPLOYMENT_QUOTA),
        "MILLRACE_MODEL_CACHE": str(tmp_path_factory.mktemp("no-models"))})
    yield dep
    assert dep.stop() == 0, "".join(dep.stderr_lines[-50:])


def upload(client: OpenAI, path: Path, lines: int, words: int, max_tokens: int) -> str:
    write_jsonl(path, [chat_line(f"l{i}", MODEL, "word " * words, max_tokens=max_tokens)
                       for i in range(lines)])
    with path.open("rb") as f:
        return client.files.create(file=f, purpose="batch").id


@pytest.fixture
def http(admitting: Deployment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=admitting.base_url.removesuffix("/v1"), timeout=60,
                      headers={"Authorization": f"Bearer {admitting.api_key}"}) as client:
        yield client


def left_behind(dep: Deployment, client: OpenAI) -> tuple[int, int, int]:
    """Batches, files, and records on the batch-events topic: what a create leaves."""
    topic = Topics(str(dep.endpoints["topic_prefix"])).batch_events
    consumer = Consumer({"bootstrap.servers": str(dep.endpoints["kafka_bootstrap"]),
                         "group.id": "left-behind"})
    try:
        parts = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        records = sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
                      for p in parts)
    finally:
        consumer.close()
    return (len(client.batches.list(limit=100).data), len(client.files.list().data), records)


def estimate(http: httpx.Client, file_id: str, priority: int = 0) -> dict[str, object]:
    r = http.post("/v1/batches/validate", json={"input_file_id": file_id, "endpoint": CHAT,
                                                "priority": priority})
    assert r.status_code == 200, r.text
    found = r.json()["estimate"]
    assert isinstance(found, dict)
    return found


def test_a_batch_that_cannot_finish_in_its_window_is_refused_with_its_estimate(
        admitting: Deployment, http: httpx.Client, tmp_path: Path) -> None:
    client = admitting.sdk()
    # the worker measures its throughput on a batch that keeps it busy for a while
    warm = upload(client, tmp_path / "warm.jsonl", 1_500, 2, 8)
    batch = client.batches.create(input_file_id=warm, endpoint=CHAT, completion_window="24h")
    assert wait_done(client, batch.id, 300).status == "completed"
    rate = wait_until(lambda: estimate(http, warm)["tokens_per_s"], 60,
                      "the workers' measured throughput")
    assert isinstance(rate, float) and rate > 0

    # prompts for ten minutes at that rate ("word " is 1.25 tokens at 4 bytes a token; a
    # moving average, the rate may still move a little: the window tried is one minute)
    lines, words = 40, math.ceil(rate * 600 / 40 / 1.25)
    big = upload(client, tmp_path / "big.jsonl", lines, words, 1_000)
    found = estimate(http, big)
    assert found["prompt_tokens"] == lines * (math.ceil(len("word " * words) / 4) + 4)
    assert found["max_output_tokens"] == lines * 1_000
    # what a request generated on average so far (the echo: a word or two), not the cap
    assert 0 < found["expected_output_tokens"] < lines * 10, found
    eta = found["eta_seconds"]
    assert isinstance(eta, int) and eta > 60, found
    before = left_behind(admitting, client)
    r = http.post("/v1/batches", json={"input_file_id": big, "endpoint": CHAT,
                                       "completion_window": "1m"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (
        "completion_window_too_short", "completion_window", "invalid_request_error")
    assert f"(at most {found['max_output_tokens']:,})" in error["message"]
    said = re.search(r"about ([\d,]+) s\. The earliest feasible completion_window is "
                     r"'(\d+)([mh])'", error["message"])
    assert said is not None, error["message"]
    seconds, feasible = int(said[1].replace(",", "")), int(said[2]) * {"m": 60, "h": 3600}[said[3]]
    assert seconds <= feasible < seconds + 3600
    assert left_behind(admitting, client) == before  # nothing stored, nothing published

    # the window it named is accepted, and the batch shows its estimate
    created = client.batches.create(input_file_id=big, endpoint=CHAT,
                                    completion_window=f"{said[2]}{said[3]}")  # type: ignore[arg-type]
    shown = created.model_extra["estimate"] if created.model_extra else None
    assert shown is not None and shown["max_output_tokens"] == found["max_output_tokens"]
    assert wait_done(client, created.id, 300).status == "completed"


def test_the_projects_enqueued_token_quota_refuses_at_create_and_frees_as_batches_end(
        admitting: Deployment, http: httpx.Client, tmp_path: Path) -> None:
    minted = http.post("/admin/api-keys", json={"project": "quota",
                                                "enqueued_token_limit": QUOTA})
    assert minted.status_code == 200 and minted.json()["enqueued_token_limit"] == QUOTA
    key = minted.json()["key"]
    client = admitting.sdk(key)
    http.headers["Authorization"] = f"Bearer {key}"
    # about 12,000 prompt tokens each (at 4 bytes a token): one fits the quota, two do not
    first = upload(client, tmp_path / "a.jsonl", 100, 96, 4)
    second = upload(client, tmp_path / "b.jsonl", 100, 96, 4)
    tokens = estimate(http, first)["prompt_tokens"]
    tokens_b = estimate(http, second)["prompt_tokens"]
    assert isinstance(tokens, int) and tokens <= QUOTA < 2 * tokens
    with admitting.frozen("worker"):  # the first stays unfinished meanwhile
        raw = client.batches.with_raw_response.create(input_file_id=first, endpoint=CHAT,
                                                      completion_window="24h")
        running = raw.parse()
        # OpenAI's token headers show the quota, and what this batch left of it
        assert raw.headers["x-ratelimit-limit-tokens"] == str(QUOTA)
        assert raw.headers["x-ratelimit-remaining-tokens"] == str(QUOTA - tokens)
        wait_until(lambda: client.batches.retrieve(running.id).status == "in_progress", 60,
                   "its lines to be enqueued")  # its events published: quiet until it runs
        before = left_behind(admitting, client)
        r = http.post("/v1/batches", json={"input_file_id": second, "endpoint": CHAT,
                                           "completion_window": "24h"})
        assert r.status_code == 429, r.text
        error = r.json()["error"]
        assert (error["code"], error["param"]) == ("token_limit_exceeded", "input_file_id")
        assert f"Limit: {QUOTA:,} enqueued tokens" in error["message"]
        assert r.headers["x-ratelimit-limit-tokens"] == str(QUOTA)
        assert r.headers["x-ratelimit-remaining-tokens"] == str(QUOTA - tokens)
        assert left_behind(admitting, client) == before
        # back to the deployment's limit, which both fit: admitted while the first waits
        admin = {"Authorization": f"Bearer {admitting.api_key}"}
        reset = http.patch(f"/admin/api-keys/{minted.json()['id']}", headers=admin,
                           json={"enqueued_token_limit": -1})
        assert reset.status_code == 200 and reset.json()["enqueued_token_limit"] is None
        admitted = wait_until(lambda: (r := http.post("/v1/batches", json={
            "input_file_id": second, "endpoint": CHAT, "completion_window": "24h"})
        ).status_code == 200 and r, 30, "the key's change to reach the gateways")
        assert admitted.headers["x-ratelimit-limit-tokens"] == str(DEPLOYMENT_QUOTA)
        assert admitted.headers["x-ratelimit-remaining-tokens"] == str(
            DEPLOYMENT_QUOTA - tokens - tokens_b)
        # the dashboard shows each one's place in the model's queue: the second behind the
        # first (same priority, a later deadline), by the first's tokens
        first_place = http.get(f"/dashboard/api/batches/{running.id}").json()["queue"]
        second_place = http.get(
            f"/dashboard/api/batches/{admitted.json()['id']}").json()["queue"]
        assert (first_place["position"], first_place["tokens_ahead"]) == (1, 0), first_place
        assert second_place["position"] == 2, second_place
        assert second_place["tokens_ahead"] >= tokens, second_place
    assert wait_done(client, running.id, 300).status == "completed"
    assert wait_done(client, admitted.json()["id"], 300).status == "completed"
