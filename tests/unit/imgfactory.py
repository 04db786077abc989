"""Test images for the image and fetch tests: real files in every format, and
hand-built hostile ones (headers that lie about their size, decompression bombs)."""

from __future__ import annotations

import functools
import io
import struct
import zlib

from PIL import Image

RED, GREEN, BLUE, YELLOW, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255)


def quadrants(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """RGB image: red top-left, green top-right, blue bottom-left, yellow bottom-right."""
    w, h = size
    im = Image.new("RGB", size, RED)
    im.paste(GREEN, (w // 2, 0, w, h // 2))
    im.paste(BLUE, (0, h // 2, w // 2, h))
    im.paste(YELLOW, (w // 2, h // 2, w, h))
    return im


def noisy(size: tuple[int, int] = (48, 40)) -> Image.Image:
    """Deterministic noise, so that its base64 uses every character of the alphabet."""
    return Image.effect_noise(size, 90).convert("RGB").rotate(17)


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def mean_colour(im: Image.Image, box: tuple[int, int, int, int]) -> tuple[float, float, float]:
    """Average RGB of a box (left, top, right, bottom)."""
    region = im.crop(box).convert("RGB")
    n = region.width * region.height
    return tuple(sum(band.histogram()[v] * v for v in range(256)) / n for band in region.split())


def close_to(colour, expected, tol: float = 40.0) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(colour, expected))


def animated_gif(colours=(RED, GREEN, BLUE), size=(16, 16)) -> bytes:
    frames = [Image.new("RGB", size, c) for c in colours]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """Stored 64x32, left half red, right half blue, with an EXIF orientation tag."""
    im = Image.new("RGB", (64, 32), RED)
    im.paste(BLUE, (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", exif=exif, quality=95)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny (inconsistent) IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@functools.lru_cache(maxsize=None)
def compressible_png(width: int = 8000, height: int = 8000) -> bytes:
    """A valid all-black greyscale PNG: width*height pixels in a few hundred KB."""
    comp = zlib.compressobj(1)
    rows = bytes(width + 1) * 100  # filter byte + pixels, 100 rows at a time
    parts = [comp.compress(rows) for _ in range(height // 100)]
    parts.append(comp.compress(bytes(width + 1) * (height % 100)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts))
            + _chunk(b"IEND", b""))


def gif_with_screen(width: int, height: int) -> bytes:
    """A real 1x1 GIF whose logical screen is rewritten to width x height."""
    data = bytearray(encode(Image.new("P", (1, 1), 0), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def gif_lzw_offset(data: bytes) -> int:
    """Offset of the first image's LZW minimum-code-size byte in a GIF."""
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while data[pos] == 0x21:  # extension: introducer, label, sub-blocks
        pos += 2
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    assert data[pos] == 0x2C, "image descriptor expected"
    flags = data[pos + 9]
    return pos + 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
       b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")
