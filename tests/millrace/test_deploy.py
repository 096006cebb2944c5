"""The Kubernetes starting point in deploy/ is valid (no cluster here: the API's schemas,
strict), runs every service, and configures them only with settings millrace has; so do the
compose file and its scale-out override (no Docker here: the compose specification's
schema)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from millrace.errors import SettingsError
from millrace.settings import KafkaSettings, Settings, service_links
from ops.embedded import die_with_parent, free_port
from tests.deployment import Deployment, wait_until

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


# --- a pod's environment: ConfigMap, Secret and Kubernetes' service links --------------------
def service_link_env(service: dict[str, Any], ip: str = "10.96.14.7") -> dict[str, str]:
    """What the kubelet puts into every pod of the namespace for `service` when service
    links are on (Kubernetes' `pkg/kubelet/envvars`)."""
    name = service["metadata"]["name"].upper().replace("-", "_")
    ports = service["spec"]["ports"]
    env = {f"{name}_SERVICE_HOST": ip, f"{name}_SERVICE_PORT": str(ports[0]["port"])}
    for port in ports:
        number, proto = port["port"], port.get("protocol", "TCP")
        if port.get("name"):
            env[f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(number)
        base = f"{name}_PORT_{number}_{proto}"
        env.update({base: f"{proto.lower()}://{ip}:{number}", f"{base}_PROTO": proto.lower(),
                    f"{base}_PORT": str(number), f"{base}_ADDR": ip})
    env[f"{name}_PORT"] = f"{ports[0].get('protocol', 'TCP').lower()}://{ip}:{ports[0]['port']}"
    return env


def pod_environment(container: dict[str, Any], **real: str) -> dict[str, str]:
    """A pod's environment as the kubelet builds it: every Service's links first, then the
    container's envFrom (ConfigMap, then the Secret the manifest's header tells to create),
    then `real` (where this test's broker, Redis and disk are)."""
    links: dict[str, str] = {}
    for service in (d for d in documents() if d["kind"] == "Service"):
        links.update(service_link_env(service))
    [config] = [d for d in documents() if d["kind"] == "ConfigMap"]
    secret_names = re.findall(r"--from-literal=(MILLRACE_\w+)=", MANIFESTS[0].read_text())
    refs = [next(iter(ref.values()))["name"] for ref in container["envFrom"]]
    assert refs == ["millrace-config", "millrace-secrets"]
    secret = dict.fromkeys(secret_names, "unset")
    return {**links, **config["data"], **secret, **real}


def test_the_pods_drop_service_links_and_settings_ignore_them_with_one_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for document in documents():
        if document["kind"] == "Deployment":
            assert document["spec"]["template"]["spec"]["enableServiceLinks"] is False
    [service] = [d for d in documents() if d["kind"] == "Service"]
    links = service_link_env(service)
    # the worst case: a Service named millrace and no MILLRACE_PORT of one's own
    assert links["MILLRACE_PORT"] == "tcp://10.96.14.7:80"
    links["MILLRACE_METRICS_PORT"] = "tcp://10.96.14.8:9100"  # a Service `millrace-metrics`
    for name, value in links.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MILLRACE_TOPIC_PREFIX", "own")
    assert service_links() == sorted(links)
    settings = Settings.load()
    assert (settings.port, settings.metrics_port, settings.topic_prefix) == (8000, None, "own")
    monkeypatch.setenv("MILLRACE_PORT", "8080")  # a real setting of the same name still counts
    assert Settings.load().port == 8080
    monkeypatch.setenv("MILLRACE_SERVICE_PORTS", "1")  # a typo is still refused
    with pytest.raises(SettingsError, match="MILLRACE_SERVICE_PORTS"):
        Settings.load()


def test_each_service_starts_with_the_environment_a_pod_of_the_manifest_gets(
        deployment: Deployment, tmp_path: Path) -> None:
    containers = {c["args"][0]: c for d in documents() if d["kind"] == "Deployment"
                  for c in d["spec"]["template"]["spec"]["containers"]}
    prefix = f"pod{uuid.uuid4().hex[:8]}"  # topics and Redis keys of this test's own
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for name in ("gateway", "worker", "aggregator", "sink"):  # the gateway makes topics
            data = tmp_path / name
            port = free_port()
            env = pod_environment(
                containers[name],
                MILLRACE_KAFKA__BOOTSTRAP=str(deployment.endpoints["kafka_bootstrap"]),
                MILLRACE_REDIS_URL=str(deployment.endpoints["redis_url"]),
                MILLRACE_TOPIC_PREFIX=prefix, MILLRACE_DATA_DIR=str(data),
                MILLRACE_FILE_STORE_URL=str(tmp_path / "files"),
                MILLRACE_HOST="127.0.0.1", MILLRACE_PORT=str(port),
                MILLRACE_METRICS_PORT=str(free_port()),
                MILLRACE_ENGINE="echo")  # no GPU here: the manifest's model, on echo
            env["MILLRACE_API_KEY"] = "sk-mr-" + uuid.uuid4().hex
            env["MILLRACE_WEBHOOK_SIGNING_KEY"] = uuid.uuid4().hex
            assert env["MILLRACE_SERVICE_HOST"]  # the links are there
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "ops", *containers[name]["args"]],
                env={"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], **env},
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                preexec_fn=die_with_parent)
            marker = data / "run" / f"{name}.ready"
            wait_until(lambda m=marker, p=procs[name]: m.exists() or p.poll() is not None,
                       120, f"{name} ready")
            assert procs[name].poll() is None, procs[name].communicate()[1]
            if name == "gateway":
                wait_until(lambda p=port: _health(p), 60, "the gateway's /health")
    finally:
        for proc in procs.values():
            proc.terminate()
        logs = {name: proc.communicate(timeout=60)[1] for name, proc in procs.items()}
    for name, log in logs.items():
        warnings = [line for line in log.splitlines() if "service links" in line]
        assert len(warnings) == 1 and "MILLRACE_SERVICE_HOST" in warnings[0], (name, log)
        assert "unknown setting" not in log


def _health(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
