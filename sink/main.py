"""Start the sink: `python -m sink` or `millrace sink`."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import NoReturn

from millrace import service
from millrace.settings import Settings

HELP = "output/error file assembly"


def flags(parser: argparse.ArgumentParser) -> None:
    """The sink takes only the common flags."""


def assemble(settings: Settings) -> None:
    from sink.service import Sink

    asyncio.run(Sink(settings).run())


def main(argv: Sequence[str] | None = None) -> NoReturn:
    service.run("sink", argv, HELP, flags, assemble)
