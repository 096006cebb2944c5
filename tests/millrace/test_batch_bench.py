"""`millrace bench`'s pipeline measurement, on the session deployment: one small file, every
stage read back from the topics, the table and the saved JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai import OpenAI

from millrace.bench import batch as batch_bench
from tests.deployment import Deployment


def test_a_pipeline_run_is_timed_stage_by_stage(client: OpenAI, deployment: Deployment,
                                                model: str, tmp_path: Path) -> None:
    source = batch_bench.write_jsonl(tmp_path / "in.jsonl",
                                     batch_bench.chat_lines(6, model, max_tokens=8))
    dep = batch_bench.Deployment(client, deployment.endpoints)

    run, stages = batch_bench.pipeline(dep, "millrace, 1 worker(s)", source)

    assert (run.lines, run.failed_lines) == (6, 0)
    assert 0 < run.output_tokens <= 6 * 8
    assert 0 < stages.ingest_s < run.wall_s
    assert stages.engine_ms.p50 > 0 and stages.queue_ms.p50 >= 0
    assert stages.sink_s > 0 and stages.finalize_s > 0
    assert stages.last_response_to_completed_ms < run.wall_s * 1000
    result = batch_bench.BenchResult(model, 6, 8, "here", runs=[run],
                                     stages={run.name: stages})
    assert run.name in batch_bench.table(result)
    saved = json.loads(batch_bench.save(result, tmp_path / "results").read_text())
    assert saved["runs"][0]["tokens_per_s"] == pytest.approx(run.tokens_per_s)
    assert saved["stages"][run.name]["last_response_to_completed_ms"] == pytest.approx(
        stages.last_response_to_completed_ms)
