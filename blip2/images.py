"""A row's image cell -> RGB PIL image, with the safety limits of ``ImageLimits``.

The cell is either an http(s) URL (downloaded by ``blip2.fetch.fetch_url``) or
base64 (standard, URL-safe, MIME with line breaks, or a ``data:image/...;base64,``
URI). Decoding accepts only JPEG, PNG, WEBP, GIF and BMP (so EPS, and with it
Ghostscript, is never reached), checks the pixel count from the header before
any pixel data is decoded, refuses truncated files, takes the first frame of
animations, applies the EXIF orientation and returns RGB (alpha composited on
white).

Pillow globals: none are changed. Pillow's own bomb guard (``Image.MAX_IMAGE_PIXELS``,
about 89 MP by default) is read at call time and the effective pixel cap is
``min(limits.max_pixels, Image.MAX_IMAGE_PIXELS)``: every image Pillow would warn
about (``DecompressionBombWarning``) is refused here with ``image_too_large``, and
its ``DecompressionBombError`` maps to the same code. To allow images above
Pillow's threshold, raise ``Image.MAX_IMAGE_PIXELS`` explicitly at start-up.
``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False (the default) for truncated
files to be refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
import threading
from contextlib import nullcontext

from PIL import ExifTags, Image, ImageOps, JpegImagePlugin

from . import fetch
from .config import ImageLimits
from .errors import InvalidInput, PayloadTooLarge, ServiceError

log = logging.getLogger(__name__)

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_HOW = ("Send a public http(s) URL, or base64 of a JPEG/PNG/WEBP/GIF/BMP file (standard or URL-safe "
        "alphabet, line breaks allowed, optionally as a data:image/...;base64, URI).")
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_LINE_BREAKS = str.maketrans("", "", "\r\n")
_URLSAFE_TO_STD = str.maketrans("-_", "+/")
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_ROTATED = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height


def _bad_base64(why: str) -> InvalidInput:
    return InvalidInput(f"The image cell is not a URL or valid base64 ({why}). {_HOW}", code="invalid_base64")


def _bad_image() -> InvalidInput:
    return InvalidInput("The image could not be decoded: it is corrupt, truncated, or not a "
                        "JPEG/PNG/WEBP/GIF/BMP file. Send a complete image in one of those formats.",
                        code="invalid_image")


def _too_many_bytes(limits: ImageLimits) -> PayloadTooLarge:
    mb = limits.max_bytes / (1024 * 1024)
    return PayloadTooLarge(f"The image is over the {mb:g} MB limit. Send a smaller or more "
                           "compressed image.", code="image_too_large")


def _too_many_pixels(cap: int, size: tuple[int, int] | None = None) -> PayloadTooLarge:
    what = f"is {size[0]}x{size[1]} pixels" if size else "has too many pixels"
    return PayloadTooLarge(f"The image {what}, over the limit of {cap} pixels (width x height). "
                           "Resize it before sending.", code="image_too_large")


def is_url(ref: object) -> bool:
    """Whether a row's image cell names a URL (to be fetched) rather than carrying base64."""
    return isinstance(ref, str) and _URL_RE.match(ref.strip()) is not None


def read_image_bytes(ref: str, limits: ImageLimits) -> bytes:
    """A row's image cell -> encoded image bytes (not yet decoded).

    A ``scheme://`` cell goes to ``blip2.fetch.fetch_url`` (which accepts only
    http/https); anything else is base64. Raises ``InvalidInput`` (``invalid_base64``
    or a ``url_*`` code) or ``PayloadTooLarge`` (``image_too_large``, checked on the
    encoded length before any base64 decoding).
    """
    if not isinstance(ref, str):
        raise _bad_base64("it is not a string")
    text = ref.strip()
    if _URL_RE.match(text):
        return fetch.fetch_url(text, limits)
    return _decode_base64(text, limits)


def _data_uri_payload(text: str) -> str:
    header, comma, payload = text.partition(",")
    if not comma:
        raise _bad_base64("the data: URI has no comma before its data")
    params = [p.strip().lower() for p in header[5:].split(";")]
    if params[-1] != "base64":
        raise _bad_base64("the data: URI is not marked ;base64")
    media = params[0] if len(params) > 1 else ""
    if media and not (media.startswith("image/") or media == "application/octet-stream"):
        raise _bad_base64("the data: URI does not hold an image")
    return payload.strip()


def _decode_base64(text: str, limits: ImageLimits) -> bytes:
    if text[:5].lower() == "data:":
        text = _data_uri_payload(text)
    payload = text.translate(_LINE_BREAKS)
    if not payload:
        raise _bad_base64("it is empty")
    body = payload.rstrip("=")
    if len(body) * 3 // 4 > limits.max_bytes:  # the decoded size, known before decoding
        raise _too_many_bytes(limits)
    padding = len(payload) - len(body)
    if padding > 2 or len(body) % 4 == 1 or (padding and len(payload) % 4):
        raise _bad_base64("its length or = padding is wrong")
    if "-" in body or "_" in body:
        if "+" in body or "/" in body:
            raise _bad_base64("it mixes the standard and URL-safe alphabets")
        body = body.translate(_URLSAFE_TO_STD)
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise _bad_base64("it contains characters outside the base64 alphabet") from None


def _pixel_cap(limits: ImageLimits) -> int:
    pillow = Image.MAX_IMAGE_PIXELS
    return limits.max_pixels if pillow is None else min(limits.max_pixels, pillow)


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # a broken EXIF block only costs the orientation
        return 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any decoded mode -> a new RGB image; alpha and transparency composited on white."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):  # 16-bit grey: keep the top 8 bits
        src = im.convert("I") if mode.startswith("I;16") else im
        return src.point(lambda v: v * (1 / 256)).convert("L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


# Decoding more pixels than this (after JPEG draft scaling) takes one of the caller's ``heavy``
# slots: a 40-megapixel 16-bit RGBA PNG needs ~400 MB and seconds to decode and convert, and one
# such image per request thread could run a small VM out of memory.
HEAVY_PIXELS = 8_000_000


def decode_image(
    data: bytes, limits: ImageLimits, *, draft: tuple[int, int] | None = None,
    heavy: threading.Semaphore | None = None,
) -> Image.Image:
    """Encoded bytes -> a new RGB ``PIL.Image.Image``, upright, first frame only.

    ``draft=(w, h)``: a JPEG may be DCT-downscaled (by 1/2, 1/4 or 1/8) while
    staying at least ``w`` x ``h`` after orientation; other formats ignore it.
    ``heavy``: a semaphore held while an image of more than ``HEAVY_PIXELS`` decodes,
    which bounds how many such decodes (and their memory) run at once.
    Raises ``PayloadTooLarge`` (``image_too_large``: more than ``limits.max_bytes``
    bytes, or more than ``limits.max_pixels`` pixels by the header) or
    ``InvalidInput`` (``invalid_image``: undecodable, truncated, corrupt or not
    an allowed format). ``ValueError`` for a malformed ``draft`` (a caller bug).
    """
    if draft is not None and not (len(draft) == 2 and all(isinstance(d, int) and d >= 1 for d in draft)):
        raise ValueError(f"draft must be a (width, height) pair of positive ints, got {draft!r}")
    if len(data) > limits.max_bytes:
        raise _too_many_bytes(limits)
    if not data:
        raise _bad_image()
    cap = _pixel_cap(limits)
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
        try:
            width, height = im.size
            if width * height > cap:
                raise _too_many_pixels(cap, im.size)
            orientation = _orientation(im)
            if draft is not None and isinstance(im, JpegImagePlugin.JpegImageFile):
                im.draft("RGB", draft[::-1] if orientation in _ROTATED else draft)
            gate = heavy if heavy is not None and im.size[0] * im.size[1] > HEAVY_PIXELS else nullcontext()
            with gate:
                im.load()
                upright = ImageOps.exif_transpose(im) if 2 <= orientation <= 8 else im
                if upright.mode == "RGB":
                    return upright if upright is not im else im.copy()
                return _to_rgb(upright)
        finally:
            im.close()
    except ServiceError:
        raise
    except Image.DecompressionBombError:
        raise _too_many_pixels(cap) from None
    except Exception:  # untrusted bytes: whatever Pillow raises means "not a usable image"
        log.debug("image decoding failed", exc_info=True)
        raise _bad_image() from None


def load_image(ref: str, limits: ImageLimits) -> Image.Image:
    """A row's image cell -> RGB image: ``read_image_bytes`` then ``decode_image`` (same errors)."""
    return decode_image(read_image_bytes(ref, limits), limits)
