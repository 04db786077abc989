"""Hostile image cells through a real azmlinfsrv with the production URL policy.

The server here runs with ``BLIP2_ALLOW_PRIVATE_URLS=0`` (the default in production).
An audit hook loaded into the server process (``sitecustomize`` on its PYTHONPATH)
records every outgoing ``socket.connect`` and refuses any that is not to loopback,
so the tests can tell that a refused URL was refused *before* any connection was
tried, and no packet can leave the machine even if the policy were broken.
"""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from pathlib import Path

import pytest
import requests
from PIL import Image
from serverproc import Server
from support import ImageHost, b64, picture

AUDIT_HOOK = '''
import errno, os, socket

_LOG = os.environ["CONNECT_AUDIT_LOG"]
_connect = socket.socket.connect
with open(_LOG + ".loaded", "a") as marker:
    marker.write(f"{os.getpid()}\\n")


def _is_loopback(address):
    host = address[0] if isinstance(address, tuple) else ""
    return host.startswith("127.") or host in ("::1", "localhost")


def connect(self, address):
    with open(_LOG, "a") as log:
        log.write(repr(address) + "\\n")
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise OSError(errno.ENETUNREACH, "refused by the test's connect audit")
    return _connect(self, address)


socket.socket.connect = connect
'''

LEAKS = ("127.0.0.1", "::1", "10.0.0.1", "169.254", "0.0.0.0", "Errno", "Traceback", "Error(", "socket",
         "urllib3", "getaddrinfo", "/etc/passwd", "PIL", "cannot identify")
GOOD_ROW = [b64(picture(seed=21)), "Question: what is it? Answer:"]


@pytest.fixture(scope="module")
def locked(tiny_model_dir, tmp_path_factory):
    """(server, audit log path): private URLs refused, outgoing connects recorded."""
    tmp = tmp_path_factory.mktemp("locked")
    (tmp / "hook").mkdir()
    (tmp / "hook" / "sitecustomize.py").write_text(AUDIT_HOOK)
    audit = tmp / "connects.log"
    audit.write_text("")
    srv = Server(tiny_model_dir, tmp / "azmlinfsrv.log", extra_env={
        "BLIP2_ALLOW_PRIVATE_URLS": "0",
        "BLIP2_URL_CONNECT_TIMEOUT_S": "1",
        "PYTHONPATH": str(tmp / "hook"),
        "CONNECT_AUDIT_LOG": str(audit),
    })
    yield srv, audit
    srv.stop()


@pytest.fixture(scope="module")
def host():
    h = ImageHost()
    yield h
    h.close()


def score(server, rows):
    return requests.post(server.url + "/score", json={"input_data": {"columns": ["image", "text"], "data": rows}}, timeout=60)


def assert_refused(resp, status, code, row):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert (err["code"], err["row"]) == (code, row), err
    for leak in LEAKS:
        assert leak not in resp.text, f"the answer leaks {leak!r}: {resp.text}"


def test_audit_hook_is_loaded_and_records_connects(locked, host, tmp_path, monkeypatch):
    """The hook must work, or the 'no connect' assertions below would prove nothing."""
    server, audit = locked
    loaded = Path(str(audit) + ".loaded").read_text().split()
    assert str(server.proc.pid) in loaded  # azmlinfsrv imported it; gunicorn's workers fork from it
    # the same hook, run here, records a loopback connect
    import socket

    log = tmp_path / "self-test.log"
    monkeypatch.setenv("CONNECT_AUDIT_LOG", str(log))
    monkeypatch.setattr(socket.socket, "connect", socket.socket.connect)  # restored after the test
    exec(compile(AUDIT_HOOK, "sitecustomize", "exec"), {})  # noqa: S102 - our own hook text
    requests.get(host.url("/nothing"), timeout=10)
    assert f"'127.0.0.1', {host.server.server_address[1]}" in log.read_text()
    # serving base64 connects to nothing
    assert score(server, [GOOD_ROW]).status_code == 200
    assert audit.read_text() == ""


LOOPBACK_SPELLINGS = [
    "http://localhost:{port}/x.png",
    "http://127.0.0.1:{port}/x.png",
    "http://127.1:{port}/x.png",
    "http://2130706433:{port}/x.png",
    "http://0x7f000001:{port}/x.png",
    "http://0177.0.0.1:{port}/x.png",
    "http://0.0.0.0:{port}/x.png",
    "http://0:{port}/x.png",
    "http://[::1]:{port}/x.png",
    "http://[::ffff:127.0.0.1]:{port}/x.png",
    "http://[::ffff:7f00:1]:{port}/x.png",
    "http://LOCALHOST:{port}/x.png",
    "https://127.0.0.1:{port}/x.png",
]


@pytest.mark.parametrize("template", LOOPBACK_SPELLINGS)
def test_loopback_spellings_are_refused_without_a_hit(locked, host, template):
    server, audit = locked
    host.add("/x.png", picture(seed=22))
    port = host.server.server_address[1]
    before_hits, before_audit = host.hits, audit.read_text()
    resp = score(server, [GOOD_ROW, [template.format(port=port), "q"]])
    assert_refused(resp, 400, "url_not_allowed", 1)
    assert host.hits == before_hits, "the image host was reached"
    assert audit.read_text() == before_audit, "the server tried to connect"


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://10.0.0.1/x.png",
    "http://192.168.1.1:8080/x.png",
    "http://[::ffff:10.0.0.1]/x.png",
    "file:///etc/passwd",
    "ftp://127.0.0.1/x.png",
    "gopher://127.0.0.1:70/_x",
    "http://user:pass@127.0.0.1/x.png",
])
def test_private_and_odd_urls_fail_fast_without_connecting(locked, url):
    server, audit = locked
    # first make sure the policy is in force (a loopback URL refused), so that a broken
    # policy never gets to send anything towards a private network
    probe = score(server, [["http://127.0.0.1:9/x.png", ""]])
    if probe.status_code != 400 or probe.json()["error"]["code"] != "url_not_allowed":
        pytest.fail(f"the private-URL policy is not in force: {probe.status_code} {probe.text}")
    before = audit.read_text()
    started = time.monotonic()
    resp = score(server, [GOOD_ROW, [url, "q"]])
    elapsed = time.monotonic() - started
    assert_refused(resp, 400, "url_not_allowed", 1)
    assert audit.read_text() == before, "the server tried to connect"
    assert elapsed < 5, f"took {elapsed:.1f} s"


# -- decompression bombs and hostile files ------------------------------------------------
def _png(width: int, height: int, rows: bytes | None = None) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    idat = zlib.compress(rows if rows is not None else b"\x00" * 64)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _real_png_bomb(side: int) -> bytes:
    """A complete, valid ``side`` x ``side`` black RGB PNG, compressed to a few hundred KB."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * side)
    data = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _gif(width: int, height: int) -> bytes:
    """A GIF whose logical screen is ``width`` x ``height`` holding one 1x1 frame."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0x80) + b"\x00\x00\x00\xff\xff\xff" + b"\x02\x02\x44\x01\x00"
    return screen + frame + b";"


def _eps() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
            b"newpath 0 0 moveto 64 64 lineto stroke showpage\n%%EOF\n")


def _tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(buf, "TIFF")
    return buf.getvalue()


HOSTILE = {
    "png_header_100000x100000": (lambda: _png(100_000, 100_000), 413, "image_too_large"),
    "png_real_8000x8000": (lambda: _real_png_bomb(8000), 413, "image_too_large"),
    "gif_screen_65535x65535": (lambda: _gif(65535, 65535), 413, "image_too_large"),
    "gif_screen_8000x8000": (lambda: _gif(8000, 8000), 413, "image_too_large"),
    "jpeg_truncated": (lambda: picture(seed=23, size=(200, 150), fmt="JPEG")[:600], 400, "invalid_image"),
    "png_truncated": (lambda: picture(seed=24, size=(200, 150))[:300], 400, "invalid_image"),
    "tiff": (_tiff, 400, "invalid_image"),
    "eps": (_eps, 400, "invalid_image"),
    "empty_after_decoding": (lambda: b"", 400, "invalid_base64"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_files_are_refused_quickly_and_the_server_carries_on(locked, name):
    server, _ = locked
    make, status, code = HOSTILE[name]
    cell = base64.b64encode(make()).decode() or "===="
    started = time.monotonic()
    resp = score(server, [GOOD_ROW, [cell, "q"]])
    elapsed = time.monotonic() - started
    assert_refused(resp, status, code, 1)
    assert elapsed < 5, f"{name} took {elapsed:.1f} s"
    ok = score(server, [GOOD_ROW])
    assert ok.status_code == 200 and len(ok.json()) == 1


def test_no_tracebacks_and_no_ghostscript(locked):
    server, _ = locked
    log = server.log()
    assert "Traceback" not in log
    assert "ghostscript" not in log.lower()
    assert requests.get(server.url + "/", timeout=10).status_code == 200
