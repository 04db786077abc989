"""Download one image over http(s) without letting a URL reach private networks.

``fetch_url`` is the entry point; ``is_public_address`` and ``host_allowed`` are
the pure policy (in ``blip2.netpolicy``), ``resolve`` the one name lookup per hop. Tests replace
``resolve``, ``is_public_address`` or ``ca_bundle`` here (looked up at call time).

Each hop: only http/https, no credentials, host on ``limits.allowed_hosts`` if
set; the name is resolved once and every address must be public (unless
``limits.allow_private_urls``); the socket then connects to those checked
addresses only (``_Pinned._new_conn``, no second lookup: no DNS rebinding) while
Host, TLS SNI and the certificate check keep the name. Redirects are followed by
hand, each hop checked again. Content-Length, then the streamed body, are capped
at ``limits.max_bytes``; a ``_Deadline`` watchdog cuts the sockets at
``limits.total_timeout_s`` so a trickling server cannot hold a thread past it.
urllib3 is used directly (no requests.Session): it never reads proxy variables,
which would bypass the address check.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

import certifi
import urllib3.exceptions as u3e
from urllib3.connection import HTTPConnection, HTTPSConnection

from .config import ImageLimits
from .errors import InvalidInput, PayloadTooLarge, ServiceError
from .netpolicy import host_allowed, is_public_address  # noqa: F401 - tests replace them here

_FIX = "Send a public http(s) URL or base64 of a JPEG/PNG/WEBP/GIF/BMP image."
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_MAX_URL = 8192
_HEADERS = {"User-Agent": "blip2-endpoint (image fetch)", "Accept": "image/*,*/*;q=0.5",
            "Accept-Encoding": "identity", "Connection": "close"}
_SAFE_URL_CHARS = "!#$%&'()*+,/:;=?@[]~"  # kept as they are; anything else non-ASCII is %-encoded
_NOT_IMAGE_TOP = frozenset({"text", "audio", "video", "multipart", "font", "message", "model"})
_NOT_IMAGE_APP = frozenset({"json", "xml", "javascript", "ecmascript", "pdf", "postscript",
                            "xhtml+xml", "zip", "gzip", "x-tar", "rtf", "msword"})

def _not_allowed(why: str) -> InvalidInput:
    return InvalidInput(f"The image URL is not allowed: {why}. {_FIX}", code="url_not_allowed")


def _failed(why: str) -> InvalidInput:
    return InvalidInput(f"The image URL could not be downloaded: {why}. {_FIX}", code="url_fetch_failed")


def _timeout() -> InvalidInput:
    return InvalidInput("The image URL took too long to download. Send a URL on a faster server, "
                        "or the image itself as base64.", code="url_timeout")


def _too_large(limits: ImageLimits) -> PayloadTooLarge:
    mb = limits.max_bytes / (1024 * 1024)
    return PayloadTooLarge(f"The image at the URL is over the {mb:g} MB limit. Send a smaller or "
                           "more compressed image.", code="image_too_large")


def resolve(host: str, port: int) -> list[tuple[int, tuple]]:
    """The one name lookup of a hop: ``[(family, sockaddr), ...]``, duplicates removed."""
    found: list[tuple[int, tuple]] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr) not in found:
            found.append((family, sockaddr))
    return found


def ca_bundle() -> str:
    """The CA certificates HTTPS servers are checked against (certifi's, as requests uses)."""
    return certifi.where()


@dataclass(frozen=True)
class Target:
    """One checked hop. ``host``: ASCII name or IP literal (Host, SNI, certificate);
    ``path``: percent-encoded path and query; ``addrs``: checked (family, sockaddr)."""

    url: str
    https: bool
    host: str
    port: int
    path: str
    addrs: tuple[tuple[int, tuple], ...]


def check_url(url: str, limits: ImageLimits) -> Target:
    """Parse, vet and resolve ``url``; raise ``url_not_allowed`` or ``url_fetch_failed``."""
    if len(url) > _MAX_URL:
        raise _not_allowed(f"it is longer than {_MAX_URL} characters")
    if any(ord(c) <= 32 or ord(c) == 127 for c in url):
        raise _not_allowed("it contains spaces or control characters; percent-encode them")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _not_allowed("it is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _not_allowed("only http:// and https:// URLs can be fetched")
    if "@" in parts.netloc:
        raise _not_allowed("it carries a user name or password; use a URL without credentials")
    host = parts.hostname or ""
    if not host or "%" in host:
        raise _not_allowed("it has no usable host name")
    if ":" not in host:  # IPv6 literals stay as they are
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise _not_allowed("its host name is not a valid domain name") from None
    if not host_allowed(host, limits.allowed_hosts):
        raise _not_allowed("its host is not on this service's list of allowed hosts")
    port = port or (443 if scheme == "https" else 80)
    try:
        addrs = tuple(resolve(host, port))
    except (OSError, UnicodeError):
        addrs = ()
    if not addrs:
        raise _failed("its host name could not be resolved")
    if not limits.allow_private_urls and not all(is_public_address(sa[0]) for _, sa in addrs):
        raise _not_allowed("its host is not a public internet address")
    path = quote(parts.path or "/", safe=_SAFE_URL_CHARS)
    if parts.query:
        path += "?" + quote(parts.query, safe=_SAFE_URL_CHARS)
    return Target(url, scheme == "https", host, port, path, addrs)


class _Deadline:
    """The wall-clock budget of one fetch. When it runs out, a timer shuts down
    every socket registered with ``watch`` (through a duplicate descriptor, so
    it works while TLS wraps the original), which unblocks any read in progress."""

    def __init__(self, seconds: float):
        self._end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._dups: list[socket.socket] = []
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        with self._lock:
            for dup in self._dups:
                dup.close()
            self._dups.clear()

    def left(self) -> float:  # raises url_timeout when no time is left
        left = self._end - time.monotonic()
        if left <= 0 or self.expired:
            raise _timeout()
        return left

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if self.expired:
                raise _timeout()
            self._dups.append(sock.dup())

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for dup in self._dups:
                try:
                    dup.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Pinned:
    """Mixin replacing urllib3's connect step: try the checked addresses in order,
    with no name lookup, and put each socket under the deadline."""

    def __init__(self, *args, addrs: tuple, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self._addrs = addrs
        self._deadline = deadline

    def _new_conn(self) -> socket.socket:
        error: OSError | None = None
        for family, sockaddr in self._addrs:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                self._deadline.watch(sock)
                sock.settimeout(min(self.timeout, self._deadline.left()))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
        raise error if error is not None else ConnectionError("no address to connect to")


_PinnedHTTP = type("_PinnedHTTP", (_Pinned, HTTPConnection), {})
_PinnedHTTPS = type("_PinnedHTTPS", (_Pinned, HTTPSConnection), {})


def _check_headers(headers, limits: ImageLimits) -> None:
    """Refuse compressed bodies, clearly non-image types (missing and octet-stream pass) and
    a Content-Length over the cap, all before any of the body is read."""
    if headers.get("Content-Encoding", "").strip().lower() not in ("", "identity"):
        raise _failed("the server compressed the body (Content-Encoding); serve the image as it is")
    top, _, sub = headers.get("Content-Type", "").split(";", 1)[0].strip().lower().partition("/")
    app_not_image = top == "application" and (sub in _NOT_IMAGE_APP or sub.endswith(("+json", "+xml")))
    if top in _NOT_IMAGE_TOP or app_not_image:
        raise _failed("it returned a web page or other non-image content; link the image file itself")
    length = headers.get("Content-Length", "").strip()
    if length.isdigit() and int(length) > limits.max_bytes:
        raise _too_large(limits)


def _read_body(resp, limits: ImageLimits, deadline: _Deadline) -> bytes:
    chunks, total = [], 0
    while True:
        deadline.left()
        chunk = resp.read1(_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > limits.max_bytes:
            raise _too_large(limits)
        chunks.append(chunk)
    deadline.left()  # a socket cut by the deadline looks like a clean end of body
    if not total:
        raise _failed("it returned an empty body")
    return b"".join(chunks)


def _get(target: Target, limits: ImageLimits, deadline: _Deadline) -> tuple[str | None, bytes]:
    """One GET to a checked target: ``(redirect location, b"")`` or ``(None, body)``."""
    cls, extra = _PinnedHTTP, {}
    if target.https:
        cls, extra = _PinnedHTTPS, {"cert_reqs": "CERT_REQUIRED", "ca_certs": ca_bundle()}
    conn = cls(target.host, target.port, timeout=min(limits.connect_timeout_s, deadline.left()),
               addrs=target.addrs, deadline=deadline, **extra)
    try:
        conn.connect()
        conn.timeout = limits.read_timeout_s  # applied to the socket for the request and response
        conn.request("GET", target.path, headers=_HEADERS, preload_content=False, decode_content=False)
        resp = conn.getresponse()
        if resp.status in _REDIRECTS:
            location = resp.headers.get("Location", "").strip()
            if not location:
                raise _failed(f"it answered a redirect (HTTP {resp.status}) without a Location")
            return location, b""
        if not 200 <= resp.status < 300:
            raise _failed(f"the server answered HTTP {resp.status}; check that the URL is public and correct")
        _check_headers(resp.headers, limits)
        return None, _read_body(resp, limits, deadline)
    except ServiceError:
        raise
    except (OSError, http.client.HTTPException, u3e.HTTPError) as exc:
        raise _network_error(exc, deadline) from None
    finally:
        conn.close()


def _network_error(exc: BaseException, deadline: _Deadline) -> ServiceError:
    if deadline.expired:
        return _timeout()
    if isinstance(exc, (TimeoutError, u3e.TimeoutError)) and not isinstance(exc, u3e.NewConnectionError):
        return _timeout()
    if isinstance(exc, (ssl.SSLError, u3e.SSLError)):
        return _failed("the TLS connection failed (check that the server's certificate is valid for its name)")
    return _failed("the connection was refused or broken, or the server sent an invalid response")


def fetch_url(url: str, limits: ImageLimits) -> bytes:
    """Download the image at an http(s) ``url``; returns at most ``limits.max_bytes`` bytes.

    Raises ``InvalidInput`` with code ``url_not_allowed`` (scheme, credentials,
    non-public address, host not allowed, too many redirects), ``url_fetch_failed``
    (DNS, connection, TLS, non-2xx status, non-image content type, empty body) or
    ``url_timeout`` (connect/read timeout or ``limits.total_timeout_s`` over);
    ``PayloadTooLarge`` with code ``image_too_large`` when the body is over the cap.
    Safe to call from several threads at once (no shared state).
    """
    with _Deadline(limits.total_timeout_s) as deadline:
        for _ in range(limits.max_redirects + 1):
            target = check_url(url, limits)
            location, body = _get(target, limits, deadline)
            if location is None:
                return body
            url = urljoin(target.url, location)
    raise _not_allowed(f"it redirected more than {limits.max_redirects} times")
