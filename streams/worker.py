"""Run the Faust aggregator in-process (what `millrace aggregator` does)."""

from __future__ import annotations

from faust.worker import Worker as FaustWorker

from millrace.settings import Settings


class AggregatorWorker(FaustWorker):
    def _setproctitle(self, info: str, *, ident: str = "millrace aggregator") -> None:
        super()._setproctitle(info, ident=ident)


def run_aggregator(settings: Settings) -> None:
    from streams.app import app

    AggregatorWorker(app, loglevel=settings.log_level.lower()).execute_from_commandline()
