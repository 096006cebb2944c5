"""The Kubernetes starting point in deploy/ is valid (no cluster here: the API's schemas,
strict), runs every service, and configures them only with settings millrace has; so do the
compose file and its scale-out override (no Docker here: the compose specification's
schema)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
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


# --- compose: the production file and the scale-out override ------------------------------
ROOT = Path(__file__).parents[2]
COMPOSE = [ROOT / "docker-compose.yml", ROOT / "deploy" / "docker-compose.scale.yml"]


class ComposeLoader(yaml.SafeLoader):  # type: ignore[misc]
    """Compose's merge tags (`!override`, `!reset`) read as the value they carry."""


for _tag in ("!override", "!reset"):
    ComposeLoader.add_constructor(_tag, lambda loader, node: (
        loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node) if isinstance(node, yaml.MappingNode)
        else loader.construct_scalar(node)))


def compose(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.load(path.read_text(), Loader=ComposeLoader)
    return loaded


@pytest.mark.parametrize("path", COMPOSE, ids=lambda p: p.name)
def test_the_compose_files_are_valid_for_the_compose_specification(path: Path) -> None:
    schema = json.loads((resources.files("check_jsonschema.builtin_schemas.vendor")
                         / "compose-spec.json").read_text())
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(compose(path)))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


def test_the_scale_override_runs_two_of_every_service_each_on_its_own_disk_sharing_s3() -> None:
    base, scale = (compose(path)["services"] for path in COMPOSE)
    for name in SERVICES:
        service = scale[name]
        assert service["deploy"]["replicas"] >= 2
        # the base mounts the shared millrace-data volume at /data; the override puts an
        # anonymous volume there (compose merges volumes by their path in the container)
        assert "millrace-data:/data" in base[name]["volumes"]
        assert service["volumes"] == ["/data"]
        assert service["environment"]["MILLRACE_FILE_STORE_URL"].startswith("s3://")
    known = {f"MILLRACE_{name.upper()}" for name in Settings.model_fields}
    for service in [*base.values(), *scale.values()]:
        names = {n for n in (service.get("environment") or {}) if n.startswith("MILLRACE_")}
        assert names <= known | {f"MILLRACE_KAFKA__{n.upper()}" for n in
                                 KafkaSettings.model_fields}, names - known
    # two gateways cannot publish one host port
    assert scale["gateway"]["ports"] == ["8000-8001:8000"]
