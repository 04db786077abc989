"""The demo model served by the real azmlinfsrv answers about what is in the picture.

These tests check meaning, not shape: a swapped channel order, a wrong
normalisation, a lost alpha channel or a row paired with the wrong image fails them.
"""

from __future__ import annotations

import base64
import io
import random

import pytest
from PIL import Image

from blip2.demo_eval import evaluate
from blip2.shapes import QUESTIONS, expected, make_image
from serverproc import Server
from support import b64

COLOR, SHAPE, CAPTION = QUESTIONS["color"], QUESTIONS["shape"], QUESTIONS["caption"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    srv = Server("demo", tmp_path_factory.mktemp("demo") / "azmlinfsrv.log", extra_env={
        "BLIP2_MAX_BATCH_SIZE": "16",
        "BLIP2_DTYPE": "bfloat16",  # the CPU default where bf16 is native; answers must keep their meaning
    })
    yield srv
    srv.stop()


def ask(server, rows, parameters=None):
    body = {"input_data": {"columns": ["image", "text"], "index": list(range(len(rows))), "data": [list(r) for r in rows]}}
    if parameters:
        body["parameters"] = parameters
    r = server.score(body)
    assert r.status_code == 200, r.text
    return [a["text"] for a in r.json()]


def encoded(image: Image.Image, fmt="PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def shape(color, kind, size=(200, 160), seed=0):
    return make_image(color, kind, size=size, rng=random.Random(seed))


def test_logs_say_it_is_a_toy(demo):
    assert "DEMO model" in demo.log() and "not BLIP-2" in demo.log()


@pytest.mark.parametrize("seed", [20261204, 7])  # a fixed seed and a second, unseen one
def test_accuracy_on_fresh_images_through_http(demo, seed):
    def answer_fn(pairs):
        return ask(demo, [(base64.encodebytes(data).decode(), prompt) for data, prompt in pairs])

    scores = evaluate(answer_fn, n=30, seed=seed)
    assert scores["color"] >= 0.98 and scores["shape"] >= 0.90 and scores["caption"] >= 0.85, scores


def test_red_circle_as_url_and_as_base64(demo, image_host):
    data = encoded(shape("red", "circle", seed=1))
    url = image_host.add("/red-circle.png", data)
    assert ask(demo, [(url, COLOR), (b64(data), COLOR), (url, SHAPE), (b64(data), CAPTION)]) == ["red", "red", "circle", "a red circle"]


def test_png_with_alpha_is_composited_on_white(demo):
    rgba = Image.new("RGBA", (180, 180), (0, 0, 0, 0))  # fully transparent black
    rgba.paste(shape("red", "circle", size=(180, 180), seed=2).convert("RGBA"), (0, 0))
    # knock the background out to transparency: only the shape stays opaque
    pixels = rgba.load()
    for y in range(180):
        for x in range(180):
            r, g, b, _ = pixels[x, y]
            if min(r, g, b) > 150:
                pixels[x, y] = (0, 0, 0, 0)
    assert ask(demo, [(b64(encoded(rgba)), CAPTION)]) == ["a red circle"]


def test_exif_rotated_jpeg(demo):
    image = shape("red", "circle", size=(240, 160), seed=3).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 8  # stored rotated; viewers turn it back
    data = encoded(image, "JPEG", quality=90, exif=exif.tobytes())
    assert ask(demo, [(b64(data), CAPTION), (b64(data), SHAPE)]) == ["a red circle", "circle"]


def test_each_row_is_answered_about_its_own_image(demo):
    pictures = [("blue", "square"), ("red", "circle"), ("green", "triangle"), ("yellow", "square"), ("purple", "circle")]
    rows = [(b64(encoded(shape(c, s, seed=10 + i))), CAPTION) for i, (c, s) in enumerate(pictures)]
    assert ask(demo, rows) == [f"a {c} {s}" for c, s in pictures]
    # and the same images with mixed questions, reversed
    mixed = [(rows[i][0], q) for i, q in zip(range(4, -1, -1), (COLOR, SHAPE, CAPTION, COLOR, SHAPE))]
    assert ask(demo, mixed) == ["purple", "square", "a green triangle", "red", "square"]


def test_big_photo_gives_the_same_answer_as_a_small_one(demo):
    small = encoded(shape("orange", "triangle", size=(160, 120), seed=5))
    big = encoded(shape("orange", "triangle", size=(4032, 3024), seed=5), "JPEG", quality=70)
    assert ask(demo, [(b64(small), CAPTION), (b64(big), CAPTION)]) == [expected("caption", "orange", "triangle")] * 2


def test_concurrent_one_row_requests_each_get_their_own_answer(demo):
    """16 clients at once (the batcher groups their rows), bf16: every answer is about its own picture."""
    from concurrent.futures import ThreadPoolExecutor

    colors, kinds = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle", "circle"]
    cases = [(colors[i % 4], kinds[(i // 4) % 4], 40 + i) for i in range(16)]
    rows = [[(b64(encoded(shape(c, s, seed=seed))), CAPTION)] for c, s, seed in cases]
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda r: ask(demo, r), rows))
    assert answers == [[f"a {c} {s}"] for c, s, _ in cases]
