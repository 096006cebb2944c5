"""`millrace bench --scheduling`'s pieces: the prefix file's shape, a pass of it and an
urgent batch timed during a large one on the session deployment, and the table."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest
from openai import OpenAI

from gpu_consumer.admission import prefix_key
from millrace.errors import ComponentError
from ops.bench import batch as batch_bench
from ops.bench import scheduling
from tests.deployment import Deployment


def test_the_prefix_file_interleaves_shared_prompts_with_lines_of_their_own() -> None:
    lines = [json.loads(raw) for raw in scheduling.prefix_lines(16, "m", 4)]
    keys = [prefix_key(line["body"]) for line in lines]
    shared, own = keys[0::2], keys[1::2]
    assert len(set(shared)) == scheduling.SHARED_PROMPTS
    assert all(a != b for a, b in pairwise(keys))  # no neighbours share
    assert len(set(own)) == len(own) and not set(own) & set(shared)
    assert len(str(keys[0]).split()) == scheduling.PROMPT_WORDS


def test_a_pass_and_an_urgent_batch_are_timed(client: OpenAI, deployment: Deployment,
                                             model: str, tmp_path: Path) -> None:
    dep = batch_bench.Deployment(client, deployment.endpoints)
    source = batch_bench.write_jsonl(tmp_path / "p.jsonl",
                                     scheduling.prefix_lines(4, model, 2, words=40))
    passed = scheduling.ordered(dep, "prefix order", source)
    assert passed.wall_s > 0 and 0 < passed.output_tokens <= 4 * 2
    too_long = batch_bench.write_jsonl(  # the session's engine takes 2,048 tokens at most
        tmp_path / "long.jsonl", scheduling.prefix_lines(2, model, 2, words=600))
    with pytest.raises(ComponentError, match="failed=2"):  # a failed pass is no figure
        scheduling.ordered(dep, "too long", too_long)
    assert passed.cached_tokens >= 0
    big = batch_bench.write_jsonl(tmp_path / "big.jsonl", batch_bench.chat_lines(6, model, 4))
    urgent = batch_bench.write_jsonl(tmp_path / "u.jsonl", batch_bench.chat_lines(2, model, 2))
    spent = scheduling.urgent_after(dep, big, urgent, big_priority=-1)
    assert spent > 0
    result = scheduling.SchedulingResult(model, "here", 4, 2, [passed, passed],
                                         {"without priority": 2 * spent,
                                          "with priority": spent})
    result.prefix[1] = scheduling.Ordered("file order", passed.wall_s, passed.output_tokens,
                                          0)
    table = scheduling.table(result)
    assert "prefix / file order (tok/s)" in table and "1.000" in table
    assert "without / with priority" in table and "2.00" in table
    saved = json.loads(scheduling.save(result, tmp_path).read_text())
    assert saved["urgent_s"] == result.urgent_s
    assert saved["prefix"][0]["tokens_per_s"] == passed.tokens_per_s
