"""A real local web site standing in for the pages and files users point millrace at (they
are outside millrace): each path answers its body with 200, anything else 404; hits counted.
Paths in `held` answer only once `site.release` is set (`site.held_hit` tells that one was
asked for): a fetch in flight, for a fault to land in."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Site:
    url: str
    hits: dict[str, int] = field(default_factory=dict)
    held_hit: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


@contextmanager
def serving(pages: dict[str, bytes], content_type: str = "text/html",
            held: frozenset[str] = frozenset(), host: str = "127.0.0.1") -> Iterator[Site]:
    site = Site("")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            site.hits[self.path] = site.hits.get(self.path, 0) + 1
            if self.path in held:
                site.held_hit.set()
                if not site.release.wait(300):
                    return  # nobody released it: the connection just closes
            body = pages.get(self.path)
            try:
                self.send_response(200 if body is not None else 404)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the fetcher died while it waited (the fault the test made)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    site.url = f"http://{host}:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield site
    finally:
        site.release.set()
        server.shutdown()
        server.server_close()
