"""`python -m ops.bench.vllm_run_batch TIMING.json REPEAT <vllm run-batch arguments>`:
vLLM's own batch runner, unchanged, with the batch phase timed apart from the engine's
start-up, REPEAT times on the one engine.

The timings (seconds from reading the input to having written the output) are what a
millrace worker, whose engine is loaded before a batch arrives, is compared with.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any


def main() -> None:
    from vllm.entrypoints.launchers import run_batch as vllm_run_batch

    timing, repeat = Path(sys.argv[1]), int(sys.argv[2])
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    args = vllm_run_batch.parse_args()  # type: ignore[no-untyped-call]
    original = vllm_run_batch.run_batch

    async def timed(engine_client: Any, batch_args: Any) -> None:
        spent = []
        for _ in range(repeat):
            started = time.perf_counter()
            await original(engine_client, batch_args)
            spent.append(time.perf_counter() - started)
        timing.write_text(json.dumps({"batch_s": spent}))

    vllm_run_batch.run_batch = timed  # type: ignore[assignment]  # looked up at call time
    asyncio.run(vllm_run_batch.main(args))


if __name__ == "__main__":
    main()
