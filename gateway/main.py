"""Start the gateway: `python -m gateway` or `millrace gateway`."""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

from millrace import service
from millrace.settings import Settings

HELP = "the HTTP API"


def flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="MILLRACE_HOST")
    parser.add_argument("--port", type=int, help="MILLRACE_PORT")


def serve(settings: Settings) -> None:
    """Serve the API on `settings.host:port` until stopped."""
    if settings.gateway_metrics_dir is not None:
        # prometheus-client picks its multiprocess mode from this variable when first
        # imported: set it before anything imports it
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(settings.gateway_metrics_dir)
    import uvicorn

    from gateway.api.http_limits import LimitedHttpProtocol
    from gateway.app import create_app

    # Several gateways may serve one port: each binds it with SO_REUSEPORT and the kernel
    # spreads the connections over them.
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    # The socket object itself, not its fd: uvicorn wraps a bare fd as AF_UNIX, and the event
    # loop then leaves Nagle on — headers and body go out as two segments and the second waits
    # for the client's delayed ACK (p50 56 ms at 200 connections with the CPU half idle).
    # asyncio's own loop, not uvloop: under 200 busy connections uvloop served 3-5 % of the
    # requests 0.3-1.5 s late (p99 650-770 ms on one gateway, the loop never stalled over
    # 45 ms); asyncio's p99 was 76 ms at 6 % fewer requests/s. The collector: everything
    # imported is frozen out of it and the young generation collected every 100,000
    # allocations instead of 2,000 (p99 116 -> 68 ms with two gateways).
    config = uvicorn.Config(create_app(settings), loop="asyncio",
                            log_level=settings.log_level.lower(), access_log=False,
                            http=LimitedHttpProtocol, backlog=2048, proxy_headers=False,
                            server_header=False,
                            # JSON lines: uvicorn's loggers go through ours, not its own
                            log_config=None if settings.log_format == "json" else
                            uvicorn.config.LOGGING_CONFIG)
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(3)  # as uvicorn.run: the app did not start


def main(argv: Sequence[str] | None = None) -> NoReturn:
    service.run("gateway", argv, HELP, flags, serve)
