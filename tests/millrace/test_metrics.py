"""Every service's Prometheus metrics, scraped from the addresses `endpoints.json` lists and
parsed with prometheus-client's own parser, after a batch ran on the real engine."""

from __future__ import annotations

from pathlib import Path

import httpx
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from ops.chaos import Receiver
from tests.batch_flow import wait_done
from tests.conftest import chat_line, write_jsonl
from tests.deployment import Deployment, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    answer = httpx.get(url, timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(answer.text)
            for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the samples of `name` that carry these labels."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def test_each_service_exposes_its_metrics(client: OpenAI, model: str, deployment: Deployment,
                                          tmp_path: Path) -> None:
    urls = deployment.endpoints["metrics"]
    assert isinstance(urls, dict)
    assert set(urls) >= {"gateway", "worker", "aggregator", "sink"}
    before = {name: scrape(str(url)) for name, url in urls.items()}
    receiver = Receiver()
    lines = [chat_line(f"m{i}", model, f"Say {i}.", max_tokens=4) for i in range(6)]
    lines.append(chat_line("bad", model, "x", temperature=-1))  # vLLM refuses it
    with write_jsonl(tmp_path / "in.jsonl", lines).open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h",
                                  extra_body={"webhook_url": receiver.url})
    done = wait_done(client, batch.id)
    assert done.status == "completed"
    wait_until(lambda: receiver.delivered(batch.id), 60, "the webhook")
    # 20 connections of their own: the kernel spreads them over both gateway processes,
    # and /metrics (answered by one of them) must count them all
    for _ in range(20):
        with httpx.Client(base_url=deployment.base_url, timeout=10) as one:
            assert one.get(f"/batches/{batch.id}", headers={
                "Authorization": f"Bearer {deployment.api_key}"}).status_code == 200
    receiver.close()
    after = {name: scrape(str(url)) for name, url in urls.items()}

    def grew(service: str, name: str, **labels: str) -> float:
        return value(after[service], name, **labels) - value(before[service], name, **labels)

    route = {"method": "GET", "route": "/v1/batches/{batch_id}", "status": "200"}
    assert grew("gateway", "millrace_http_requests_total", **route) >= 20
    assert grew("gateway", "millrace_http_request_duration_seconds_count",
                method="GET", route="/v1/batches/{batch_id}") >= 20
    assert grew("gateway", "millrace_http_requests_total", method="POST", route="/v1/files",
                status="200") >= 1
    assert grew("gateway", "millrace_lines_ingested_total", source="file") >= 7

    assert grew("worker", "millrace_requests_admitted_total", model=model) >= 6
    assert grew("worker", "millrace_requests_finished_total", model=model) >= 6
    assert grew("worker", "millrace_requests_failed_total", model=model, code="400") >= 1
    assert grew("worker", "millrace_prompt_tokens_total", model=model) > 0
    assert 0 < grew("worker", "millrace_generation_tokens_total", model=model) <= 6 * 4
    assert grew("worker", "millrace_engine_step_seconds_count") > 0
    assert ("millrace_engine_requests_running", frozenset({("model", model)})) in after["worker"]
    lag = [dict(ls) for (n, ls) in after["worker"] if n == "millrace_consumer_lag_messages"]
    assert lag and all("requests" in labels["topic"] for labels in lag)

    assert grew("sink", "millrace_lines_written_total", file="output") >= 6
    assert grew("sink", "millrace_lines_written_total", file="errors") >= 1
    assert grew("sink", "millrace_batches_finished_total", status="completed") >= 1
    assert grew("sink", "millrace_batch_duration_seconds_count") >= 1
    assert grew("sink", "millrace_webhook_attempts_total", outcome="delivered") >= 1

    statuses = {dict(ls)["status"] for (n, ls) in after["aggregator"] if n == "millrace_batches"}
    assert {"validating", "in_progress", "finalizing", "cancelling"} <= statuses
    assert any(n == "millrace_consumer_lag_messages" for (n, _) in after["aggregator"])
