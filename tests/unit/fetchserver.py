"""A loopback HTTP(S) server for the fetch tests: serves a PNG and misbehaves on
request, and counts the connections it accepts (so tests can prove that a
refused URL never reached it)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, body: bytes, ssl_context=None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.body = body
        self.port = self.server_address[1]
        self.connections = 0
        self.hosts: list[str] = []
        self.sni: list[str] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        if ssl_context is not None:
            ssl_context.sni_callback = lambda sock, name, ctx: self.sni.append(name)
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True)

    def get_request(self):
        conn = super().get_request()
        with self._lock:
            self.connections += 1
        return conn

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def __enter__(self):
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args) -> None:
        pass

    def _head(self, status: int, ctype: str | None = "image/png", length: int | None = None, **extra) -> None:
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for name, value in extra.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()

    def _drip(self, data: bytes, every_s: float) -> None:
        for i in range(len(data)):
            if self.server.stop.wait(every_s):
                return
            try:
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
            except OSError:
                return

    def do_GET(self) -> None:  # noqa: C901 (one branch per behaviour)
        self.server.hosts.append(self.headers.get("Host", ""))
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        body = self.server.body
        route = parts.path
        if route == "/img.png":
            self._head(200, length=len(body))
            self.wfile.write(body)
        elif route == "/octet":
            self._head(200, "application/octet-stream", len(body))
            self.wfile.write(body)
        elif route == "/notype":
            self._head(200, None, len(body))
            self.wfile.write(body)
        elif route == "/html":
            page = b"<html><body>not an image</body></html>"
            self._head(200, "text/html; charset=utf-8", len(page))
            self.wfile.write(page)
        elif route == "/json":
            self._head(200, "application/problem+json", 2)
            self.wfile.write(b"{}")
        elif route == "/missing":
            self._head(404, "text/plain", 9)
            self.wfile.write(b"not found")
        elif route == "/redirect":
            self._head(int(query.get("status", 302)), None, 0, Location=query["to"])
        elif route == "/loop":
            self._head(302, None, 0, Location="/loop")
        elif route == "/drip":  # an image that trickles in, one byte at a time, no length
            self._head(200)
            self._drip(body, float(query.get("every", 0.2)))
        elif route == "/drip-headers":  # even the headers trickle
            self._drip(b"HTTP/1.0 200 OK\r\nX-Padding: " + b"a" * 500 + b"\r\n\r\n", 0.1)
        elif route == "/stall":
            self._head(200, length=len(body))
            self.server.stop.wait(5)
        elif route == "/huge-length":  # announces a body it never sends
            self._head(200, length=10**9)
            self.server.stop.wait(5)
        elif route == "/endless":  # no Content-Length, more bytes than any cap
            self._head(200)
            chunk = bytes(64 * 1024)
            for _ in range(64):
                try:
                    self.wfile.write(chunk)
                except OSError:
                    return
        elif route == "/short":  # promises more than it sends
            self._head(200, length=len(body) + 100)
            self.wfile.write(body)
        elif route == "/gzip":
            self._head(200, length=len(body), Content_Encoding="gzip")
            self.wfile.write(body)
        elif route == "/empty":
            self._head(200, length=0)
        else:
            self._head(500, "text/plain", 0)


def refused_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout_s: float = 2.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
