"""A real local HTTP server for tests that fetch URLs: fixed bodies by path, redirects, 404s."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextmanager
def serve_files(routes: dict[str, tuple[int, bytes | str]]) -> Iterator[str]:
    """Serve ``path -> (status, body)`` on 127.0.0.1 (a 3xx's body is its Location); anything
    else is a 404. Yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            status, body = routes.get(self.path, (404, b"missing"))
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", str(body))
                body = b""
            data = body if isinstance(body, bytes) else body.encode()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
