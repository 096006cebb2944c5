"""What a deployment's processes spend: CPU time and peak RSS from /proc (Linux), per
service, and the worker's own timing of its engine calls (its Prometheus metrics).

Processes are found by their readiness markers (`<data-dir>/run/<name>.ready`: the pid),
so this measures a `millrace up` deployment as it runs, from outside.
"""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from millrace import readiness

TICK = os.sysconf("SC_CLK_TCK")
ENGINE_METRIC = "millrace_engine_call_seconds_total"


def processes(data_dir: Path) -> dict[str, int]:
    """Process name (gateway, gateway-2, worker, …, broker, redis) → pid, of the markers
    whose process runs (a marker can outlive a process that was killed)."""
    return {name: pid for name, pid in readiness.pids(data_dir).items()
            if Path(f"/proc/{pid}").exists()}


def service(process: str) -> str:
    """The service a process belongs to: `gateway-2` → `gateway`."""
    return process.split("-")[0]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def engine_call_s(metrics_urls: dict[str, str]) -> float:
    """Seconds the workers' loops spent in engine calls, summed over the workers."""
    total = 0.0
    for name, url in metrics_urls.items():
        if service(name) != "worker":
            continue
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        total += sum(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith(ENGINE_METRIC))
    return total


@dataclass(frozen=True)
class Spent:
    process: str
    cpu_s: float
    peak_rss_mb: float


class Meter:
    """CPU of every process of a deployment between `start` and `stop`."""

    def __init__(self, data_dir: Path, metrics_urls: dict[str, str]) -> None:
        self.pids = processes(data_dir)
        self.metrics_urls = metrics_urls
        self._cpu: dict[str, float] = {}
        self._engine = 0.0
        self.engine_s = 0.0

    def start(self) -> None:
        self._cpu = {name: cpu_s(pid) for name, pid in self.pids.items()}
        self._engine = engine_call_s(self.metrics_urls)

    def stop(self) -> list[Spent]:
        self.engine_s = engine_call_s(self.metrics_urls) - self._engine
        return [Spent(name, cpu_s(pid) - self._cpu[name], peak_rss_mb(pid))
                for name, pid in sorted(self.pids.items())]
