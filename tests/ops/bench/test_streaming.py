"""`millrace bench streaming` on the session deployment: single requests produced to the
ingest topic and read back from the responses topic, each one's engine time inside its
end-to-end time, the table and the saved JSON."""

from __future__ import annotations

import json
from pathlib import Path

from ops.bench import streaming
from tests.deployment import Deployment


def test_single_requests_are_timed_from_produce_to_response(deployment: Deployment,
                                                             tmp_path: Path) -> None:
    result = streaming.streaming(deployment.data_dir, deployment.api_key, requests=3)
    assert result.requests == 3  # the warm-up request is not counted
    assert 0 < result.engine_ms.p50 <= result.latency_ms.p99
    # each request's engine call lies inside its produce → response interval
    assert result.overhead_ms.p50 > 0 and result.overhead_ms.mean > 0
    table = streaming.table(result)
    assert "3 single requests" in table and "pipeline overhead" in table
    saved = json.loads(streaming.save(result, tmp_path).read_text())
    assert saved["requests"] == 3
    assert saved["latency_ms"]["p50"] == result.latency_ms.p50
