"""End to end: POST to a real azmlinfsrv serving score.py with the tiny model."""

from __future__ import annotations

import base64
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from serverproc import Server
from support import b64, picture


def body(rows, parameters=None, columns=("image", "text")):
    payload = {"input_data": {"columns": list(columns), "index": list(range(len(rows))), "data": [list(r) for r in rows]}}
    if parameters is not None:
        payload["parameters"] = parameters
    return payload


def test_liveness(server):
    assert requests.get(server.url + "/", timeout=5).status_code == 200


def test_sample_request_shape_with_base64_and_url(server, image_host):
    red, blue = picture((220, 30, 30), seed=1), picture((30, 40, 220), size=(120, 90), seed=2)
    url = image_host.add("/blue.png", blue)
    rows = [(b64(red), "What is in the picture? Answer: "), (url, "what are people doing? Answer: ")]
    r = server.score(body(rows))
    assert r.status_code == 200, r.text
    answers = r.json()
    assert isinstance(answers, list) and len(answers) == 2
    assert all(set(a) == {"text"} and isinstance(a["text"], str) for a in answers)
    # the same picture as URL or as base64 gives the same answer, in the same position
    swapped = server.score(body([(url, rows[1][1]), (b64(red), rows[0][1])])).json()
    assert swapped == answers[::-1]
    as_b64 = server.score(body([(b64(blue), rows[1][1])])).json()
    assert as_b64 == [answers[1]]


def test_records_form_columns_in_any_order_and_captioning(server):
    img = picture(seed=3)
    split = server.score(body([("Question: what is it? Answer:", b64(img))], columns=("text", "image")))
    records = server.score({"input_data": [{"image": b64(img), "text": "Question: what is it? Answer:"}]})
    assert split.status_code == records.status_code == 200
    assert split.json() == records.json()
    caption = server.score(body([(b64(img),)], columns=("image",)))
    empty = server.score(body([(b64(img), "   ")]))
    assert caption.status_code == 200 and caption.json() == empty.json()


def test_parameters_change_the_answer_length(server):
    rows = [(b64(picture(seed=s)), p) for s in range(3) for p in ("", "Question: what color is the shape? Answer:", "hi")]
    short = server.score(body(rows, {"max_new_tokens": 2}))
    longer = server.score(body(rows, {"max_new_tokens": 10, "min_new_tokens": 10}))
    assert short.status_code == longer.status_code == 200, short.text
    pairs = [(s["text"], l["text"]) for s, l in zip(short.json(), longer.json())]
    # greedy: the longer answer continues the shorter one, and is longer for some rows
    assert all(l.startswith(s) for s, l in pairs)
    assert any(len(l) > len(s) for s, l in pairs)


@pytest.mark.parametrize(
    "payload,status,code,row",
    [
        (b"{not json", 400, "invalid_json", None),
        (b"\xff\xfe\x00garbage", 400, "invalid_json", None),
        ({"inputs": []}, 400, "missing_input_data", None),
        ({"input_data": {"columns": ["text"], "data": [["hi"]]}}, 400, "invalid_columns", None),
        ({"input_data": {"columns": ["image", "text"], "data": [["x", "y", "z"]]}}, 400, "invalid_row", 0),
        ({"input_data": {"columns": ["image", "text"], "data": []}}, 400, "empty_input", None),
        (body([("aGVsbG8=", 5)]), 400, "invalid_text", 0),
        (body([("aGVsbG8=", "q")], {"max_new_tokens": 0}), 400, "invalid_parameter", None),
        (body([("aGVsbG8=", "q")], {"temperature": "hot"}), 400, "invalid_parameter", None),
        (body([("aGVsbG8=", "q")], {"beam_size": 2}), 400, "invalid_parameter", None),
        (body([("aGVsbG8=", "q")] * 65), 413, "too_many_rows", None),
    ],
)
def test_client_mistakes_get_4xx_json(server, payload, status, code, row):
    r = server.score(payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["row"] == row
    assert len(err["message"]) > 20


def test_bad_image_rows_are_named(server, image_host):
    good = b64(picture(seed=5))
    cases = [
        (base64.b64encode(b"this is not an image at all").decode(), "invalid_image"),
        ("%%%not base64%%%", "invalid_base64"),
        (image_host.url("/missing.png"), "url_fetch_failed"),
        (image_host.add("/page.html", b"<html></html>", "text/html"), "url_fetch_failed"),
    ]
    for bad, code in cases:
        r = server.score(body([(good, "q"), (bad, "q")]))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == code
        assert r.json()["error"]["row"] == 1


def test_other_methods_and_server_keeps_serving(server):
    r = requests.get(server.url + "/score", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    ok = server.score(body([(b64(picture(seed=6)), "q")]))
    assert ok.status_code == 200 and len(ok.json()) == 1
    assert "Traceback" not in server.log()


def test_concurrent_requests_equal_sequential_answers(server):
    images = [b64(picture((30 * i, 100, 255 - 30 * i), seed=i)) for i in range(8)]
    prompts = ["", "Question: what is it? Answer:", "hello there", "Question: what color is the shape? Answer:"]
    payloads = [body([(images[i], prompts[i % len(prompts)])]) for i in range(8)]
    sequential = [server.score(p).json() for p in payloads]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda p: server.score(p).json(), payloads * 2))
    assert concurrent == sequential * 2


def test_two_workers_each_load_the_model_and_answer_like_one(server, tiny_model_dir, tmp_path):
    """WORKER_COUNT=2 (two model copies, for when one process's request path is what limits):
    each gunicorn worker forks its own model thread and batcher, and answers as the single worker does."""
    images = [b64(picture((40 * i, 90, 250 - 40 * i), seed=20 + i)) for i in range(6)]
    prompts = ["", "Question: what is it? Answer:", "hello there"]
    payloads = [body([(images[i], prompts[i % 3]), (images[(i + 1) % 6], prompts[(i + 1) % 3])]) for i in range(6)]
    expected = [server.score(p).json() for p in payloads]
    assert len({str(answer) for answer in expected}) > 1  # the rows' answers differ, so a mix-up would show
    two = Server(tiny_model_dir, tmp_path / "azmlinfsrv.log", extra_env={"WORKER_COUNT": "2"})
    try:
        deadline = time.monotonic() + 120
        ready = lambda: set(re.findall(r"\[(\d+)\] azmlinfsrv - Worker with pid \d+ ready", two.log()))  # noqa: E731
        while len(ready()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(ready()) == 2 and two.log().count("Ready to serve /score") == 2
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda p: two.score(p).json(), payloads * 4))
        assert answers == expected * 4
        assert "Traceback" not in two.log()
    finally:
        two.stop()


def test_a_prompt_naming_the_image_token_is_refused_and_spares_its_batch(server):
    """``<image>`` in a prompt would tokenize to the model's image placeholder: one slot more than
    the image has embeddings, which fails the whole model batch (and on CUDA may misplace the
    other rows' images). It is the client's mistake: 400 for that row, the others unharmed."""
    good = body([(b64(picture(seed=31)), "Question: what is it? Answer:")])
    alone = server.score(good).json()
    bad = body([(b64(picture(seed=32)), "hi"), (b64(picture(seed=33)), "Question: <image> what is it? Answer:")])
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(server.score, [bad, good, bad, good]))
    for r in answers[0::2]:
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "invalid_text" and error["row"] == 1 and "<image>" in error["message"]
    assert [r.json() for r in answers[1::2]] == [alone, alone]
    assert "Traceback" not in server.log()


def test_chunked_bodies_are_read_and_bounded(server, tiny_model_dir, tmp_path):
    """A body sent with Transfer-Encoding: chunked declares no length: it is answered like any other
    within the limit, and over the limit it gets 413 once limit + 1 bytes are in (a small-limit server)."""
    import json

    payload = json.dumps(body([(b64(picture(seed=41)), "Question: what is it? Answer:")])).encode()
    pieces = lambda data: (data[i : i + 1000] for i in range(0, len(data), 1000))  # noqa: E731 - a generator: chunked
    chunked = requests.post(server.url + "/score", data=pieces(payload), timeout=60)
    assert chunked.request.headers.get("Transfer-Encoding") == "chunked"
    assert chunked.status_code == 200 and chunked.json() == server.score(payload).json()

    small = Server(tiny_model_dir, tmp_path / "azmlinfsrv.log", extra_env={"BLIP2_MAX_BODY_MB": "1", "BLIP2_WARMUP": "0"})
    try:
        padded = payload[:-1] + b" " * (1536 * 1024) + payload[-1:]  # valid JSON, 1.5 MB
        over = requests.post(small.url + "/score", data=pieces(padded), timeout=60)
        assert over.status_code == 413 and over.json()["error"]["code"] == "body_too_large"
        assert small.score(payload).status_code == 200  # and the server carries on
    finally:
        small.stop()
