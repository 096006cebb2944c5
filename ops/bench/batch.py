"""`millrace bench`: one JSONL file through vLLM directly and through millrace, side by side.

In one run, on this machine, with the same model and the same file:

1. `vllm run-batch` (vLLM's own OpenAI batch runner) on the file, its batch phase timed
   apart from the engine's start-up (ops.bench.vllm_run_batch), because a millrace worker
   has its engine loaded before a batch arrives;
2. the file through a fresh `millrace up` deployment (upload → `completed`) with 1 worker,
   then with 2 workers (on CPU each gets half the cores);
3. single requests through an open stream batch of the 1-worker deployment: the
   pipeline's latency overhead (ops.bench.streaming);
4. a `--ingest-lines` file (~400 bytes a line) through a deployment with the zero-cost echo
   engine, after a small warm-up batch: the orchestration ceiling (requests/s end to end),
   the ingest rate, and what each service process spent on it — CPU time per request (read
   from /proc before and after; the worker's engine calls, timed by the worker itself, are
   taken off) and peak RSS;

and per-stage latency of each pipeline run, read back from the topics: gateway ingest
(create → every line acknowledged in Kafka), queue wait and engine time per line (from the
response records), sink (last response → files written) and finalize (files → completed).

`--gpu`: the same on a GPU host with a real model (`--model name=folder`), bigger files and
vLLM's own dtype; one worker (one GPU).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from openai import OpenAI

from gpu_consumer import models
from millrace.errors import ComponentError
from millrace.kafka import KafkaConfig
from millrace.lifecycle.status import BatchStatus
from millrace.records import (
    BatchFilesReady,
    BatchTransition,
    BatchValidated,
    ResponseRecord,
    parse_event,
)
from millrace.settings import BUNDLED_CHAT_MODEL, KafkaSettings, Settings
from millrace.topics import Topics
from ops.bench.costs import Meter, Spent, service
from ops.bench.streaming import Percentiles, StreamingResult, machine, streaming
from ops.embedded import die_with_parent, free_port

TERMINAL = {"completed", "failed", "expired", "cancelled"}


@dataclass
class Run:
    name: str
    lines: int
    wall_s: float
    output_tokens: int
    failed_lines: int = 0
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.lines / self.wall_s if self.wall_s else 0.0


@dataclass
class Stages:
    """Where a pipeline run's time went (seconds unless named _ms)."""

    ingest_s: float
    queue_ms: Percentiles
    engine_ms: Percentiles
    sink_s: float
    finalize_s: float

    @property
    def last_response_to_completed_ms(self) -> float:
        return (self.sink_s + self.finalize_s) * 1000


@dataclass
class ServiceCost:
    """What one service's processes spent on a batch."""

    processes: int
    cpu_s: float
    ms_per_request: float
    peak_rss_mb: float  # the largest of its processes (VmHWM: since the process started)


@dataclass
class BenchResult:
    model: str
    lines: int
    max_tokens: int
    machine: str
    runs: list[Run] = field(default_factory=list)
    stages: dict[str, Stages] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    # echo run: per service (gateway, worker, aggregator, sink; broker and redis apart)
    costs: dict[str, ServiceCost] = field(default_factory=dict)
    engine_call_s: float = 0.0  # of the echo worker, taken off its CPU time
    vllm_args: str = ""  # what every vLLM run was given (after --model, --served-model-name)
    ingest_mb: float = 0.0
    streaming: StreamingResult | None = None


SYSTEM = ("You are a concise assistant. Answer in plain sentences, without lists, headings or "
          "markup, and keep to the facts you are sure of.")


def chat_lines(count: int, model: str, max_tokens: int, system: bool = False) -> list[str]:
    """Chat request lines; with `system`, each has a system message too (~400 bytes a
    line: a 50,000-line file is ~20 MB)."""
    topics = ["rivers", "bread", "comets", "chess", "owls", "glass", "tides", "maps"]
    first = [{"role": "system", "content": SYSTEM}] if system else []
    return [json.dumps({
        "custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "max_tokens": max_tokens, "temperature": 0,
                 "messages": [*first, {"role": "user", "content":
                                       f"Write two sentences about {topics[i % len(topics)]} "
                                       f"and the number {i}."}]},
    }) for i in range(count)]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# --- vLLM directly ------------------------------------------------------------------------
def vllm_argv(settings: Settings, model: str) -> list[str]:
    """The vLLM arguments a millrace worker gives `model` (engine_args): the direct runs
    get exactly the same engine."""
    from gpu_consumer import engine_args

    folder = models.resolve({model: settings.served_models().get(model)},
                            settings.model_cache)[model]
    return engine_args.argv(settings, model, str(folder), cpu=engine_args.cpu_build())


def vllm_env(settings: Settings) -> dict[str, str]:
    from gpu_consumer import engine_args
    from gpu_consumer.vllm_engine import cpu_runtime_env

    cpu = cpu_runtime_env(settings) if engine_args.cpu_build() else {}
    return {**os.environ, "HF_HUB_OFFLINE": "1", **cpu}


def direct_vllm(settings: Settings, source: Path, work: Path, model: str,
                repeat: int = 1) -> Run:
    """`vllm run-batch` on the file (its batch phase `repeat` times on one engine; the
    median): vLLM's own serving layer, without Kafka."""
    out, timing = work / "direct.out.jsonl", work / "direct.timing.json"
    argv = [sys.executable, "-m", "ops.bench.vllm_run_batch", str(timing), str(repeat),
            "-i", str(source), "-o", str(out), *vllm_argv(settings, model)]
    started = time.perf_counter()
    with (work / "run_batch.log").open("ab") as log:
        subprocess.run(argv, env=vllm_env(settings), stdout=log, stderr=subprocess.STDOUT,
                       check=True, preexec_fn=die_with_parent)
    total_s = time.perf_counter() - started
    batch_s = json.loads(timing.read_text())["batch_s"]
    tokens, failed = _usage(out.read_text().splitlines())
    return Run("vllm run-batch", len(source.read_text().splitlines()), statistics.median(batch_s),
               tokens, failed, note=f"batch phase, median of {_seconds(batch_s)}; "
                                    f"{total_s:.1f}s in all with engine start-up")


def _seconds(spent: list[float]) -> str:
    return "/".join(f"{s:.2f}" for s in spent) + " s"


def offline_vllm(settings: Settings, source: Path, work: Path, model: str,
                 repeat: int = 1) -> Run:
    """vLLM's offline engine (`LLM.chat` over every line at once, `repeat` times; the
    median): no serving layer, no HTTP shapes, no Kafka — the engine's own ceiling here."""
    timing = work / "offline.timing.json"
    argv = [sys.executable, "-m", "ops.bench.vllm_offline", str(timing), str(repeat),
            str(source), *vllm_argv(settings, model)]
    started = time.perf_counter()
    with (work / "offline.log").open("ab") as log:
        subprocess.run(argv, env=vllm_env(settings), stdout=log, stderr=subprocess.STDOUT,
                       check=True, preexec_fn=die_with_parent)
    total_s = time.perf_counter() - started
    timed = json.loads(timing.read_text())
    return Run("vllm offline (LLM.chat)", timed["lines"], statistics.median(timed["batch_s"]),
               timed["output_tokens"], note=f"generate phase, median of "
                                            f"{_seconds(timed['batch_s'])}; {total_s:.1f}s in all")


def _usage(lines: list[str]) -> tuple[int, int]:
    """(completion tokens, failed lines) of OpenAI batch output lines."""
    tokens = failed = 0
    for raw in lines:
        line = json.loads(raw)
        response = line.get("response") or {}
        if line.get("error") or response.get("status_code") != 200:
            failed += 1
            continue
        tokens += response["body"].get("usage", {}).get("completion_tokens", 0)
    return tokens, failed


# --- millrace -------------------------------------------------------------------------------
@dataclass
class Deployment:
    client: OpenAI
    endpoints: dict[str, Any]
    data_dir: Path | None = None


@contextmanager
def deployment(work: Path, engine: str, model: str, workers: int,
               extra_env: dict[str, str] | None = None) -> Iterator[Deployment]:
    """A fresh `millrace up` in its own data dir; stopped (SIGTERM) on exit."""
    data_dir = work / f"up-{engine}-{workers}w-{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MILLRACE_") or k in ("MILLRACE_MODEL_CACHE", "MILLRACE_VLLM_ARGS",
                                                     "MILLRACE_VLLM_MODEL_ARGS")}
    env.update({"MILLRACE_WORKERS": str(workers), **(extra_env or {})})
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops", "up", "--data-dir", str(data_dir),
         "--port", str(free_port()), "--engine", engine, "--model", model],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        preexec_fn=die_with_parent,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("millrace ready: "):
            raise ComponentError(f"millrace up did not start (see {data_dir}/logs): {line!r}")
        base_url, key = line.split()[2:4]
        endpoints = json.loads((data_dir / "endpoints.json").read_text())
        client = OpenAI(base_url=base_url, api_key=key.removeprefix("api_key="),
                        max_retries=0, timeout=600)
        yield Deployment(client, endpoints, data_dir)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def pipeline(dep: Deployment, name: str, source: Path) -> tuple[Run, Stages]:
    client = dep.client
    with source.open("rb") as f:
        upload = client.files.create(file=f, purpose="batch")
    created = time.time()
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    while batch.status not in TERMINAL:
        # the times come from the records' Kafka timestamps: polling more often would only
        # take CPU from the engine being measured
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    if batch.status != "completed" or not batch.output_file_id:
        raise ComponentError(f"{name}: batch ended {batch.status}: {batch.errors}")
    output = client.files.content(batch.output_file_id).text.splitlines()
    errors = (client.files.content(batch.error_file_id).text.splitlines()
              if batch.error_file_id else [])
    tokens, _ = _usage(output)
    stages, completed_at = _stages(dep.endpoints, batch.id, created)
    run = Run(name, len(output) + len(errors), completed_at - created, tokens, len(errors))
    return run, stages


def repeated(dep: Deployment, name: str, source: Path, repeat: int) -> tuple[Run, Stages]:
    """The file through the deployment `repeat` times, one batch after the other: the
    median run (and its stages), the wall time of each in its note."""
    runs = sorted((pipeline(dep, name, source) for _ in range(repeat)),
                  key=lambda done: done[0].wall_s)
    run, stages = runs[len(runs) // 2]
    if repeat > 1:
        run.note = f"median of {_seconds([r.wall_s for r, _ in runs])}"
    return run, stages


def _stages(endpoints: dict[str, Any], batch_id: str, created: float) -> tuple[Stages, float]:
    """Per-stage timings of one batch from the Kafka timestamps of its records."""
    topics = Topics(endpoints["topic_prefix"])
    responses = _records(endpoints["kafka_bootstrap"], topics.responses, batch_id)
    events = _records(endpoints["kafka_bootstrap"], topics.batch_events, batch_id)
    validated = files_ready = completed = None
    for at, value in events:
        event = parse_event(value)
        if isinstance(event, BatchValidated):
            validated = at
        elif isinstance(event, BatchFilesReady):
            files_ready = at
        elif isinstance(event, BatchTransition) and event.to_status == BatchStatus.COMPLETED:
            completed = at
    if validated is None or files_ready is None or completed is None:
        raise ComponentError(f"events of {batch_id} incomplete on {topics.batch_events}")
    parsed = [ResponseRecord.model_validate_json(value) for _, value in responses]
    last_response = max(at for at, _ in responses)
    stages = Stages(
        ingest_s=validated - created,
        queue_ms=Percentiles.of([r.queue_ms for r in parsed if r.queue_ms is not None]),
        engine_ms=Percentiles.of([r.engine_ms for r in parsed if r.engine_ms is not None]),
        sink_s=files_ready - last_response,
        finalize_s=completed - files_ready,
    )
    return stages, completed


def _records(bootstrap: str, topic: str, key: str) -> list[tuple[float, bytes]]:
    """(timestamp s, value) of every record of `topic` keyed `key`, read to the end."""
    config = KafkaConfig(KafkaSettings(bootstrap=bootstrap), "bench").consumer(
        f"millrace-bench-{uuid.uuid4().hex}", **{"enable.partition.eof": True})
    consumer = Consumer(config)
    partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    at_end: set[int] = set()
    found: list[tuple[float, bytes]] = []
    wanted = key.encode()
    while len(at_end) < len(partitions):
        for msg in consumer.consume(1000, 1.0):
            if msg.error():
                at_end.add(msg.partition() or 0)
            elif msg.key() == wanted:
                found.append((msg.timestamp()[1] / 1000, msg.value() or b""))
    consumer.close()
    return found


# --- the whole benchmark ------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What one `millrace bench` runs."""

    lines: int = 64
    max_tokens: int = 32
    ingest_lines: int = 50_000
    direct: bool = True
    workers: tuple[int, ...] = (1, 2)
    streaming_requests: int = 30
    long_poll: bool = True  # a 1-worker run with a 500 ms fetch wait beside the default
    # each real-engine run this many times, the median kept (this box is noisy: ±30%)
    repeat: int = 3
    # environment of the deployments (e.g. MILLRACE_VLLM_ARGS: the direct runs read the
    # same settings)
    env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def gpu(cls, **changes: Any) -> Plan:
        """A GPU host: a bigger file and longer answers, one worker per GPU (one here); the
        engine with the GPU build's defaults (engine_args: CUDA graphs, dtype auto)."""
        return cls(**{"lines": 2000, "max_tokens": 128, "workers": (1,), "repeat": 1,
                      **changes})


WARM_UP_LINES = 200
LONG_POLL_MS = 500
LONG_POLL_RUN = f"millrace, 1 worker, {LONG_POLL_MS} ms"


def run(settings: Settings, work: Path, plan: Plan = Plan(),
        model: str = BUNDLED_CHAT_MODEL, say: Any = None) -> BenchResult:
    """`model`: a served name, or `name=folder` (a local HF folder, as MILLRACE_MODEL)."""
    def note(text: str) -> None:
        if say is not None:
            say(text)

    name = model.partition("=")[0]
    env = dict(plan.env)
    if "=" in model:
        env["MILLRACE_MODEL"] = model
    settings = settings.model_copy(update={"model": model, **(
        {"vllm_args": env["MILLRACE_VLLM_ARGS"]} if "MILLRACE_VLLM_ARGS" in env else {})})
    work.mkdir(parents=True, exist_ok=True)
    source = write_jsonl(work / "input.jsonl", chat_lines(plan.lines, name, plan.max_tokens))
    result = BenchResult(name, plan.lines, plan.max_tokens, machine())
    result.vllm_args = " ".join(vllm_argv(settings, name)[4:])
    if plan.direct:
        note(f"vllm offline engine on {plan.lines} lines …")
        result.runs.append(offline_vllm(settings, source, work, name, plan.repeat))
        note(f"vllm run-batch on {plan.lines} lines …")
        result.runs.append(direct_vllm(settings, source, work, name, plan.repeat))
    for workers in plan.workers:
        note(f"millrace, {workers} worker(s), {plan.lines} lines …")
        with deployment(work, "vllm", model, workers, env) as dep:
            run_, stages = repeated(dep, f"millrace, {workers} worker(s)", source, plan.repeat)
            if workers == 1 and plan.streaming_requests:
                note(f"streaming, {plan.streaming_requests} single requests …")
                result.streaming = streaming(dep.data_dir or work, dep.client.api_key,
                                             requests=plan.streaming_requests, model=name)
        result.runs.append(run_)
        result.stages[run_.name] = stages
    if plan.long_poll:
        # the same with every consumer letting the broker hold an empty fetch 500 ms: what
        # the Kafka clients' polling costs a CPU host whose cores the engine uses
        note(f"millrace, 1 worker, fetch wait {LONG_POLL_MS} ms, {plan.lines} lines …")
        with deployment(work, "vllm", model, 1,
                        {**env, "MILLRACE_KAFKA__FETCH_WAIT_MS": str(LONG_POLL_MS)}) as dep:
            run_, stages = repeated(dep, LONG_POLL_RUN, source, plan.repeat)
        result.runs.append(run_)
        result.stages[run_.name] = stages
    note(f"millrace, echo engine, {plan.ingest_lines} lines …")
    big = write_jsonl(work / "ingest.jsonl",
                      chat_lines(plan.ingest_lines, name, plan.max_tokens, system=True))
    result.ingest_mb = big.stat().st_size / 1e6
    with deployment(work, "echo", model, 1, env) as dep:
        warm = write_jsonl(work / "warm.jsonl", chat_lines(WARM_UP_LINES, name, 8))
        pipeline(dep, "warm-up", warm)  # first batch of a fresh deployment: groups settle
        meter = Meter(dep.data_dir or work, dep.endpoints.get("metrics", {}))
        meter.start()
        echo, stages = pipeline(dep, "millrace, echo engine", big)
        spent = meter.stop()
    result.runs.append(echo)
    result.stages[echo.name] = stages
    result.engine_call_s = meter.engine_s
    result.costs = _costs(spent, echo.lines, meter.engine_s)
    result.ratios = _ratios(result)
    return result


PIPELINE = ("gateway", "worker", "aggregator", "sink")


def _costs(spent: list[Spent], requests: int, engine_s: float) -> dict[str, ServiceCost]:
    """Per service; the worker's engine calls taken off its CPU time (the echo engine's
    work is not the pipeline's)."""
    costs: dict[str, ServiceCost] = {}
    for one in spent:
        name = service(one.process)
        was = costs.get(name, ServiceCost(0, 0.0, 0.0, 0.0))
        costs[name] = ServiceCost(was.processes + 1, was.cpu_s + one.cpu_s, 0.0,
                                  max(was.peak_rss_mb, one.peak_rss_mb))
    if "worker" in costs:
        worker = costs["worker"]
        costs["worker"] = ServiceCost(worker.processes, max(worker.cpu_s - engine_s, 0.0),
                                      0.0, worker.peak_rss_mb)
    for name, cost in costs.items():
        costs[name] = ServiceCost(cost.processes, cost.cpu_s,
                                  cost.cpu_s * 1000 / requests if requests else 0.0,
                                  cost.peak_rss_mb)
    return costs


def _ratios(result: BenchResult) -> dict[str, float]:
    by_name = {r.name: r for r in result.runs}
    ratios: dict[str, float] = {}
    one = by_name.get("millrace, 1 worker(s)")
    two = by_name.get("millrace, 2 worker(s)")
    if one is not None and "vllm run-batch" in by_name:
        ratios["pipeline / vllm direct (tokens/s)"] = (
            one.tokens_per_s / by_name["vllm run-batch"].tokens_per_s)
    if LONG_POLL_RUN in by_name and "vllm run-batch" in by_name:
        ratios["pipeline, 500 ms fetch wait / vllm direct (tokens/s)"] = (
            by_name[LONG_POLL_RUN].tokens_per_s / by_name["vllm run-batch"].tokens_per_s)
    if one is not None and "vllm offline (LLM.chat)" in by_name:
        ratios["pipeline / vllm offline (tokens/s)"] = (
            one.tokens_per_s / by_name["vllm offline (LLM.chat)"].tokens_per_s)
    if one is not None and two is not None:
        ratios["2 workers / 1 worker (tokens/s)"] = two.tokens_per_s / one.tokens_per_s
    echo = result.stages["millrace, echo engine"]
    ratios["ingest lines/s (echo file)"] = by_name["millrace, echo engine"].lines / echo.ingest_s
    ratios["orchestration ceiling requests/s"] = by_name["millrace, echo engine"].requests_per_s
    if result.costs:
        ratios["pipeline CPU ms per request"] = sum(
            result.costs[s].ms_per_request for s in PIPELINE if s in result.costs)
        aggregator = result.costs.get("aggregator")
        if aggregator is not None and aggregator.ms_per_request:
            ratios["aggregator responses/s per core"] = 1000 / aggregator.ms_per_request
    return ratios


def table(result: BenchResult) -> str:
    out = [f"millrace bench: {result.lines} chat lines, max_tokens {result.max_tokens}, "
           f"{result.model} ({result.machine})", f"vLLM arguments: {result.vllm_args}", "",
           f"{'run':28} {'lines':>7} {'wall s':>8} {'out tok':>8} {'tok/s':>8} {'req/s':>8}"]
    for r in result.runs:
        out.append(f"{r.name:28} {r.lines:7d} {r.wall_s:8.2f} {r.output_tokens:8d} "
                   f"{r.tokens_per_s:8.1f} {r.requests_per_s:8.1f}"
                   + (f"  ({r.note})" if r.note else "")
                   + (f"  [{r.failed_lines} failed]" if r.failed_lines else ""))
    out += ["", f"{'stage':28} {'ingest s':>9} {'queue p50/p99 ms':>18} "
                f"{'engine p50/p99 ms':>18} {'sink s':>7} {'final s':>7} {'last→done ms':>12}"]
    for name, s in result.stages.items():
        out.append(f"{name:28} {s.ingest_s:9.2f} {s.queue_ms.p50:8.0f}/{s.queue_ms.p99:<9.0f} "
                   f"{s.engine_ms.p50:8.0f}/{s.engine_ms.p99:<9.0f} {s.sink_s:7.2f} "
                   f"{s.finalize_s:7.2f} {s.last_response_to_completed_ms:12.0f}")
    if result.costs:
        out += ["", f"echo batch, per service{'':5} {'procs':>6} {'CPU s':>7} "
                    f"{'CPU ms/req':>11} {'peak RSS MB':>12}"]
        for name, c in sorted(result.costs.items(), key=lambda kv: _order(kv[0])):
            label = name + (" (engine calls off)" if name == "worker" else "")
            out.append(f"{label:28} {c.processes:6d} {c.cpu_s:7.2f} {c.ms_per_request:11.3f} "
                       f"{c.peak_rss_mb:12.0f}")
    out += ["", "summary"] + [f"  {name:42} {value:>12}" for name, value in summary(result)]
    return "\n".join(out)


def _order(name: str) -> int:
    return (PIPELINE.index(name) if name in PIPELINE else len(PIPELINE) + 1)


def summary(result: BenchResult) -> list[tuple[str, str]]:
    """The figures issue 15 names, in one table."""
    by_name = {r.name: r for r in result.runs}
    echo = by_name.get("millrace, echo engine")
    stages = result.stages.get("millrace, echo engine")
    rows: list[tuple[str, str]] = []
    if echo is not None and stages is not None:
        rows += [
            (f"ingest, {echo.lines:,} lines / {result.ingest_mb:.1f} MB (s)",
             f"{stages.ingest_s:.2f}"),
            ("ingest lines/s", f"{echo.lines / stages.ingest_s:,.0f}"),
            ("echo upload → completed (s)", f"{echo.wall_s:.2f}"),
            ("echo requests/s end to end", f"{echo.requests_per_s:,.0f}"),
            ("echo last response → completed (ms)",
             f"{stages.last_response_to_completed_ms:.0f}"),
        ]
    if result.costs:
        rows.append(("pipeline CPU ms/request (services, no engine)",
                     f"{result.ratios.get('pipeline CPU ms per request', 0):.3f}"))
        rows += [(f"  {name}", f"{result.costs[name].ms_per_request:.3f}")
                 for name in PIPELINE if name in result.costs]
        if "aggregator responses/s per core" in result.ratios:
            rows.append(("aggregator responses/s per core (its CPU)",
                         f"{result.ratios['aggregator responses/s per core']:,.0f}"))
        rows.append(("peak RSS MB " + "/".join(PIPELINE),
                     "/".join(f"{result.costs[n].peak_rss_mb:.0f}" for n in PIPELINE
                              if n in result.costs)))
    if "pipeline / vllm direct (tokens/s)" in result.ratios:
        rows.append(("pipeline / vllm run-batch (tokens/s)",
                     f"{result.ratios['pipeline / vllm direct (tokens/s)']:.3f}"))
    long_poll = result.ratios.get("pipeline, 500 ms fetch wait / vllm direct (tokens/s)")
    if long_poll is not None:
        rows.append(("  with a 500 ms fetch wait", f"{long_poll:.3f}"))
    if "pipeline / vllm offline (tokens/s)" in result.ratios:
        rows.append(("pipeline / vllm offline engine (tokens/s)",
                     f"{result.ratios['pipeline / vllm offline (tokens/s)']:.3f}"))
    if result.streaming is not None:
        o = result.streaming.overhead_ms
        rows.append(("streaming overhead p50 / p99 (ms)", f"{o.p50:.1f} / {o.p99:.1f}"))
    return rows


def save(result: BenchResult, results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"batch-{time.strftime('%Y%m%dT%H%M%S')}.json"
    data = asdict(result)
    for run_, raw in zip(result.runs, data["runs"], strict=True):
        raw.update(tokens_per_s=run_.tokens_per_s, requests_per_s=run_.requests_per_s)
    for name, stages in result.stages.items():
        data["stages"][name]["last_response_to_completed_ms"] = (
            stages.last_response_to_completed_ms)
    data["summary"] = dict(summary(result))
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
