"""`<prefix>.workers`: each worker's load, for the dashboard and the gateway's board."""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from millrace.records.base import Record


class ModelLoad(BaseModel):
    """One served model on one worker."""

    model_config = ConfigDict(frozen=True)

    running: int = 0  # requests in the engine
    waiting: int = 0  # lines read from Kafka, waiting for room in the engine
    lag: int = 0  # lines of the model's requests topic not yet read (this worker's partitions)
    finished: int = 0  # answered with 200 since the worker started
    failed: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    # measured throughput: prompt and generated tokens a second while the model had
    # requests running (a moving average); 0 until measured. The gateway's admission at
    # create sums it over the live workers.
    tokens_per_s: float = 0.0
    # the endpoints it answers, and the LoRA adapters served on it (each a model name a
    # line may give, run on this model)
    endpoints: list[str] = Field(default_factory=list)
    adapters: list[str] = Field(default_factory=list)


class WorkerStatus(Record):
    """`<prefix>.workers` (key: the worker's name): a worker's load, every few seconds, for
    the dashboard. `history` holds (unix time, finished, generation tokens) sampled every
    `HISTORY_EVERY_S` over the last minutes; `stopped` is the last record of a worker that
    stopped."""

    worker: str
    at: float = Field(default_factory=time.time)
    started_at: float
    models: dict[str, ModelLoad]
    history: list[tuple[float, int, int]] = Field(default_factory=list)
    stopped: bool = False
