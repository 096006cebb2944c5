"""The Kubernetes starting point in deploy/ is valid (no cluster here: the API's schemas,
strict), runs every service, and configures them only with settings millrace has."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from millrace.settings import KafkaSettings, Settings

MANIFESTS = sorted((Path(__file__).parents[2] / "deploy" / "kubernetes").glob("*.yaml"))
SERVICES = {"gateway", "worker", "aggregator", "sink"}


def documents() -> list[dict[str, Any]]:
    return [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("version", ["1.29.0", "1.33.0"])
def test_every_manifest_is_valid_for_the_kubernetes_api(version: str) -> None:
    assert MANIFESTS
    for document in documents():
        kubernetes_validate.validate(document, version, strict=True)


def test_one_deployment_per_service_with_its_readiness_and_the_gpu_on_workers() -> None:
    deployments = {d["metadata"]["name"]: d for d in documents() if d["kind"] == "Deployment"}
    services = {}
    for deployment in deployments.values():
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        services[container["args"][0]] = container
        assert container["readinessProbe"]
        assert {"configMapRef": {"name": "millrace-config"}} in container["envFrom"]
    assert set(services) == SERVICES
    assert services["gateway"]["readinessProbe"]["httpGet"]["path"] == "/health"
    for name in SERVICES - {"gateway"}:  # the marker each service writes once it can work
        assert services[name]["readinessProbe"]["exec"]["command"] == [
            "test", "-f", f"/data/run/{name}.ready"]
    assert services["worker"]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_configuration_names_only_settings_millrace_reads() -> None:
    [config] = [d for d in documents() if d["kind"] == "ConfigMap"]
    known = {f"MILLRACE_{name.upper()}" for name in Settings.model_fields}
    known |= {f"MILLRACE_KAFKA__{name.upper()}" for name in KafkaSettings.model_fields}
    assert set(config["data"]) <= known, set(config["data"]) - known
    assert config["data"]["MILLRACE_DATA_DIR"] == "/data"
