"""Helpers the tests share: small pictures, Azure-style base64, a loopback image host."""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image, ImageDraw


def require_inference_server() -> None:
    """Skip when azureml-inference-server-http is absent, but only in an engine-only run.

    ``make test-compat`` runs the suite on the oldest transformers we support, as on the GPU
    machine, without the Azure server (BLIP2_TESTS_ENGINE_ONLY=1): the tests that need
    azmlinfsrv skip there. Everywhere else a missing server is an install error and fails.
    """
    if os.environ.get("BLIP2_TESTS_ENGINE_ONLY") == "1" and importlib.util.find_spec("azureml_inference_server_http") is None:
        pytest.skip("engine-only run: azureml-inference-server-http is not installed")


def picture(color=(200, 30, 30), size=(96, 72), fmt="PNG", seed=0) -> bytes:
    """A small picture with a shape and some structure, encoded as ``fmt``."""
    image = Image.new("RGB", size, (235, 235, 225))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse([w // 4, h // 4, w // 4 + w // 3, h // 4 + h // 3], fill=color)
    draw.line([0, seed % h, w, h - 1], fill=(seed * 37 % 256, 90, 160), width=3)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    """MIME base64 as the Azure samples send it (base64.encodebytes: a newline every 76 chars)."""
    return base64.encodebytes(data).decode("ascii")


class ImageHost:
    """A loopback HTTP server serving ``files`` (path -> (content type, bytes)); counts hits."""

    def __init__(self):
        self.files: dict[str, tuple[str, bytes]] = {}
        self.hits = 0
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                host.hits += 1
                entry = host.files.get(self.path)
                if entry is None:
                    self.send_error(404)
                    return
                ctype, body = entry
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def add(self, path: str, body: bytes, ctype: str = "image/png") -> str:
        self.files[path] = (ctype, body)
        return self.url(path)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
