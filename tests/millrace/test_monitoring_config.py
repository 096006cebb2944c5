"""docker-compose.yml's Prometheus and Grafana: every target is a service that serves metrics
there, and every series the Grafana dashboard queries is one millrace exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import Counter, Gauge, Histogram

from millrace import metrics

ROOT = Path(__file__).parents[2]


def exposed() -> set[str]:
    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            names.add(value._name + "_total")
        elif isinstance(value, Histogram):
            names |= {value._name + s for s in ("_bucket", "_count", "_sum")}
        elif isinstance(value, Gauge):
            names.add(value._name)
    return names


def test_grafana_queries_only_what_millrace_exposes() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana" / "dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"millrace_[a-z_]+", target["expr"])}
    assert len(queried) >= 14
    assert queried <= exposed(), queried - exposed()


def test_prometheus_scrapes_every_service_where_it_serves() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    scrape = yaml.safe_load((ROOT / "docs" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}
    assert targets == {"gateway:8000", "worker:9100", "aggregator:9100", "sink:9100"}
    for target in targets:
        name, port = target.split(":")
        env = services[name]["environment"]
        assert env["MILLRACE_HOST"] == "0.0.0.0"
        assert (env.get("MILLRACE_METRICS_PORT") or env.get("MILLRACE_PORT")) == port
    grafana = services["grafana"]["volumes"]
    assert any(v.startswith("./docs/grafana/dashboard.json:") for v in grafana)
