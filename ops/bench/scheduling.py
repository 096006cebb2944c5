"""`millrace bench --scheduling`: the worker's order of admission, measured on the real
engine, side by side in one run.

1. **Prefix order**: a file whose even lines share one of a few long system prompts (in
   turn, so no two neighbours share one) and whose odd lines each have a system prompt of
   their own, through a 1-worker deployment with `MILLRACE_WORKER_PREFIX_ORDER=true` and
   one with `false`: output tokens/s and the prompt tokens vLLM's prefix cache served.
2. **Priority**: an urgent batch created while one eight times its size runs, on one deployment
   whose worker keeps URGENT_IN_FLIGHT lines in the engine (a full engine, as a GPU's
   batch size keeps it under a large file; with the CPU engine's own size a 256-line
   batch would all be in it at once, and no order would matter): the urgent batch's time
   from create to `completed` without priority (both 0: they take turns) and with it (the
   large one at -1, which any key may ask for).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from openai import OpenAI

from millrace.errors import ComponentError
from millrace.lifecycle.status import BatchStatus
from ops.bench.batch import Deployment, chat_lines, deployment, write_jsonl
from ops.bench.streaming import machine

TERMINAL = {s.value for s in BatchStatus if s.terminal}
SHARED_PROMPTS = 4
PROMPT_WORDS = 300  # ~1,950 tokens of the bundled model's tokenizer
URGENT_IN_FLIGHT = 8


@dataclass
class Ordered:
    """One pass of the prefix file."""

    name: str
    wall_s: float
    output_tokens: int
    cached_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0


@dataclass
class SchedulingResult:
    model: str
    machine: str
    lines: int
    max_tokens: int
    prefix: list[Ordered] = field(default_factory=list)
    # "without priority" / "with priority" → the urgent batch's create → completed (s)
    urgent_s: dict[str, float] = field(default_factory=dict)


def prefix_lines(count: int, model: str, max_tokens: int, words: int = PROMPT_WORDS
                 ) -> list[str]:
    """Even lines: one of SHARED_PROMPTS long system prompts, in turn; odd lines: a long
    system prompt of their own."""
    def prompt(tag: str) -> str:
        return " ".join(f"{tag}-rule-{w}" for w in range(words))

    lines = []
    for i in range(count):
        system = prompt(f"shared{(i // 2) % SHARED_PROMPTS}" if i % 2 == 0 else f"own{i}")
        lines.append(json.dumps({
            "custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": max_tokens, "temperature": 0,
                     "messages": [{"role": "system", "content": system},
                                  {"role": "user", "content": f"Summarise rule {i}."}]}}))
    return lines


def _create(client: OpenAI, source: Path, priority: int = 0) -> str:
    with source.open("rb") as f:
        upload = client.files.create(file=f, purpose="batch")
    return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                 completion_window="24h",
                                 extra_body={"priority": priority} if priority else None).id


def _wait(client: OpenAI, batch_id: str, until: set[str], timeout: float = 3600) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        time.sleep(0.2)
    raise ComponentError(f"batch {batch_id} not {until} after {timeout}s")


def ordered(dep: Deployment, name: str, source: Path) -> Ordered:
    """The file through the deployment: wall time, output tokens and cached prompt
    tokens (the batch's usage)."""
    started = time.monotonic()
    batch = _wait(dep.client, _create(dep.client, source), TERMINAL)
    wall = time.monotonic() - started
    if batch.status != "completed" or (batch.request_counts and batch.request_counts.failed):
        raise ComponentError(f"{name}: batch ended {batch.status}, {batch.request_counts}")
    usage = batch.usage
    cached = usage.input_tokens_details.cached_tokens if usage else 0
    return Ordered(name, wall, usage.output_tokens if usage else 0, cached)


def urgent_after(dep: Deployment, big: Path, urgent: Path, big_priority: int) -> float:
    """Seconds from creating `urgent` (while `big` runs) to its `completed`; both end."""
    big_id = _create(dep.client, big, big_priority)
    _wait(dep.client, big_id, {"in_progress", *TERMINAL})
    started = time.monotonic()
    done = _wait(dep.client, _create(dep.client, urgent), TERMINAL)
    spent = time.monotonic() - started
    finished = _wait(dep.client, big_id, TERMINAL)
    if done.status != "completed" or finished.status != "completed":
        raise ComponentError(f"urgent {done.status}, big {finished.status}")
    return spent


def run(work: Path, model: str, lines: int = 64, max_tokens: int = 16,
        say: Any = None) -> SchedulingResult:
    def note(text: str) -> None:
        if say is not None:
            say(text)

    name = model.partition("=")[0]
    env = {"MILLRACE_MODEL": model} if "=" in model else {}
    result = SchedulingResult(name, machine(), lines, max_tokens)
    source = write_jsonl(work / "prefix.jsonl", prefix_lines(lines, name, max_tokens))
    for grouped in (False, True):
        label = "prefix order" if grouped else "file order"
        note(f"{label}, {lines} lines sharing {SHARED_PROMPTS} prompts every other line …")
        with deployment(work, "vllm", model, 1,
                        {**env, "MILLRACE_WORKER_PREFIX_ORDER": str(grouped).lower()}) as dep:
            result.prefix.append(ordered(dep, label, source))
    big = write_jsonl(work / "big.jsonl", chat_lines(lines * 4, name, max_tokens))
    # large enough to need several rounds of the engine's slots: taking turns, it gets
    # half of them; with priority, all but the minimum share
    urgent = write_jsonl(work / "urgent.jsonl", chat_lines(max(lines // 2, 2), name,
                                                           max_tokens))
    with deployment(work, "vllm", model, 1,
                    {**env, "MILLRACE_WORKER_MAX_IN_FLIGHT": str(URGENT_IN_FLIGHT)}) as dep:
        for label, big_priority in (("without priority", 0), ("with priority", -1)):
            note(f"an urgent batch during a {lines * 4}-line one, {label} …")
            result.urgent_s[label] = urgent_after(dep, big, urgent, big_priority)
    return result


def table(result: SchedulingResult) -> str:
    out = [f"millrace bench --scheduling: {result.model}, max_tokens {result.max_tokens} "
           f"({result.machine})", "",
           f"{'admission order':28} {'lines':>6} {'wall s':>8} {'tok/s':>8} {'cached tok':>11}"]
    out += [f"{r.name:28} {result.lines:6d} {r.wall_s:8.2f} {r.tokens_per_s:8.1f} "
            f"{r.cached_tokens:11d}" for r in result.prefix]
    by = {r.name: r for r in result.prefix}
    if len(by) == 2 and by["file order"].tokens_per_s:
        out.append(f"{'prefix / file order (tok/s)':28} "
                   f"{by['prefix order'].tokens_per_s / by['file order'].tokens_per_s:.3f}")
    out += ["", f"{'urgent batch, create → done':28} {'s':>8}  "
                f"({URGENT_IN_FLIGHT} lines in the engine at once)"]
    out += [f"{label:28} {spent:8.2f}" for label, spent in result.urgent_s.items()]
    if result.urgent_s.get("with priority"):
        out.append(f"{'without / with priority':28} "
                   f"{result.urgent_s['without priority'] / result.urgent_s['with priority']:.2f}")
    return "\n".join(out)


def save(result: SchedulingResult, results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"scheduling-{time.strftime('%Y%m%dT%H%M%S')}.json"
    data = asdict(result)
    for ran, raw in zip(result.prefix, data["prefix"], strict=True):
        raw["tokens_per_s"] = ran.tokens_per_s
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
