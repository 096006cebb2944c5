"""Settings: the Kafka section renders librdkafka's configuration for every security protocol,
bad or unknown settings are refused in one line, and the CLI exits 2 on them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from millrace.errors import MillraceError, SettingsError
from millrace.kafka import KafkaConfig
from millrace.settings import KafkaSettings, Settings


def pem(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    return path


def test_plaintext_renders_bootstrap_and_no_topic_auto_creation() -> None:
    config = KafkaSettings(bootstrap="k1:9092,k2:9092").librdkafka("sink")
    assert config == {"bootstrap.servers": "k1:9092,k2:9092", "client.id": "millrace-sink",
                      "security.protocol": "PLAINTEXT", "allow.auto.create.topics": False,
                      "socket.timeout.ms": 10_000}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_ssl_renders_credentials_and_tls(mechanism: str, tmp_path: Path) -> None:
    kafka = KafkaSettings(
        bootstrap="pkc.example.com:9092", security_protocol="SASL_SSL",
        sasl_mechanism=mechanism, sasl_username="key", sasl_password=SecretStr("secret"),
        ssl_ca_location=pem(tmp_path, "ca.pem"), client_id="team-a")
    config = kafka.librdkafka("gateway")
    assert config["security.protocol"] == "SASL_SSL"
    assert (config["sasl.mechanism"], config["sasl.username"], config["sasl.password"]) == (
        mechanism, "key", "secret")
    assert config["ssl.ca.location"] == str(tmp_path / "ca.pem")
    assert config["ssl.endpoint.identification.algorithm"] == "https"
    assert config["client.id"] == "team-a-gateway"
    assert "secret" not in repr(kafka)  # the password is a SecretStr


def test_sasl_plaintext_has_no_tls_options() -> None:
    config = KafkaSettings(bootstrap="b:9092", security_protocol="SASL_PLAINTEXT",
                           sasl_mechanism="SCRAM-SHA-512", sasl_username="u",
                           sasl_password=SecretStr("p")).librdkafka("worker")
    assert config["security.protocol"] == "SASL_PLAINTEXT"
    assert not [k for k in config if k.startswith("ssl.")]


def test_mutual_tls_renders_client_certificate(tmp_path: Path) -> None:
    config = KafkaSettings(
        bootstrap="b:9093", security_protocol="SSL", ssl_ca_location=pem(tmp_path, "ca.pem"),
        ssl_certificate_location=pem(tmp_path, "client.pem"),
        ssl_key_location=pem(tmp_path, "client.key"), ssl_key_password=SecretStr("kp"),
        ssl_check_hostname=False).librdkafka("aggregator")
    assert config["ssl.certificate.location"] == str(tmp_path / "client.pem")
    assert config["ssl.key.location"] == str(tmp_path / "client.key")
    assert config["ssl.key.password"] == "kp"
    assert config["ssl.endpoint.identification.algorithm"] == "none"
    assert not [k for k in config if k.startswith("sasl.")]


def test_extra_options_are_applied_last_and_reach_every_client() -> None:
    kafka = KafkaSettings(bootstrap="b:9092", extra={"socket.keepalive.enable": "true",
                                                     "client.id": "custom"})
    clients = KafkaConfig(kafka, "sink")
    for config in (clients.base(), clients.producer(), clients.consumer("g")):
        assert config["socket.keepalive.enable"] == "true"
        assert config["client.id"] == "custom"
        assert config["socket.timeout.ms"] == 10_000  # reconnects soon after a cut heals
    assert clients.producer()["acks"] == "all"
    assert clients.producer()["enable.idempotence"] is False  # see KafkaConfig.producer
    assert clients.consumer("g")["enable.auto.commit"] is False


@pytest.mark.parametrize(("fields", "message"), [
    ({"security_protocol": "SASL_SSL"}, "needs sasl_mechanism, sasl_username"),
    ({"sasl_username": "u", "sasl_password": "p", "sasl_mechanism": "PLAIN"},
     "security_protocol is PLAINTEXT"),
    ({"security_protocol": "SSL", "ssl_ca_location": "/nonexistent/ca.pem"}, "no such file"),
    ({"ssl_ca_location": "/etc/hostname"}, "use SSL or SASL_SSL"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI", "sasl_username": "u",
      "sasl_password": "p"}, "Input should be 'PLAIN'"),
    ({"fetch_wait_ms": 0}, "greater than or equal to 1"),
    ({"fetch_wait_ms": 9500}, "socket_timeout_ms .10000. must be at least"),
])
def test_inconsistent_kafka_settings_are_one_clear_error(
        fields: dict[str, object], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in fields.items():
        monkeypatch.setenv(f"MILLRACE_KAFKA__{name.upper()}", str(value))
    with pytest.raises(SettingsError, match=message) as caught:
        Settings.load()
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("MILLRACE_KAFKA")  # names the variable to fix
    assert isinstance(caught.value, MillraceError)


def test_nested_environment_variables_and_json_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILLRACE_KAFKA__BOOTSTRAP", "k:9092")
    monkeypatch.setenv("MILLRACE_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("MILLRACE_KAFKA__SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("MILLRACE_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("MILLRACE_KAFKA__SASL_PASSWORD", "pw")
    monkeypatch.setenv("MILLRACE_KAFKA__EXTRA", '{"linger.ms": "20"}')
    settings = Settings.load()
    assert settings.require_kafka() == "k:9092"
    assert KafkaConfig.of(settings, "sink").producer()["linger.ms"] == "20"
    # the launcher hands exactly these settings to its children, secrets included
    env = settings.as_env()
    assert env["MILLRACE_KAFKA__SASL_PASSWORD"] == "pw"
    assert env["MILLRACE_KAFKA__EXTRA"] == '{"linger.ms": "20"}'
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings.load() == settings


def test_an_unknown_millrace_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILLRACE_KAFKA_BOOTSTRAP", "old-name:9092")
    monkeypatch.setenv("MILLRACE_WORKERZ", "2")
    monkeypatch.setenv("MILLRACE_KAFKA__BOOTSTRAPP", "typo:9092")
    with pytest.raises(SettingsError) as caught:
        Settings.load()
    assert str(caught.value) == (
        "unknown setting MILLRACE_KAFKA_BOOTSTRAP (now MILLRACE_KAFKA__BOOTSTRAP), "
        "MILLRACE_KAFKA__BOOTSTRAPP, MILLRACE_WORKERZ")


def test_a_removed_engine_setting_says_what_replaced_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILLRACE_DTYPE", "auto")
    with pytest.raises(SettingsError) as caught:
        Settings.load()
    assert str(caught.value) == (
        "unknown setting MILLRACE_DTYPE (now MILLRACE_VLLM_ARGS='--dtype …')")


def test_a_service_without_kafka_says_which_variable() -> None:
    with pytest.raises(SettingsError, match="MILLRACE_KAFKA__BOOTSTRAP is not set"):
        KafkaConfig.of(Settings(), "sink").base()


@pytest.mark.parametrize(("env", "expected"), [
    ({"MILLRACE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL"}, "MILLRACE_KAFKA: security_protocol"),
    ({"MILLRACE_PORT": "eighty"}, "MILLRACE_PORT: Input should be a valid integer"),
    ({"MILLRACE_SINK_MAX_BATCH": "1", "MILLRACE_SNIK_MAX_BATCH": "1"},
     "unknown setting MILLRACE_SNIK_MAX_BATCH"),
    ({"MILLRACE_REPLICAS": "sink=2,broker=3"}, "MILLRACE_REPLICAS: unknown "
                                               "service 'broker' (one of worker, aggregator"),
    ({"MILLRACE_REPLICAS": "sink=0"}, "MILLRACE_REPLICAS: sink: instances must "
                                      "be a number from 1 to 64, not '0'"),
    ({"MILLRACE_NETNS": "sink=mr-s,worker"}, "MILLRACE_NETNS: 'worker' is not "
                                              "<instance>=<namespace>"),
])
def test_the_cli_prints_one_line_and_exits_2(env: dict[str, str], expected: str,
                                             tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MILLRACE_")}
    result = subprocess.run([sys.executable, "-m", "ops", "sink", "--data-dir",
                             str(tmp_path)], env={**clean, **env}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"millrace: {expected}"), result.stderr


def test_replicas_name_instances_of_each_service_and_default_to_one() -> None:
    settings = Settings(replicas="gateway=2, sink=3")
    assert settings.replica_counts() == {"worker": 1, "aggregator": 1, "sink": 3, "gateway": 2}
    assert Settings().replica_counts() is None
