"""`millrace bench`'s pipeline measurement, on the session deployment: one small file, every
stage read back from the topics, the table and the saved JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai import OpenAI

from gpu_consumer import engine_args
from millrace.settings import Settings
from ops.bench import batch as batch_bench
from ops.bench.costs import Meter
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


def test_the_cpu_and_memory_of_each_service_are_measured_while_a_batch_runs(
        client: OpenAI, deployment: Deployment, model: str, tmp_path: Path) -> None:
    """What `millrace bench` reports per service: every process found by its marker, CPU
    seconds spent during the batch, its peak RSS, and the worker's engine calls (real
    engine here) taken off the worker's CPU."""
    source = batch_bench.write_jsonl(tmp_path / "in.jsonl",
                                     batch_bench.chat_lines(4, model, max_tokens=8))
    dep = batch_bench.Deployment(client, deployment.endpoints, deployment.data_dir)
    meter = Meter(deployment.data_dir, deployment.endpoints["metrics"])  # type: ignore[arg-type]
    assert {"gateway", "worker", "aggregator", "sink", "broker", "redis"} <= set(meter.pids)

    meter.start()
    run, _ = batch_bench.pipeline(dep, "millrace, 1 worker(s)", source)
    spent = meter.stop()

    assert meter.engine_s > 0  # vLLM steps ran in the worker's loop
    by_process = {s.process: s for s in spent}
    assert by_process["worker"].cpu_s > 0 and by_process["sink"].cpu_s > 0
    assert all(s.peak_rss_mb > 0 for s in spent)
    costs = batch_bench._costs(spent, run.lines, meter.engine_s)
    assert costs["worker"].cpu_s == pytest.approx(
        max(sum(s.cpu_s for s in spent if s.process.startswith("worker")) - meter.engine_s, 0))
    assert costs["gateway"].processes == sum(1 for p in meter.pids if p.startswith("gateway"))
    assert costs["sink"].ms_per_request == pytest.approx(
        by_process["sink"].cpu_s * 1000 / run.lines)


def test_the_gpu_plan_runs_one_worker_with_vllm_s_defaults() -> None:
    """No setting of its own: on the GPU build the worker's vLLM arguments (and so every
    run of the bench) keep vLLM's defaults — CUDA graphs, dtype auto."""
    plan = batch_bench.Plan.gpu(lines=500)
    assert (plan.lines, plan.workers, dict(plan.env)) == (500, (1,), {})
    gpu = engine_args.argv(Settings(), "m", "/models/m", cpu=False)
    assert "--enforce-eager" not in gpu and "--dtype" not in gpu
    assert plan.max_tokens > batch_bench.Plan().max_tokens
