"""Clients rendered from `KafkaSettings` against a real broker that demands credentials.

- Mutual TLS: tansu behind a TLS front that requires a client certificate signed by the test
  CA (tansu 0.6.0's own TLS listener is unusable, see tests/tls_proxy.py). Topics are created,
  records produced and consumed by a consumer group, all through TLS; no client certificate,
  an untrusted CA or a wrong host name is refused. The aggregator's Faust app (aiokafka, its
  security rendered from the same settings) joins its group and applies events through it.
- SASL: tansu with `--authentication` refuses unauthenticated clients and offers SCRAM, but
  0.6.0 stores no SCRAM credentials (`tansu user create` answers 0 and keeps nothing), so a
  login cannot succeed; the test shows our SCRAM client reaching the broker's credential check.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from pydantic import SecretStr

from millrace.kafka import KafkaConfig, ensure_topics, produce
from millrace.settings import KafkaSettings, Settings
from millrace.topics import Topics
from ops import embedded
from tests.deployment import Deployment
from tests.streams.harness import running, starts
from tests.tls_proxy import Pki, TlsProxy, make_pki


def start_tansu(port: int, *extra: str, advertised: str | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([*embedded.broker_argv(port, advertised=advertised), *extra],
                            executable=str(embedded.tansu_binary()),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    embedded.wait_for_port(port, 30, lambda: proc.poll() is None)
    return proc


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_port(pki: Pki) -> Iterator[int]:
    """A broker reachable only through mutual TLS at localhost:<port>."""
    inner, outer = embedded.free_port(), embedded.free_port()
    broker = start_tansu(inner, advertised=f"tcp://localhost:{outer}")
    proxy = TlsProxy(outer, inner, pki, require_client_cert=True)
    yield outer
    proxy.close()
    broker.kill()
    broker.wait()


def tls(port: int, pki: Pki, **changes: object) -> KafkaConfig:
    settings = KafkaSettings(bootstrap=f"localhost:{port}", security_protocol="SSL",
                             ssl_ca_location=pki.ca, ssl_certificate_location=pki.client_cert,
                             ssl_key_location=pki.client_key)
    return KafkaConfig(settings.model_copy(update=changes), "test")


def test_the_aggregators_faust_app_works_over_mutual_tls(
        tls_port: int, pki: Pki, deployment: Deployment, tmp_path: Path) -> None:
    """Faust's client (aiokafka) gets the same TLS from the same settings section: the
    aggregator joins its group through the mutual-TLS front and applies a batch's events."""
    kafka = tls(tls_port, pki).kafka
    settings = Settings(topic_prefix=f"tls{uuid.uuid4().hex[:8]}", data_dir=tmp_path,
                        redis_url=str(deployment.endpoints["redis_url"]), kafka=kafka)
    topics = Topics.from_settings(settings)
    config = KafkaConfig.of(settings, "test")
    ensure_topics(config, topics.layout(settings), configs=topics.configs())
    batch_id = f"batch_{uuid.uuid4().hex[:24]}"

    async def scenario() -> None:
        async with running(settings):
            await starts(settings, config, batch_id)

    asyncio.run(scenario())


@pytest.mark.parametrize(("protocol", "mechanism"), [
    ("SASL_PLAINTEXT", "PLAIN"), ("SASL_SSL", "SCRAM-SHA-512"), ("SSL", None)])
def test_faust_gets_the_security_librdkafka_gets(pki: Pki, protocol: str,
                                                 mechanism: str | None) -> None:
    sasl = {"sasl_mechanism": mechanism, "sasl_username": "svc-aggregator",
            "sasl_password": SecretStr("s3cret")} if mechanism else {}
    tls_files = {"ssl_ca_location": pki.ca, "ssl_certificate_location": pki.client_cert,
                 "ssl_key_location": pki.client_key} if protocol.endswith("SSL") else {}
    settings = KafkaSettings(bootstrap="a:9093,b:9093", security_protocol=protocol, **sasl,
                             **tls_files)
    faust_conf = settings.faust("aggregator")
    auth = credentials_to_aiokafka_auth(faust_conf["broker_credentials"])
    librdkafka = settings.librdkafka("aggregator")
    assert auth["security_protocol"] == librdkafka["security.protocol"] == protocol
    assert faust_conf["broker"] == ["kafka://a:9093", "kafka://b:9093"]
    assert faust_conf["broker_client_id"] == librdkafka["client.id"]
    if mechanism:
        assert (auth["sasl_mechanism"], auth["sasl_plain_username"],
                auth["sasl_plain_password"]) == (mechanism, "svc-aggregator", "s3cret")
    if tls_files:  # the client certificate is loaded: the context can present it
        assert auth["ssl_context"].verify_mode == ssl.CERT_REQUIRED
        assert auth["ssl_context"].check_hostname


def test_every_client_kind_works_over_mutual_tls(tls_port: int, pki: Pki) -> None:
    config = tls(tls_port, pki)
    ensure_topics(config, {"secure.t": 2})
    producer = Producer(config.producer())
    for i in range(20):
        produce(producer, "secure.t", f"v{i}".encode(), key=f"k{i}")
    assert producer.flush(30) == 0
    consumer = Consumer(config.consumer("secure-group"))
    consumer.subscribe(["secure.t"])
    got: set[bytes] = set()
    deadline = time.monotonic() + 60
    while len(got) < 20 and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            got.add(msg.value() or b"")
    consumer.commit(asynchronous=False)
    consumer.close()
    assert got == {f"v{i}".encode() for i in range(20)}


@pytest.mark.parametrize("changes", [
    {"ssl_certificate_location": None, "ssl_key_location": None},  # no client certificate
    {"ssl_ca_location": "other"},  # the server's certificate is not trusted
])
def test_tls_without_the_right_credentials_is_refused(tls_port: int, pki: Pki,
                                                      changes: dict[str, object]) -> None:
    if changes.get("ssl_ca_location") == "other":
        changes = {"ssl_ca_location": pki.other_ca}
    admin = Producer(tls(tls_port, pki, **changes).base())
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=5)


def test_the_host_name_is_checked_unless_turned_off(tls_port: int, pki: Pki) -> None:
    # the certificate names localhost; 127.0.0.1 is the same broker under another name
    checked = tls(tls_port, pki, bootstrap=f"127.0.0.1:{tls_port}")
    with pytest.raises(KafkaException):
        Producer(checked.base()).list_topics(timeout=5)
    unchecked = tls(tls_port, pki, bootstrap=f"127.0.0.1:{tls_port}", ssl_check_hostname=False)
    assert Producer(unchecked.base()).list_topics(timeout=10).topics is not None


def test_sasl_is_enforced_and_our_scram_client_reaches_the_credential_check() -> None:
    port = embedded.free_port()
    broker = start_tansu(port, "--authentication")
    try:
        with pytest.raises(KafkaException):
            Producer(KafkaConfig(KafkaSettings(bootstrap=f"127.0.0.1:{port}"), "t").base()
                     ).list_topics(timeout=5)
        errors: list[KafkaError] = []
        scram = KafkaSettings(bootstrap=f"127.0.0.1:{port}", security_protocol="SASL_PLAINTEXT",
                              sasl_mechanism="SCRAM-SHA-512", sasl_username="svc-millrace",
                              sasl_password=SecretStr("s3cret"))
        client = Producer({**KafkaConfig(scram, "t").base(), "error_cb": errors.append})
        with pytest.raises(KafkaException):
            client.list_topics(timeout=5)
        client.poll(1)  # serves the error callbacks
        # the SCRAM exchange ran: the broker looked the user up and did not know it
        assert any("unknown-user" in e.str() for e in errors), [e.str() for e in errors]
    finally:
        broker.kill()
        broker.wait()
