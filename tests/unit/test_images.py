"""blip2.images: base64 variants, formats, modes, orientation, bombs, hostile input."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import EpsImagePlugin, Image, ImageFile

from blip2 import fetch, images
from blip2.config import ImageLimits
from blip2.errors import InvalidInput, PayloadTooLarge
from blip2.images import decode_image, load_image, read_image_bytes

try:
    from . import imgfactory as f
except ImportError:  # tests/unit is not a package
    import imgfactory as f

LIMITS = ImageLimits()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _code(exc_info) -> str:
    return exc_info.value.code


# --- base64 -----------------------------------------------------------------------------------

def _variants(data: bytes) -> dict[str, str]:
    std = base64.b64encode(data).decode()
    mime = base64.encodebytes(data).decode()
    url = base64.urlsafe_b64encode(data).decode()
    return {
        "standard": std,
        "mime": mime,
        "mime_crlf": mime.replace("\n", "\r\n"),
        "urlsafe": url,
        "urlsafe_unpadded": url.rstrip("="),
        "data_uri": "data:image/png;base64," + std,
        "data_uri_mime": "data:image/png;base64," + mime,
        "data_uri_upper_params": "DATA:image/PNG;name=x.png;BASE64," + std,
        "surrounding_space": "  \n\t" + std + " \r\n",
    }


def test_every_base64_variant_gives_the_same_bytes_and_pixels():
    data = f.encode(f.noisy(), "PNG")
    std = base64.b64encode(data).decode()
    assert "+" in std and "/" in std  # so the URL-safe variants really differ
    assert len(base64.encodebytes(data).decode().splitlines()) > 2
    reference = decode_image(data, LIMITS)
    for name, text in _variants(data).items():
        got = read_image_bytes(text, LIMITS)
        assert got == data, name
        assert decode_image(got, LIMITS).tobytes() == reference.tobytes(), name
        assert load_image(text, LIMITS).tobytes() == reference.tobytes(), name


@pytest.mark.parametrize("text", [
    "", "   ", "not base64!!", "@@@@", "AAAA*AAA", "A", "AAAAA", "AA=A", "AAAA====", "AB==CD==",
    "ab+-cd_/", "ÄÖÜé", "data:image/png;base64", "data:image/png,iVBORw0KGgo",
    "data:text/plain;base64,AAAA", "data:image/png;base64,@@@@", "http:/missing-slash.png",
])
def test_garbage_is_invalid_base64(text):
    with pytest.raises(InvalidInput) as exc:
        read_image_bytes(text, LIMITS)
    assert _code(exc) == "invalid_base64"
    assert "base64" in exc.value.message and "http" in exc.value.message


def test_non_string_cell_is_invalid_base64():
    with pytest.raises(InvalidInput) as exc:
        read_image_bytes(b"AAAA", LIMITS)  # type: ignore[arg-type]
    assert _code(exc) == "invalid_base64"


def test_over_cap_base64_is_refused_before_decoding(monkeypatch):
    limits = ImageLimits(max_bytes=3000)
    at_cap = base64.b64encode(bytes(3000)).decode()
    assert read_image_bytes(at_cap, limits) == bytes(3000)
    assert read_image_bytes(base64.encodebytes(bytes(3000)).decode(), limits) == bytes(3000)

    def boom(*args, **kwargs):
        raise AssertionError("base64 was decoded although the encoded length is over the cap")

    monkeypatch.setattr(images.base64, "b64decode", boom)
    for text in (base64.b64encode(bytes(3003)).decode(), "A" * 50_000, "data:image/png;base64," + "A" * 4008):
        with pytest.raises(PayloadTooLarge) as exc:
            read_image_bytes(text, limits)
        assert _code(exc) == "image_too_large" and exc.value.status == 413


def test_url_cells_go_to_fetch(monkeypatch):
    calls = []
    monkeypatch.setattr(fetch, "fetch_url", lambda url, limits: calls.append(url) or b"img")
    assert read_image_bytes("  https://example.com/a.png\n", LIMITS) == b"img"
    assert read_image_bytes("HTTP://example.com/b.png", LIMITS) == b"img"
    assert calls == ["https://example.com/a.png", "HTTP://example.com/b.png"]


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x.png", "gopher://example.com/"])
def test_other_schemes_are_refused_not_read_as_base64(url):
    with pytest.raises(InvalidInput) as exc:
        read_image_bytes(url, LIMITS)
    assert _code(exc) == "url_not_allowed"
    assert "/etc" not in exc.value.message


# --- formats and modes -----------------------------------------------------------------------

QUAD_BOXES = {f.RED: (4, 4, 28, 20), f.GREEN: (36, 4, 60, 20), f.BLUE: (4, 28, 28, 44), f.YELLOW: (36, 28, 60, 44)}


@pytest.mark.parametrize("fmt,kwargs", [
    ("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"quality": 95}), ("WEBP", {"lossless": True}),
    ("GIF", {}), ("BMP", {}),
])
def test_each_allowed_format_decodes_to_rgb(fmt, kwargs):
    im = decode_image(f.encode(f.quadrants(), fmt, **kwargs), LIMITS)
    assert im.mode == "RGB" and im.size == (64, 48)
    for colour, box in QUAD_BOXES.items():
        assert f.close_to(f.mean_colour(im, box), colour), (fmt, colour)


def test_animated_gif_gives_its_first_frame():
    data = f.animated_gif((f.RED, f.GREEN, f.BLUE))
    assert Image.open(io.BytesIO(data)).n_frames == 3
    im = decode_image(data, LIMITS)
    assert im.mode == "RGB" and f.close_to(f.mean_colour(im, (0, 0, 16, 16)), f.RED, tol=2)


def test_animated_png_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in (f.BLUE, f.RED)]
    data = f.encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    assert f.close_to(f.mean_colour(decode_image(data, LIMITS), (0, 0, 8, 8)), f.BLUE, tol=2)


@pytest.mark.parametrize("mode,fmt", [("RGBA", "PNG"), ("LA", "PNG"), ("RGBA", "WEBP")])
def test_alpha_is_composited_on_white(mode, fmt):
    im = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    im.paste((0, 0, 255, 0), (10, 0, 20, 10))  # right half fully transparent
    data = f.encode(im.convert(mode), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    out = decode_image(data, LIMITS)
    assert out.mode == "RGB"
    left = (76, 76, 76) if mode == "LA" else f.RED  # red as grey: L = 0.299 * 255
    assert f.close_to(f.mean_colour(out, (0, 0, 10, 10)), left, tol=3)
    assert f.close_to(f.mean_colour(out, (10, 0, 20, 10)), f.WHITE, tol=1)


def test_palette_with_transparent_index_goes_white():
    im = Image.new("P", (10, 10), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(0, (5, 0, 10, 10))
    out = decode_image(f.encode(im, "PNG", transparency=0), LIMITS)
    assert f.close_to(f.mean_colour(out, (0, 0, 5, 10)), f.RED, tol=1)
    assert f.close_to(f.mean_colour(out, (5, 0, 10, 10)), f.WHITE, tol=1)


def test_sixteen_bit_grey_png_keeps_its_brightness():
    data = f.encode(Image.new("I;16", (8, 8), 40000), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    expected = 40000 / 65535 * 255
    assert f.close_to(f.mean_colour(decode_image(data, LIMITS), (0, 0, 8, 8)), (expected,) * 3, tol=3)


def test_cmyk_jpeg_comes_out_rgb():
    im = Image.new("CMYK", (32, 16), (0, 255, 255, 0))  # red in CMYK
    im.paste((255, 0, 0, 0), (16, 0, 32, 16))  # cyan
    out = decode_image(f.encode(im, "JPEG", quality=95), LIMITS)
    assert out.mode == "RGB"
    assert f.close_to(f.mean_colour(out, (2, 2, 14, 14)), f.RED)
    assert f.close_to(f.mean_colour(out, (18, 2, 30, 14)), (0, 255, 255))


def test_exif_orientation_is_applied():
    # Orientation 6: the stored image must be turned 90 degrees clockwise to display;
    # the stored left half (red) becomes the top, the right half (blue) the bottom.
    out = decode_image(f.exif_rotated_jpeg(6), LIMITS)
    assert out.size == (32, 64)
    assert f.close_to(f.mean_colour(out, (4, 4, 28, 28)), f.RED)
    assert f.close_to(f.mean_colour(out, (4, 36, 28, 60)), f.BLUE)


def test_draft_downscales_jpeg_but_not_below_the_requested_size():
    data = f.encode(f.quadrants((1600, 1200)), "JPEG", quality=90)
    assert decode_image(data, LIMITS).size == (1600, 1200)
    small = decode_image(data, LIMITS, draft=(224, 224))
    assert small.size == (400, 300)  # 1/4: 1/8 would be 200x150, under 224
    assert f.close_to(f.mean_colour(small, (20, 20, 180, 130)), f.RED)
    assert decode_image(data, LIMITS, draft=(1000, 1000)).size == (1600, 1200)
    png = f.encode(f.quadrants((800, 600)), "PNG")
    assert decode_image(png, LIMITS, draft=(100, 100)).size == (800, 600)  # JPEG only


def test_draft_respects_exif_rotation():
    im = Image.new("RGB", (1600, 800), f.RED)
    exif = Image.Exif()
    exif[0x0112] = 6
    # displayed 800x1600; asking for 390 wide means 390 *stored* rows: scale 1/2, not 1/4
    out = decode_image(f.encode(im, "JPEG", exif=exif), LIMITS, draft=(390, 150))
    assert out.size[0] >= 390 and out.size[1] >= 150 and out.size == (400, 800)


def test_bad_draft_is_a_caller_error():
    with pytest.raises(ValueError):
        decode_image(f.encode(f.quadrants(), "JPEG"), LIMITS, draft=(0, 10))


# --- refusals ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated_files_are_invalid_image(fmt, keep):
    data = f.encode(f.noisy((64, 64)), fmt)
    with pytest.raises(InvalidInput) as exc:
        decode_image(data[: int(len(data) * keep)], LIMITS)
    assert _code(exc) == "invalid_image"


def test_corrupt_and_empty_files_are_invalid_image():
    # Corruption inside entropy-coded data can decode to garbage pixels (no format can tell);
    # these are corruptions a decoder must notice: broken header checksum, broken markers.
    png = bytearray(f.encode(f.noisy(), "PNG"))
    png[29] ^= 0xFF  # IHDR CRC
    jpeg = bytearray(f.encode(f.noisy(), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5: sof + 9] = bytes(4)  # zero width and height in the frame header
    gif = bytearray(f.encode(f.noisy(), "GIF"))
    gif[f.gif_lzw_offset(bytes(gif))] = 0x0C  # impossible LZW code size
    for data in (bytes(png), bytes(jpeg), bytes(gif), b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff" + bytes(64)):
        with pytest.raises(InvalidInput) as exc:
            decode_image(data, LIMITS)
        assert _code(exc) == "invalid_image"


def test_formats_outside_the_allowlist_are_invalid_image(monkeypatch):
    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    tiff = f.encode(f.quadrants(), "TIFF")
    pdf = f.encode(f.quadrants(), "PDF")
    ico = f.encode(f.quadrants(), "ICO")
    Image.open(io.BytesIO(tiff)).load()  # Pillow itself would open it
    for data in (f.EPS, b"\xc5\xd0\xd3\xc6" + bytes(28) + f.EPS, tiff, pdf, ico, b"hello, world\n" * 10):
        with pytest.raises(InvalidInput) as exc:
            decode_image(data, LIMITS)
        assert _code(exc) == "invalid_image"
        assert "Pillow" not in exc.value.message and "cannot identify" not in exc.value.message
    assert calls == []


def test_byte_cap_applies_to_decoded_bytes():
    data = f.encode(f.noisy(), "PNG")
    with pytest.raises(PayloadTooLarge) as exc:
        decode_image(data, ImageLimits(max_bytes=len(data) - 1))
    assert _code(exc) == "image_too_large"
    decode_image(data, ImageLimits(max_bytes=len(data)))


def test_pixel_cap_is_checked_on_the_header():
    data = f.encode(f.quadrants((100, 100)), "PNG")
    decode_image(data, ImageLimits(max_pixels=10_000))
    with pytest.raises(PayloadTooLarge) as exc:
        decode_image(data, ImageLimits(max_pixels=9_999))
    assert _code(exc) == "image_too_large" and "100x100" in exc.value.message


BOMBS = {
    "png_header_huge": lambda: f.png_claiming(100_000, 100_000),
    "png_header_over_cap": lambda: f.png_claiming(7000, 7000),
    "gif_huge_screen": lambda: f.gif_with_screen(65535, 65535),
    "gif_screen_over_cap": lambda: f.gif_with_screen(8000, 8000),
    "compressible_png": f.compressible_png,
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_decompression_bombs_are_refused_quickly(name, monkeypatch):
    data = BOMBS[name]()
    assert len(data) < 400_000
    loads = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(1))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1))
    start = time.monotonic()
    with pytest.raises(PayloadTooLarge) as exc:
        decode_image(data, LIMITS)
    assert _code(exc) == "image_too_large"
    assert time.monotonic() - start < 1.0
    assert loads == []  # refused from the header, before any pixel was decoded


def test_decompression_bombs_stay_in_bounded_memory(tmp_path):
    paths = []
    for name, make in BOMBS.items():
        path = tmp_path / name
        path.write_bytes(make())
        paths.append(str(path))
    script = (
        "import json, resource, sys\n"
        "from blip2.images import decode_image\n"
        "from blip2.config import ImageLimits\n"
        "from blip2.errors import PayloadTooLarge\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "codes = []\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        decode_image(open(p, 'rb').read(), ImageLimits())\n"
        "        codes.append('decoded')\n"
        "    except PayloadTooLarge as e:\n"
        "        codes.append(e.code)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'codes': codes, 'grew_kb': after - before}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["codes"] == ["image_too_large"] * len(paths)
    assert result["grew_kb"] < 64 * 1024  # a decoded 8000x8000 bomb alone would be 64 MB+


# --- fuzzing: nothing but the two service errors ever escapes ---------------------------------

SEEDS = [f.encode(f.noisy((16, 16)), fmt) for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP")]
PREFIXES = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"GIF87a", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 "]


def _decode_or_service_error(data: bytes) -> None:
    try:
        decode_image(data, ImageLimits(max_pixels=1_000_000))
    except (InvalidInput, PayloadTooLarge):
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=512),
    st.tuples(st.sampled_from(PREFIXES), st.binary(max_size=512)).map(b"".join),
    st.tuples(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
              st.floats(0.05, 1.0)).map(lambda t: _mutate(*t)),
))
def test_fuzz_decode_only_raises_service_errors(data):
    _decode_or_service_error(data)


def _mutate(seed: bytes, flips, keep: float) -> bytes:
    out = bytearray(seed)
    for pos, value in flips:
        out[pos % len(out)] = value
    return bytes(out[: max(1, int(len(out) * keep))])


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=300), st.text(alphabet="ABCDEFabcdef0123456789+/-_=\n\r :", max_size=300),
                 st.just("data:image/png;base64,").flatmap(lambda p: st.text(max_size=100).map(p.__add__)),
                 st.sampled_from(["http://", "https://", "ftp://", "x://"]).flatmap(
                     lambda p: st.text(max_size=60).map(p.__add__))))
def test_fuzz_text_cells_only_raise_service_errors(text):
    loopback = [(2, ("127.0.0.1", 80))]
    with mock.patch.object(fetch, "resolve", lambda host, port: loopback):
        try:
            data = read_image_bytes(text, LIMITS)
        except (InvalidInput, PayloadTooLarge):
            return
    _decode_or_service_error(data)


class CountingSlots:
    """A semaphore stand-in that records how many holders it had at once."""

    def __init__(self, n):
        import threading

        self._sem, self._lock = threading.BoundedSemaphore(n), threading.Lock()
        self.holding = self.most = self.entered = 0

    def __enter__(self):
        self._sem.acquire()
        with self._lock:
            self.holding += 1
            self.entered += 1
            self.most = max(self.most, self.holding)
        time.sleep(0.05)  # long enough for the other threads to try

    def __exit__(self, *exc):
        with self._lock:
            self.holding -= 1
        self._sem.release()


def test_big_decodes_take_a_slot_and_small_ones_do_not():
    """Decodes over HEAVY_PIXELS (after JPEG draft scaling) run at most as many at once as the
    caller's slots; small images and drafted JPEGs do not wait for them."""
    from concurrent.futures import ThreadPoolExecutor

    from blip2.images import HEAVY_PIXELS, decode_image

    def png(w, h, mode="RGBA"):
        buf = io.BytesIO()
        Image.new(mode, (w, h), (10, 20, 30, 255) if mode == "RGBA" else (10, 20, 30)).save(buf, "PNG")
        return buf.getvalue()

    big = png(3000, 3000)  # 9 MP: a solid colour compresses to a few KB
    assert 3000 * 3000 > HEAVY_PIXELS
    limits = ImageLimits()
    slots = CountingSlots(1)
    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(lambda data: decode_image(data, limits, heavy=slots), [big] * 4))
    assert [im.size for im in out] == [(3000, 3000)] * 4 and all(im.mode == "RGB" for im in out)
    assert slots.entered == 4 and slots.most == 1
    small = CountingSlots(1)
    decode_image(png(800, 600), limits, heavy=small)
    jpeg = io.BytesIO()
    Image.new("RGB", (4032, 3024), (200, 10, 10)).save(jpeg, "JPEG")
    drafted = decode_image(jpeg.getvalue(), limits, draft=(336, 336), heavy=small)
    assert drafted.size == (504, 378) and small.entered == 0
