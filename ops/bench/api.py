"""`millrace bench --api`: the gateway under load, with 1 and with N gateway processes, side
by side in one run.

Each run starts its own `millrace up` (echo engine), finishes a small batch, then points
`wrk` (Debian package `wrk`; not installed by `make`) at `GET /v1/batches/{id}` — the call
clients poll — with `--connections` open connections for `--seconds`, and records requests/s,
latency percentiles and any non-2xx answers.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from millrace.errors import ComponentError
from ops.bench.streaming import machine
from ops.chaos import Api, Receiver, deployment

_LATENCY = re.compile(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


@dataclass(frozen=True)
class ApiRun:
    gateways: int
    connections: int
    seconds: int
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int


@dataclass(frozen=True)
class ApiResult:
    runs: list[ApiRun]
    machine: str


def wrk(url: str, api_key: str, connections: int, seconds: int) -> tuple[float, dict[str, float],
                                                                        int]:
    exe = shutil.which("wrk")
    if exe is None:
        raise ComponentError("millrace bench --api needs wrk (apt-get install wrk)")
    out = subprocess.run([exe, "-t2", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "-H", f"Authorization: Bearer {api_key}", url],
                         capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    latency = {p: float(v) * _UNIT_MS[u] for p, v, u in _LATENCY.findall(out)}
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rate, latency, int(bad[1]) if bad else 0


def run_one(gateways: int, connections: int, seconds: int) -> ApiRun:
    with deployment(Path(tempfile.mkdtemp(prefix="millrace-bench-api-")), "echo",
                    {"MILLRACE_GATEWAYS": str(gateways)}) as up:
        api, receiver = Api(up), Receiver()
        try:
            batch_id = api.create(10, "bench", receiver.url)
            api.until(lambda: (b := api.batch(batch_id)) and b["status"] == "completed", 120)
        finally:
            receiver.close()
        rate, latency, bad = wrk(f"{up.base_url}/batches/{batch_id}", up.api_key,
                                 connections, seconds)
    return ApiRun(gateways, connections, seconds, round(rate, 1), latency["50"],
                  latency["90"], latency["99"], bad)


def run(gateways: int, connections: int = 200, seconds: int = 30) -> ApiResult:
    counts = sorted({1, gateways})
    return ApiResult([run_one(n, connections, seconds) for n in counts], machine())


def table(result: ApiResult) -> str:
    lines = [f"GET /v1/batches/{{id}} under load ({result.machine})",
             f"{'gateways':>8} {'conns':>6} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} "
             f"{'p99 ms':>8} {'non-2xx':>8}"]
    lines += [f"{r.gateways:>8} {r.connections:>6} {r.requests_per_s:>9.0f} {r.p50_ms:>8.1f} "
              f"{r.p90_ms:>8.1f} {r.p99_ms:>8.1f} {r.non_2xx:>8}" for r in result.runs]
    if len(result.runs) > 1:
        one, most = result.runs[0], result.runs[-1]
        lines.append(f"{most.gateways} gateways / 1: {most.requests_per_s / one.requests_per_s:.2f}"
                     f"x requests/s, p99 {most.p99_ms / one.p99_ms:.2f}x")
    return "\n".join(lines)


def save(result: ApiResult, results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"api-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return path
