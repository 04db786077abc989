"""blip2.fetch: the address policy, SSRF refusals, pinning, redirects, caps and deadlines.

Everything runs against a loopback server; "public" is simulated by replacing
``fetch.resolve`` / ``fetch.is_public_address`` / ``socket.getaddrinfo``.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import time

import pytest

from blip2 import fetch
from blip2.config import ImageLimits
from blip2.errors import InvalidInput, PayloadTooLarge
from blip2.fetch import fetch_url, host_allowed, is_public_address

try:
    from . import imgfactory as f
    from .fetchserver import Server, refused_port, wait_until
except ImportError:  # tests/unit is not a package
    import imgfactory as f
    from fetchserver import Server, refused_port, wait_until

PNG = f.encode(f.quadrants(), "PNG")
PRIVATE_OK = ImageLimits(allow_private_urls=True, connect_timeout_s=1.0, read_timeout_s=2.0, total_timeout_s=3.0)
STRICT = ImageLimits(connect_timeout_s=1.0, read_timeout_s=2.0, total_timeout_s=3.0)


@pytest.fixture
def server():
    with Server(PNG) as srv:
        yield srv


def _fails(url: str, limits: ImageLimits, code: str, exc_type=InvalidInput):
    with pytest.raises(exc_type) as exc:
        fetch_url(url, limits)
    assert exc.value.code == code, exc.value.message
    return exc.value


# --- the pure policy -------------------------------------------------------------------------

TEREDO_TO_LOOPBACK = str(ipaddress.IPv6Address(
    (0x2001 << 112) | (0x08080808 << 64) | (0xFFFFFFFF ^ 0x7F000001)))  # server 8.8.8.8, client 127.0.0.1

NOT_PUBLIC = [
    "127.0.0.1", "127.255.255.254", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1",
    "169.254.169.254", "100.64.0.1", "100.127.255.254", "0.0.0.0", "0.1.2.3", "224.0.0.1",
    "239.255.255.250", "240.0.0.1", "255.255.255.255", "192.0.2.1", "198.18.0.1", "203.0.113.9",
    "::", "::1", "fd00::1", "fc00::1", "fe80::1", "fe80::1%eth0", "fec0::1", "ff02::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1",
    "2002:7f00:1::1", "2002:a9fe:a9fe::1", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",
    "::ffff:0:127.0.0.1", TEREDO_TO_LOOPBACK, "not an address", "", "127.1", "2130706433",
    "168.63.129.16", "::ffff:168.63.129.16", "64:ff9b::a83f:8110",  # Azure WireServer, and its IPv6 forms
]
PUBLIC = [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "11.0.0.1", "100.128.0.1", "172.32.0.1", "192.169.0.1",
    "2606:4700:4700::1111", "2001:4860:4860::8888", "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808",
]


@pytest.mark.parametrize("ip", NOT_PUBLIC)
def test_policy_refuses_non_public_addresses(ip):
    assert is_public_address(ip) is False


@pytest.mark.parametrize("ip", PUBLIC)
def test_policy_accepts_public_addresses(ip):
    assert is_public_address(ip) is True


def test_host_allowlist():
    assert host_allowed("anything.example", ())
    exact = ("images.example.com",)
    assert host_allowed("images.example.com", exact) and host_allowed("IMAGES.example.com.", exact)
    assert not host_allowed("a.images.example.com", exact) and not host_allowed("example.com", exact)
    subs = (".example.com",)
    assert host_allowed("a.example.com", subs) and host_allowed("a.b.example.com", subs)
    assert not host_allowed("example.com", subs) and not host_allowed("badexample.com", subs)


# --- SSRF: refused before any connection -----------------------------------------------------

SPELLINGS = ["localhost", "127.0.0.1", "127.1", "2130706433", "0x7f000001", "017700000001", "0177.0.0.1",
             "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0", "0", "169.254.169.254", "10.0.0.1", "192.168.1.1",
             "100.64.0.1", "[fd00::1]", "[fe80::1]", "[::ffff:7f00:1]", "user:pass@127.0.0.1", "user@localhost"]


def test_every_private_spelling_is_refused_without_connecting(server):
    for host in SPELLINGS:
        error = _fails(server.url("/img.png", host=host), STRICT, "url_not_allowed")
        assert "127.0.0.1" not in error.message and "::1" not in error.message
    for url in ("file:///etc/passwd", server.url("/", scheme="ftp"), server.url("/", scheme="gopher"),
                "http:///img.png", "http://exa mple.com/x.png", f"http://127.0.0.1:{server.port}:1/x"):
        _fails(url, STRICT, "url_not_allowed")
    time.sleep(0.05)
    assert server.connections == 0


def test_any_private_address_among_the_resolved_ones_refuses(server, monkeypatch):
    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", server.port)),
               (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", server.port))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: answers)
    _fails(server.url("/img.png", host="mixed.example"), STRICT, "url_not_allowed")
    assert server.connections == 0


def test_private_urls_are_fetched_when_allowed(server):
    assert fetch_url(server.url("/img.png"), PRIVATE_OK) == PNG
    assert fetch_url(server.url("/img.png", host="localhost"), PRIVATE_OK) == PNG
    assert server.connections == 2
    assert server.hosts == [f"127.0.0.1:{server.port}", f"localhost:{server.port}"]


def test_proxy_variables_are_ignored(server, monkeypatch):
    dead = f"http://127.0.0.1:{refused_port()}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead)
    assert fetch_url(server.url("/img.png"), PRIVATE_OK) == PNG


# --- pinning: one lookup, and the connection goes where the check looked -----------------------

def test_dns_is_resolved_once_and_the_connection_is_pinned(server, monkeypatch):
    calls = []

    def rebinding_getaddrinfo(host, port, *args, **kwargs):
        calls.append(host)
        ip = "127.0.0.1" if len(calls) == 1 else "192.0.2.1"  # a second lookup would go elsewhere
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)
    monkeypatch.setattr(fetch, "is_public_address", lambda ip: ip == "127.0.0.1")
    url = server.url("/img.png", host="rebind.invalid")  # a name no real resolver knows
    assert fetch_url(url, STRICT) == PNG
    assert calls == ["rebind.invalid"]
    assert server.connections == 1
    assert server.hosts == [f"rebind.invalid:{server.port}"]


def test_policy_sees_what_the_resolver_returned(server, monkeypatch):
    seen = []
    monkeypatch.setattr(fetch, "is_public_address", lambda ip: seen.append(ip) or False)
    _fails(server.url("/img.png", host="0x7f000001"), STRICT, "url_not_allowed")
    assert seen == ["127.0.0.1"]


# --- redirects -------------------------------------------------------------------------------

def _public_first_hop_only(monkeypatch):
    checks = []
    monkeypatch.setattr(fetch, "resolve", lambda host, port: [(socket.AF_INET, ("127.0.0.1", port))])
    monkeypatch.setattr(fetch, "is_public_address", lambda ip: checks.append(ip) or len(checks) == 1)
    return checks


def test_redirect_to_a_private_address_is_refused(server, monkeypatch):
    checks = _public_first_hop_only(monkeypatch)
    url = server.url(f"/redirect?to={server.url('/img.png', host='private.example')}", host="public.example")
    _fails(url, STRICT, "url_not_allowed")
    assert len(checks) == 2 and server.connections == 1


def test_redirects_are_followed_when_every_hop_passes(server, monkeypatch):
    monkeypatch.setattr(fetch, "resolve", lambda host, port: [(socket.AF_INET, ("127.0.0.1", port))])
    monkeypatch.setattr(fetch, "is_public_address", lambda ip: True)
    for status in (301, 302, 303, 307, 308):
        assert fetch_url(server.url(f"/redirect?status={status}&to=/img.png", host="a.example"), STRICT) == PNG
    assert server.hosts[-2:] == [f"a.example:{server.port}"] * 2


def test_redirect_to_another_scheme_or_credentials_is_refused(server):
    for target in ("file:///etc/passwd", "ftp://example.com/x", f"http://u:p@127.0.0.1:{server.port}/img.png"):
        _fails(server.url(f"/redirect?to={target}"), PRIVATE_OK, "url_not_allowed")


def test_too_many_redirects(server):
    limits = ImageLimits(allow_private_urls=True, max_redirects=2, total_timeout_s=3.0)
    error = _fails(server.url("/loop"), limits, "url_not_allowed")
    assert "redirect" in error.message and server.connections == 3
    assert fetch_url(server.url("/redirect?to=/img.png"), ImageLimits(allow_private_urls=True, max_redirects=1)) == PNG
    _fails(server.url("/redirect?to=/img.png"), ImageLimits(allow_private_urls=True, max_redirects=0),
           "url_not_allowed")


def test_allowlist_is_honoured_on_every_hop(server):
    limits = ImageLimits(allow_private_urls=True, allowed_hosts=("localhost",), total_timeout_s=3.0)
    assert fetch_url(server.url("/img.png", host="localhost"), limits) == PNG
    _fails(server.url("/img.png"), limits, "url_not_allowed")
    _fails(server.url(f"/redirect?to={server.url('/img.png')}", host="localhost"), limits, "url_not_allowed")
    assert server.connections == 2


# --- responses -------------------------------------------------------------------------------

def test_content_types(server):
    assert fetch_url(server.url("/octet"), PRIVATE_OK) == PNG
    assert fetch_url(server.url("/notype"), PRIVATE_OK) == PNG
    for path in ("/html", "/json"):
        _fails(server.url(path), PRIVATE_OK, "url_fetch_failed")


def test_http_errors_and_broken_bodies(server):
    error = _fails(server.url("/missing"), PRIVATE_OK, "url_fetch_failed")
    assert "404" in error.message
    for path in ("/short", "/gzip", "/empty", "/redirect?to="):
        _fails(server.url(path), PRIVATE_OK, "url_fetch_failed")


def test_connection_refused_and_unresolvable_hosts(monkeypatch):
    _fails(f"http://127.0.0.1:{refused_port()}/img.png", PRIVATE_OK, "url_fetch_failed")

    def no_such_host(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    error = _fails("http://no-such-host.invalid/img.png", PRIVATE_OK, "url_fetch_failed")
    assert "resolved" in error.message and "Name or service" not in error.message


def test_content_length_over_the_cap_is_refused_without_reading(server):
    start = time.monotonic()
    _fails(server.url("/huge-length"), PRIVATE_OK, "image_too_large", PayloadTooLarge)
    assert time.monotonic() - start < 1.0  # the body never comes: reading it would stall


def test_body_over_the_cap_without_length(server):
    limits = ImageLimits(allow_private_urls=True, max_bytes=100_000, total_timeout_s=3.0)
    _fails(server.url("/endless"), limits, "image_too_large", PayloadTooLarge)
    _fails(server.url("/img.png"), ImageLimits(allow_private_urls=True, max_bytes=len(PNG) - 1),
           "image_too_large", PayloadTooLarge)
    assert fetch_url(server.url("/img.png"), ImageLimits(allow_private_urls=True, max_bytes=len(PNG))) == PNG


# --- time limits ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/drip?every=0.2", "/drip-headers"])
def test_trickling_server_is_cut_at_the_total_deadline(server, path):
    limits = ImageLimits(allow_private_urls=True, read_timeout_s=5.0, total_timeout_s=1.0)
    start = time.monotonic()
    _fails(server.url(path), limits, "url_timeout")
    assert 0.9 < time.monotonic() - start < 2.0


def test_stalled_server_hits_the_read_timeout(server):
    limits = ImageLimits(allow_private_urls=True, read_timeout_s=0.3, total_timeout_s=5.0)
    start = time.monotonic()
    _fails(server.url("/stall"), limits, "url_timeout")
    assert time.monotonic() - start < 1.5


def test_concurrent_fetches_do_not_wait_for_each_other(server):
    from concurrent.futures import ThreadPoolExecutor

    limits = ImageLimits(allow_private_urls=True, read_timeout_s=5.0, total_timeout_s=1.0)

    def one(path):
        try:
            return fetch_url(server.url(path), limits)
        except InvalidInput as exc:
            return exc.code

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, ["/drip", "/img.png"] * 4))
    assert results == ["url_timeout", PNG] * 4
    assert time.monotonic() - start < 2.0


def test_no_sockets_or_threads_left_behind(server):
    import threading

    before = threading.active_count()
    for _ in range(5):
        fetch_url(server.url("/img.png"), PRIVATE_OK)
    assert wait_until(lambda: threading.active_count() <= before)


# --- TLS: SNI and certificate checked against the host name, not the pinned IP -----------------

def _self_signed(tmp_path, name: str):
    crypto = pytest.importorskip("cryptography")
    del crypto
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_https_uses_the_host_name_for_sni_and_certificate(tmp_path, monkeypatch):
    import ssl

    cert, key = _self_signed(tmp_path, "img.example")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    monkeypatch.setattr(fetch, "resolve", lambda host, port: [(socket.AF_INET, ("127.0.0.1", port))])
    with Server(PNG, ssl_context=context) as srv:
        _fails(srv.url("/img.png", host="img.example", scheme="https"), PRIVATE_OK, "url_fetch_failed")  # not in CAs
        monkeypatch.setattr(fetch, "ca_bundle", lambda: cert)
        assert fetch_url(srv.url("/img.png", host="img.example", scheme="https"), PRIVATE_OK) == PNG
        assert "img.example" in srv.sni and srv.hosts == [f"img.example:{srv.port}"]
        _fails(srv.url("/img.png", host="other.example", scheme="https"), PRIVATE_OK, "url_fetch_failed")
