"""Every setting of every millrace process, read once from `MILLRACE_*` env vars and flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_CHAT_MODEL = "smollm2-135m-instruct"
BUNDLED_EMBEDDING_MODEL = "all-minilm-l6-v2"


class Settings(BaseSettings):
    """One settings object shared by all services; each reads only what it needs."""

    model_config = SettingsConfigDict(
        env_prefix="MILLRACE_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    data_dir: Path = Path(".millrace")
    # Unset in `millrace up` means: start the embedded broker / Redis.
    kafka_bootstrap: str | None = None
    redis_url: str | None = None
    topic_prefix: str = "millrace"
    # Bootstrap admin key; `up` generates one (kept in the data dir) when unset.
    api_key: SecretStr | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    # Served model names, comma separated; `name=/path/to/hf-dir` serves a local folder.
    model: str = f"{BUNDLED_CHAT_MODEL},{BUNDLED_EMBEDDING_MODEL}"
    engine: Literal["vllm", "echo"] = "vllm"
    # pyarrow.fs URI of the file store; default: <data_dir>/files on local disk.
    file_store_url: str | None = None
    # Where bundled models are converted once (shared across data dirs).
    model_cache: Path = Path.home() / ".cache" / "millrace" / "models"

    # Requests per minute per API key when the key sets none; 0 = unlimited.
    rate_limit_rpm: int = 0

    # Limits (OpenAI's): batch input size and lines; any other upload.
    batch_max_bytes: int = 200 * 1024 * 1024
    batch_max_lines: int = 50_000
    file_max_bytes: int = 512 * 1024 * 1024

    # Topic layout; responses and batch-events must share a partition count
    # because the aggregator joins them by batch id.
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
    # when idle, after the first request arrives, how long to wait for more to fill the
    # first engine step
    worker_max_wait_ms: int = 5
    # On SIGTERM: how long running requests may take to finish before the worker exits
    # (unfinished ones are redelivered).
    worker_drain_s: float = 30.0
    # Workers `millrace up` starts; with the vLLM engine on CPU they split the cores.
    workers: int = 1
    # This worker's name in readiness markers and logs (`up` names them worker, worker-2…).
    worker_name: str = "worker"
    # vLLM's engine core in its own process (vLLM's default): scheduling and the model run
    # while the worker handles Kafka and finished outputs. False: everything in one process.
    engine_process: bool = True
    # CPUs a worker's engine may use, e.g. "0-3,8"; default: all the process may use.
    cpu_set: str | None = None
    default_max_tokens: int = 256
    # bf16 (vLLM's CPU default) garbles the 135M bundled model's answers; float32 is
    # correct at ~2/3 of the speed. Use "auto" for real models on GPU hosts.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    kv_cache_gib: int = 1

    # sink: consume() returns when this many records arrived or the wait ran out
    sink_max_batch: int = 500
    sink_max_wait_ms: int = 0

    # sink: how often a running batch's new lines are published for partial results
    sink_partial_every_s: float = 1.0

    # webhooks. Each project's signing secret (`whsec_…`) is derived from this key, so
    # nothing secret is stored; `up` generates one (kept in the data dir) when unset.
    webhook_signing_key: SecretStr | None = None
    # Production: only https targets. Private, loopback and link-local targets are refused
    # unless named here ("loopback", "private", "link-local", comma separated).
    webhook_https_only: bool = False
    webhook_allow: str = "loopback"
    webhook_timeout_s: float = 10.0
    # Retry schedule: exponential from `base` (with jitter), each wait capped at `max`,
    # given up `horizon` after the event.
    webhook_retry_base_s: float = 5.0
    webhook_retry_max_s: float = 3600.0
    webhook_horizon_s: float = 72 * 3600.0
    # Batches of at most this many lines carry their result lines in the webhook payload.
    webhook_results_max_lines: int = 100

    # streams (Faust)
    faust_session_timeout_s: float = 6.0

    log_level: str = "INFO"
    ready_timeout_s: float = 600.0

    @field_validator("api_key", "webhook_signing_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`VAR=` (as compose writes an unset `${VAR:-}`) means unset, not an empty secret."""
        return None if value == "" else value

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

    def require_kafka(self) -> str:
        if not self.kafka_bootstrap:
            raise SettingsError("MILLRACE_KAFKA_BOOTSTRAP is not set")
        return self.kafka_bootstrap

    def require_redis(self) -> str:
        if not self.redis_url:
            raise SettingsError("MILLRACE_REDIS_URL is not set")
        return self.redis_url


class SettingsError(ValueError):
    """A setting a service needs is missing or inconsistent."""
