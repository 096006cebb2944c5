"""Start one worker: `python -m gpu_consumer` or `millrace worker`. It prepares the models,
loads the engine and consumes until stopped."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn

from gpu_consumer import models
from millrace import readiness, service
from millrace.settings import Settings

HELP = "gpu_consumer: inference worker"


def flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=["vllm", "echo"], help="MILLRACE_ENGINE")
    parser.add_argument("--model", help="served models (MILLRACE_MODEL)")


def run_worker(settings: Settings) -> None:
    from gpu_consumer.echo import EchoEngine
    from gpu_consumer.engine import Engine
    from gpu_consumer.worker import Worker
    from millrace import metrics

    metrics.serve(settings)

    served = settings.served_models()
    engine: Engine
    folders: dict[str, str | None]
    if settings.engine == "echo":
        engine = EchoEngine(list(served), step_s=settings.echo_step_ms / 1000)
        folders = dict.fromkeys(served)
    else:
        from gpu_consumer.vllm_engine import VllmEngine

        resolved = models.resolve(served, settings.model_cache)
        engine = VllmEngine(settings, resolved)
        folders = {name: str(path) for name, path in resolved.items()}
    worker = Worker(settings, engine)
    try:
        worker.run(on_ready=lambda: readiness.mark_ready(
            settings, settings.worker_name, models=folders))
    finally:
        engine.close()


def main(argv: Sequence[str] | None = None) -> NoReturn:
    service.run("worker", argv, HELP, flags, run_worker)
