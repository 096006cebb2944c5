"""Start the aggregator: `python -m streams` or `millrace aggregator` (a Faust worker;
`faust -A streams.app worker` runs the same app)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn

from millrace import service
from millrace.settings import Settings

HELP = "streams: batch statuses and expiry"


def flags(parser: argparse.ArgumentParser) -> None:
    """The aggregator takes only the common flags."""


def aggregate(settings: Settings) -> None:
    from streams.app import run

    run(settings)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    service.run("aggregator", argv, HELP, flags, aggregate)
