"""Every setting of every millrace process, read once from `MILLRACE_*` env vars and flags.

Nested sections use `__`: `MILLRACE_KAFKA__BOOTSTRAP`, `MILLRACE_KAFKA__SASL_USERNAME`, ….
`Settings.load()` (what the CLI uses) refuses a `MILLRACE_*` variable that names no setting
and turns any invalid value into one `SettingsError` line naming the variable.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from millrace.errors import SettingsError

ENV_PREFIX = "MILLRACE_"

BUNDLED_CHAT_MODEL = "smollm2-135m-instruct"
BUNDLED_EMBEDDING_MODEL = "all-minilm-l6-v2"


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


# PromptLoop's default rate limits, transactions per minute (seed 000).
PROMPTLOOP_LIMITS = {
    "GET /v0/tasks": 20, "GET /v0/tasks/{id}": 10, "POST /v0/tasks/{id}": 5,
    "GET /v0/batches": 10, "POST /v0/batches": 4, "POST /v0/batches/validate-data": 20,
    "GET /v0/batches/{id}": 20, "PUT /v0/batches/{id}": 4, "GET /v0/batches/{id}/results": 10,
}


class KafkaSettings(BaseModel):
    """How every millrace client reaches Kafka (`MILLRACE_KAFKA__*`).

    `librdkafka()` is the one place a Kafka client configuration is rendered; every
    producer, consumer and admin client of every service starts from it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # host:port[,host:port…]; unset in `millrace up` means: start the embedded broker
    bootstrap: str | None = None
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # PEM files; without a CA the system's trust store is used
    ssl_ca_location: Path | None = None
    ssl_certificate_location: Path | None = None  # client certificate (mutual TLS)
    ssl_key_location: Path | None = None
    ssl_key_password: SecretStr | None = None
    ssl_check_hostname: bool = True
    # prefix of each client's `client.id` (the service is appended: `millrace-sink`)
    client_id: str = "millrace"
    # How long the broker may hold an empty fetch (every consumer that must react fast;
    # followers wait 1 s). Measured on tansu: 10 ms → 15% of a core idle in the broker,
    # 100 ms → 5%; a record produced meanwhile reaches its consumer after about half the
    # wait (one hop: 6.5 ms at 10 ms, 51.6 ms at 100 ms).
    fetch_wait_ms: int = Field(default=100, ge=1, le=10_000)
    session_timeout_ms: int = Field(default=6000, ge=1000)
    # How long a client waits for a broker's answer before it gives the connection up and
    # connects again (librdkafka's socket.timeout.ms, 60 s by default). After a network
    # cut heals, a connection opened before the cut stays silent until TCP's backed-off
    # retransmission gets through: measured (network namespaces, a 30 s cut) a consumer
    # found its coordinator again 29 s after the link healed at 60 s, 12 s at 10 s.
    socket_timeout_ms: int = Field(default=10_000, ge=1000)
    # What producers compress record batches with. lz4, measured on a 50,000-line echo batch:
    # the embedded broker used 1.1 s of CPU instead of 1.5 s and 50 MB instead of 110 MB.
    # A subscriber's Kafka client must read lz4 (librdkafka and Java do; kafka-python
    # needs the `lz4` package).
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    # any other librdkafka option, as JSON: {"socket.keepalive.enable": "true"}; applied last
    extra: dict[str, str] = Field(default_factory=dict)

    @field_validator("sasl_password", "ssl_key_password", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSettings:
        if self.socket_timeout_ms < self.fetch_wait_ms + 1000:
            raise ValueError(f"socket_timeout_ms ({self.socket_timeout_ms}) must be at least "
                             f"fetch_wait_ms + 1000 ({self.fetch_wait_ms + 1000}): a fetch "
                             "the broker holds would time out")
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and not (self.sasl_mechanism and self.sasl_username and self.sasl_password):
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism, "
                             "sasl_username and sasl_password")
        if not sasl and (self.sasl_mechanism or self.sasl_username or self.sasl_password):
            raise ValueError("SASL credentials are set but security_protocol is "
                             f"{self.security_protocol} (use SASL_SSL or SASL_PLAINTEXT)")
        tls = self.security_protocol in ("SSL", "SASL_SSL")
        files = {"ssl_ca_location": self.ssl_ca_location,
                 "ssl_certificate_location": self.ssl_certificate_location,
                 "ssl_key_location": self.ssl_key_location}
        for name, path in files.items():
            if path is not None and not tls:
                raise ValueError(f"{name} is set but security_protocol is "
                                 f"{self.security_protocol} (use SSL or SASL_SSL)")
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file {path}")
        if (self.ssl_certificate_location is None) != (self.ssl_key_location is None):
            raise ValueError("ssl_certificate_location and ssl_key_location go together")
        return self

    def librdkafka(self, service: str, **defaults: Any) -> dict[str, Any]:
        """The configuration of a confluent-kafka client of `service`: connection and
        security, then the client's own `defaults` (a producer's acks, a consumer's group),
        then `extra`, which has the last word."""
        if not self.bootstrap:
            raise SettingsError("MILLRACE_KAFKA__BOOTSTRAP is not set")
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "client.id": f"{self.client_id}-{service}",
            "security.protocol": self.security_protocol,
            # tansu creates a topic with its own partition count when a client merely
            # asks for it; topics are created only by `ensure_topics`, to their layout.
            "allow.auto.create.topics": False,
            "socket.timeout.ms": self.socket_timeout_ms,
        }
        if self.sasl_mechanism is not None:
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = (self.sasl_password.get_secret_value()
                                       if self.sasl_password else None)
        if self.security_protocol in ("SSL", "SASL_SSL"):
            config["ssl.endpoint.identification.algorithm"] = (
                "https" if self.ssl_check_hostname else "none")
            for key, path in (("ssl.ca.location", self.ssl_ca_location),
                              ("ssl.certificate.location", self.ssl_certificate_location),
                              ("ssl.key.location", self.ssl_key_location)):
                if path is not None:
                    config[key] = str(path)
            if self.ssl_key_password is not None:
                config["ssl.key.password"] = self.ssl_key_password.get_secret_value()
        return {**config, **defaults, **self.extra}

    def faust(self, service: str) -> dict[str, Any]:
        """The same connection and security as `librdkafka`, as a Faust app's settings
        (Faust's client is aiokafka): SASL PLAIN/SCRAM and TLS, mutual TLS included, as
        `broker_credentials`. `extra` holds librdkafka options and is not applied."""
        import ssl

        from faust.auth import SASLCredentials, SSLCredentials

        if not self.bootstrap:
            raise SettingsError("MILLRACE_KAFKA__BOOTSTRAP is not set")
        context: ssl.SSLContext | None = None
        if self.security_protocol in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context(
                cafile=str(self.ssl_ca_location) if self.ssl_ca_location else None)
            context.check_hostname = self.ssl_check_hostname
            if self.ssl_certificate_location is not None:
                context.load_cert_chain(
                    str(self.ssl_certificate_location),
                    str(self.ssl_key_location) if self.ssl_key_location else None,
                    self.ssl_key_password.get_secret_value() if self.ssl_key_password
                    else None)
        credentials: SASLCredentials | SSLCredentials | None = None
        if self.sasl_mechanism is not None:
            credentials = SASLCredentials(
                username=self.sasl_username, mechanism=self.sasl_mechanism,
                password=self.sasl_password.get_secret_value() if self.sasl_password
                else None, ssl_context=context)
        elif context is not None:
            credentials = SSLCredentials(context)
        session_s = self.session_timeout_ms / 1000
        return {
            "broker": [f"kafka://{server.strip()}" for server in self.bootstrap.split(",")],
            "broker_credentials": credentials,
            "broker_client_id": f"{self.client_id}-{service}",
            "broker_session_timeout": session_s,
            "broker_heartbeat_interval": max(session_s / 6, 0.5),
            # a request's answer is awaited this long; Faust requires it ≥ the session
            "broker_request_timeout": max(self.socket_timeout_ms / 1000, session_s),
        }


SERVICES = ("worker", "aggregator", "sink", "gateway")


def replica_counts(text: str) -> dict[str, int]:
    """`gateway=2,sink=3` → instances of each of the four services (1 where not named)."""
    counts = dict.fromkeys(SERVICES, 1)
    for item in text.split(","):
        name, _, number = item.strip().partition("=")
        if name not in SERVICES:
            raise ValueError(f"unknown service {name!r} (one of {', '.join(SERVICES)})")
        if not number.isdigit() or not 1 <= int(number) <= 64:
            raise ValueError(f"{name}: instances must be a number from 1 to 64, not {number!r}")
        counts[name] = int(number)
    return counts


# The variables Kubernetes puts into every pod for each Service of its namespace
# (`enableServiceLinks`, on by default): a Service named `millrace` gives MILLRACE_SERVICE_HOST,
# MILLRACE_SERVICE_PORT[_<name>], MILLRACE_PORT=tcp://<ip>:<port> and MILLRACE_PORT_<n>_TCP*;
# one named `millrace-metrics`, MILLRACE_METRICS_PORT=tcp://…. They are not settings.
_SERVICE_LINK_NAME = re.compile(
    r"_SERVICE_HOST$|_SERVICE_PORT(_\w+)?$|_PORT_\d+_(TCP|UDP|SCTP)(_\w+)?$")
_SERVICE_LINK_VALUE = re.compile(r"(tcp|udp|sctp)://", re.IGNORECASE)


def service_links(environ: dict[str, str] | os._Environ[str] = os.environ) -> list[str]:
    """The `MILLRACE_*` variables of `environ` that have the shape of Kubernetes service
    links, which settings ignore: a name only a service link has (a setting of that name
    would not be one), or a `*_PORT` whose value is `tcp://…`."""
    names = []
    for name, value in environ.items():
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX):
            continue
        if _SERVICE_LINK_NAME.search(upper) or (
                upper.endswith("_PORT") and _SERVICE_LINK_VALUE.match(value)):
            names.append(name)
    return sorted(names)


def netns_of(text: str) -> dict[str, str]:
    """`MILLRACE_NETNS` ("worker=mr-w1,sink-2=mr-s2") as instance name → namespace."""
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, netns = item.partition("=")
        if not sep or not name.strip() or not netns.strip():
            raise ValueError(f"{item!r} is not <instance>=<namespace>")
        pairs[name.strip()] = netns.strip()
    return pairs


class _EnvWithoutServiceLinks(EnvSettingsSource):
    """The environment, less the service links (`service_links`)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env = super()._load_env_vars()
        links = {name.lower() for name in service_links(os.environ)}
        return {name: value for name, value in env.items() if name.lower() not in links}


class Settings(BaseSettings):
    """One settings object shared by all services; each reads only what it needs."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore", frozen=True
    )

    data_dir: Path = Path(".millrace")
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    # Unset in `millrace up` means: start the embedded Redis.
    redis_url: str | None = None
    topic_prefix: str = "millrace"
    # Bootstrap admin key; `up` generates one (kept in the data dir) when unset.
    api_key: SecretStr | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    # Gateway processes `up` starts, all on `port` (SO_REUSEPORT: the kernel spreads the
    # connections). Two by default: one event loop tops out near 2,800 requests/s here and
    # its queue makes the tail (p99 390 ms at 200 connections); two keep it within 100 ms,
    # and the API keeps answering while one restarts. More on hosts with more cores.
    gateways: int = Field(default=2, ge=1, le=64)
    # This gateway's name in readiness markers and logs (`up` names them gateway, gateway-2…).
    gateway_name: str = "gateway"
    # Served model names, comma separated; `name=/path/to/hf-dir` serves a local folder.
    model: str = f"{BUNDLED_CHAT_MODEL},{BUNDLED_EMBEDDING_MODEL}"
    engine: Literal["vllm", "echo"] = "vllm"
    # The echo engine's step time, as a model's on a GPU: requests take at least this long,
    # so pipeline tests can act while a batch runs. 0: at once.
    echo_step_ms: float = Field(default=0.0, ge=0, le=60_000)
    # pyarrow.fs URI of the file store; default: <data_dir>/files on local disk.
    file_store_url: str | None = None
    # Where bundled models are converted once (shared across data dirs).
    model_cache: Path = Path.home() / ".cache" / "millrace" / "models"

    # Requests per minute per API key when the key sets none; 0 = unlimited.
    rate_limit_rpm: int = 0
    # Requests per minute per API key to one route ("METHOD /path/{id}"), as JSON; a key's
    # own `routes` override these. Default: PromptLoop's published table.
    route_limits: dict[str, int] = Field(default_factory=lambda: dict(PROMPTLOOP_LIMITS))

    # Inputs millrace fetches itself (PLai's and `/v1`'s `input_file_url`, PromptLoop's
    # link inputs) pass the webhook guard (`webhook_allow`, `webhook_https_only`). One
    # deadline for the whole fetch (resolving, connecting, headers, body); the bytes are
    # capped by batch_max_bytes (input files) and link_max_bytes (pages).
    fetch_timeout_s: float = Field(default=60.0, gt=0)
    link_max_bytes: int = Field(default=5 << 20, ge=1024)
    # characters of a fetched page's text that go into the prompt
    link_max_chars: int = Field(default=4000, ge=100)
    # PromptLoop: bytes of one JSONL upload of data rows
    rows_max_bytes: int = Field(default=100 << 20, ge=1024)
    # The gateway's address as clients reach it, e.g. https://batch.example.com: pre-signed
    # download URLs are built on it (never on a request's Host). Unset: http://host:port
    # (127.0.0.1 for a wildcard host).
    public_url: str | None = None
    # How long a pre-signed download URL works.
    signed_url_ttl_s: int = Field(default=900, ge=1, le=7 * 86400)

    # Completion windows: the longest `<n>h`/`<n>m`/`<n>s` a batch may ask for (OpenAI
    # takes only "24h"); a "background" batch runs on capacity no other batch wants and
    # expires only after this horizon.
    max_completion_window_s: int = Field(default=24 * 3600, ge=60)
    background_horizon_s: int = Field(default=7 * 86400, ge=60)
    # Admission at create: a batch whose estimated tokens, after those queued ahead of it,
    # cannot finish inside its window on the workers' measured throughput is refused
    # (`completion_window_too_short`), or accepted with its estimate; "off" estimates
    # nothing (the input file is not read at create).
    admission: Literal["refuse", "accept", "off"] = "refuse"
    # Enqueued prompt tokens a project may have per model in unfinished batches (OpenAI's
    # enqueued token limit); a create past it gets `token_limit_exceeded`. 0 = no limit.
    enqueued_token_limit: int = Field(default=0, ge=0)

    # Limits (OpenAI's): batch input size and lines; any other upload.
    batch_max_bytes: int = 200 * 1024 * 1024
    batch_max_lines: int = 50_000
    # One request line is one Kafka record: fit the broker's message size (1 MB by default).
    batch_line_max_bytes: int = Field(default=900_000, ge=1024)
    # JSON request bodies (create a batch, an endpoint, a key); larger ones get a 413.
    json_max_bytes: int = Field(default=1 << 20, ge=1024)
    file_max_bytes: int = 512 * 1024 * 1024
    # Retention (OpenAI's defaults): a `purpose=batch` upload given no `expires_after`, and
    # a batch's output and error files given no `output_expires_after`, expire this long
    # after they were made; the sink's janitor then deletes them. 0 = kept until deleted.
    batch_file_retention_s: int = Field(default=30 * 86400, ge=0)
    output_retention_s: int = Field(default=30 * 86400, ge=0)
    # how often one sink's janitor deletes the files past their `expires_at`
    janitor_every_s: float = Field(default=60.0, gt=0)

    # Topic layout; responses and batch-events must share a partition count because one
    # sink reads a batch's records from both (the same partition number of each).
    partitions: int = 4
    request_partitions: int = 8

    # A batch's lines are spread round-robin over this many shards (key `batch_id:shard`),
    # each on its own partition of the model's requests topic; 0 = request_partitions.
    batch_shards: int = 0

    # gpu_consumer
    # Requests in the engine at once, per model; 0 = the engine's own batch size (vLLM's
    # max_num_seqs), which keeps it exactly full. Lines beyond wait in the worker's
    # backlog, where cancels reach them and batches take turns.
    worker_max_in_flight: int = 0
    # Tokens (prompt estimate + max_tokens * n) in the engine at once, per model; 0 = no limit.
    worker_token_budget: int = 0
    # Lines read ahead of the engine (the fair-share horizon); fetching pauses beyond it.
    worker_read_ahead: int = 100_000
    # The order waiting lines are admitted in: a batch's priority, then its deadline, in
    # steps of this many seconds (batches whose windows end within one step take turns).
    worker_deadline_step_s: float = Field(default=3600.0, ge=0)
    # The share of admissions that go to every waiting batch in turn, whatever its
    # priority and deadline: nothing starves (0 = strict order).
    worker_min_share: float = Field(default=0.1, ge=0, le=1)
    # A batch's lines that share a system prompt (or Responses `instructions`) are admitted
    # one after another, so the engine's prefix cache serves them; false: in the order read.
    worker_prefix_order: bool = True
    # when idle, after the first request arrives, how long to wait for more to fill the
    # first engine step
    worker_max_wait_ms: int = 5
    # On SIGTERM: how long running requests may take to finish before the worker exits
    # (unfinished ones are redelivered).
    worker_drain_s: float = 30.0
    # Workers `millrace up` starts; with the vLLM engine on CPU they split the cores.
    workers: int = 1
    # `up --replicas`: instances of each service, each in its own data dir
    # (`<data_dir>/replicas/<name>`) as on separate hosts, sharing only Kafka, Redis and the
    # file store, e.g. "gateway=2,worker=2,aggregator=2,sink=2" (a service left out: 1).
    # Unset: `workers` workers and `gateways` gateways sharing this data dir.
    replicas: str | None = None
    # `up`: service instances that start inside a network namespace, as on their own host
    # (`ip netns exec <netns>`), e.g. "worker=mr-w1,worker-2=mr-w2"; `millrace chaos
    # --faults partition-…` and the network tests set it (ops/network.py).
    netns: str | None = None
    # This worker's name in readiness markers and logs (`up` names them worker, worker-2…).
    worker_name: str = "worker"
    # CPUs a worker's engine may use, e.g. "0-3,8"; default: all the process may use.
    cpu_set: str | None = None
    # The tokens a line that sets no max_tokens is counted for in WORKER_TOKEN_BUDGET (vLLM
    # itself generates up to the context, or to `--override-generation-config
    # '{"max_new_tokens": N}'` given in VLLM_ARGS).
    default_max_tokens: int = 256
    # vLLM engine and serving arguments, with vLLM's own names, for every served model (e.g.
    # "--max-model-len 8192 --gpu-memory-utilization 0.85"), and for one model, as JSON
    # ({"<served name>": "--tensor-parallel-size 2"}); parsed by vLLM's own parser
    # (`gpu_consumer/engine_args.py`: the order, and what millrace sets before them).
    vllm_args: str = ""
    vllm_model_args: dict[str, str] = Field(default_factory=dict)
    # The CPU build only: GiB of KV cache per model (vLLM's VLLM_CPU_KVCACHE_SPACE).
    kv_cache_gib: int = 1

    # `up`: the embedded broker keeps every record in memory; past this size it is started
    # afresh while no batch runs (at twice this size at once), and unfinished batches are
    # resumed on the new one. 0 = never.
    broker_max_rss_mb: int = 1024

    # This sink's and this aggregator's names in readiness markers and logs (`up
    # --replicas` names them sink, sink-2…).
    sink_name: str = "sink"
    aggregator_name: str = "aggregator"

    # sink: consume() returns when this many records arrived or the wait ran out
    sink_max_batch: int = 500
    sink_max_wait_ms: int = 0

    # sink: how often a running batch's new lines are published for partial results
    sink_partial_every_s: float = 1.0

    # webhooks. Each project's signing secret (`whsec_…`) is derived from this key, so
    # nothing secret is stored; `up` generates one (kept in the data dir) when unset.
    webhook_signing_key: SecretStr | None = None
    # Production: only https targets. Private, loopback and link-local targets of webhooks
    # and of every fetch are refused unless named here ("loopback", "private",
    # "link-local", comma separated). Unset, `millrace up` (the local deployment) allows
    # loopback and says so in its ready line; every other service allows none.
    webhook_https_only: bool = False
    webhook_allow: str = ""
    webhook_timeout_s: float = 10.0
    # Retry schedule: exponential from `base` (with jitter), each wait capped at `max`,
    # given up `horizon` after the event.
    webhook_retry_base_s: float = 5.0
    webhook_retry_max_s: float = 3600.0
    webhook_horizon_s: float = 72 * 3600.0
    # Batches of at most this many lines carry their result lines in the webhook payload.
    webhook_results_max_lines: int = 100
    # How long an endpoint's old secret still signs after `rotate_secret` with
    # `keep_old_secret_active_for_24_hours` (OpenAI's 24 h).
    webhook_secret_overlap_s: int = Field(default=24 * 3600, ge=0)
    # PromptLoop jobs of at most this many rows carry their rows in the webhook's `data`;
    # a bigger one sends `data: null` and where to read them (a body stays a few MB).
    promptloop_webhook_max_rows: int = Field(default=10_000, ge=0)

    # The CLI's batch commands (`millrace submit`, `millrace batches …`): the gateway's
    # base URL and key; else the OpenAI SDK's variables; else the local `up` (endpoints.json
    # and the generated key in the data dir).
    base_url: str | None = None
    openai_base_url: str | None = Field(default=None, validation_alias="OPENAI_BASE_URL")
    openai_api_key: SecretStr | None = Field(default=None, validation_alias="OPENAI_API_KEY")

    # Prometheus `/metrics` of a worker, aggregator or sink on this port (`up` gives each
    # its own and lists them in endpoints.json); unset: none. The gateway answers
    # `/metrics` on its own port.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # Gateway processes sharing a port write their samples here (prometheus-client's
    # multiprocess mode), so `/metrics` on the port sums them all; `up` sets it.
    gateway_metrics_dir: Path | None = None

    log_level: str = "INFO"
    # "json": one JSON object per log line (time, pid, logger, level, message, batch_id)
    log_format: Literal["text", "json"] = "text"
    ready_timeout_s: float = 600.0

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _EnvWithoutServiceLinks(settings_cls), dotenv_settings,
                file_secret_settings)

    @field_validator("api_key", "webhook_signing_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`VAR=` (as compose writes an unset `${VAR:-}`) means unset, not an empty secret."""
        return None if value == "" else value

    @field_validator("replicas")
    @classmethod
    def _replicas_known(cls, value: str | None) -> str | None:
        if value:
            replica_counts(value)
        return value

    @model_validator(mode="after")
    def _model_args_served(self) -> Settings:
        unknown = sorted(set(self.vllm_model_args) - set(self.served_models()))
        if unknown:
            names = ", ".join(map(repr, unknown))
            raise ValueError(f"MILLRACE_VLLM_MODEL_ARGS names {names}, not a served model "
                             f"({', '.join(self.served_models())})")
        return self

    @field_validator("netns")
    @classmethod
    def _netns_pairs(cls, value: str | None) -> str | None:
        if value:
            netns_of(value)
        return value

    def replica_counts(self) -> dict[str, int] | None:
        """Instances per service under `up --replicas`; None when unset."""
        return replica_counts(self.replicas) if self.replicas else None

    @property
    def run_dir(self) -> Path:
        """Readiness markers and pid files of the processes of one deployment."""
        return self.data_dir / "run"

    @property
    def files_url(self) -> str:
        return self.file_store_url or str((self.data_dir / "files").resolve())

    def served_models(self) -> dict[str, str | None]:
        """Served model name → local HF folder (None = a bundled model, prepared on demand)."""
        served: dict[str, str | None] = {}
        for item in self.model.split(","):
            name, _, path = item.strip().partition("=")
            if name:
                served[name] = path or None
        return served

    def cpus(self) -> list[int] | None:
        """`cpu_set` as a sorted list of CPU numbers."""
        if not self.cpu_set:
            return None
        cpus: set[int] = set()
        for part in self.cpu_set.split(","):
            first, _, last = part.strip().partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
        return sorted(cpus)

    def shards(self) -> int:
        return self.batch_shards or self.request_partitions

    def gateway_url(self) -> str:
        """Where clients reach the gateway (`public_url`, else its own address)."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def require_kafka(self) -> str:
        if not self.kafka.bootstrap:
            raise SettingsError("MILLRACE_KAFKA__BOOTSTRAP is not set")
        return self.kafka.bootstrap

    def require_redis(self) -> str:
        if not self.redis_url:
            raise SettingsError("MILLRACE_REDIS_URL is not set")
        return self.redis_url

    def with_kafka(self, **changes: Any) -> Settings:
        """A copy with some Kafka settings changed (e.g. the embedded broker's address)."""
        return self.model_copy(update={"kafka": self.kafka.model_copy(update=changes)})

    def as_env(self) -> dict[str, str]:
        """These settings as `MILLRACE_*` variables (the bootstrap API key left out), so
        the processes `up` starts see exactly ours."""
        env: dict[str, str] = {}

        def put(name: str, value: object) -> None:
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if isinstance(value, dict):
                value = json.dumps(value)
            if value is not None:
                env[name] = str(value)

        for field in type(self).model_fields:
            value = getattr(self, field)
            name = f"{ENV_PREFIX}{field.upper()}"
            if field in ("api_key", "openai_base_url", "openai_api_key"):
                continue
            if isinstance(value, BaseModel):
                for sub in type(value).model_fields:
                    put(f"{name}__{sub.upper()}", getattr(value, sub))
            else:
                put(name, value)
        return env

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Settings from the environment and `overrides` (flags), every problem one line."""
        links = {name.upper() for name in service_links()}
        unknown = sorted(set(_environment_names()) - set(_known_names()) - links)
        if unknown:
            hints = {"MILLRACE_KAFKA_BOOTSTRAP": " (now MILLRACE_KAFKA__BOOTSTRAP)",
                     "MILLRACE_DTYPE": " (now MILLRACE_VLLM_ARGS='--dtype …')",
                     "MILLRACE_ENGINE_PROCESS": " (removed: every vLLM engine core runs in a "
                                                "process of its own)",
                     "MILLRACE_FAUST_SESSION_TIMEOUT_S": " (now MILLRACE_KAFKA__SESSION_TIMEOUT_MS,"
                                                         " for every consumer group)"}
            raise SettingsError("unknown setting " + ", ".join(
                name + hints.get(name, "") for name in unknown))
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise SettingsError(_one_line(exc)) from None


def _environment_names() -> list[str]:
    return [name.upper() for name in os.environ if name.upper().startswith(ENV_PREFIX)]


def _known_names() -> list[str]:
    names = []
    for field, info in Settings.model_fields.items():
        name = f"{ENV_PREFIX}{field.upper()}"
        names.append(name)
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            names += [f"{name}__{sub.upper()}" for sub in info.annotation.model_fields]
    return names


def _one_line(exc: ValidationError) -> str:
    """The first problem, named as the variable that sets it."""
    error = exc.errors()[0]
    where = ENV_PREFIX + "__".join(str(part).upper() for part in error["loc"]
                                   if isinstance(part, str))
    message = str(error["msg"]).removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {message}{more}" if error["loc"] else f"{message}{more}"
