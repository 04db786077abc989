"""The service's side of micro-batching: announcements, and what the batcher may wait for."""

from __future__ import annotations

import json
import threading
import time

import pytest

import blip2.service as service_module
from blip2.config import Settings
from blip2.params import GenerationParams
from blip2.payload import Row, ScoreRequest
from blip2.service import Service
from support import b64, picture


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    settings = Settings.from_env({
        "BLIP2_MODEL": str(tiny_model_dir), "BLIP2_WARMUP": "0", "BLIP2_DTYPE": "float32",
        "BLIP2_BATCH_WAIT_MS": "5", "BLIP2_BATCH_MAX_WAIT_MS": "3000",  # a long cap, so waiting would show
    })
    svc = Service.from_settings(settings)
    yield svc
    svc.close()


def test_a_slow_url_fetch_does_not_hold_other_requests(service, monkeypatch):
    release, fetching = threading.Event(), threading.Event()
    image = picture(seed=5)
    real = service_module.read_image_bytes

    def slow_fetch(ref, limits):
        if ref.startswith("https://"):
            fetching.set()
            release.wait(10)
            return image
        return real(ref, limits)

    monkeypatch.setattr(service_module, "read_image_bytes", slow_fetch)
    params = GenerationParams(max_new_tokens=3)
    out = {}
    slow = threading.Thread(target=lambda: out.setdefault("url", service.score(
        ScoreRequest((Row(0, "https://images.example.com/cat.png", "hi"),), params))))
    slow.start()
    assert fetching.wait(5)
    assert service.batcher.arriving() == 0  # not counted while its bytes are on their way
    started = time.monotonic()
    fast = service.score(ScoreRequest((Row(0, b64(picture(seed=6)), "hi"),), params))
    assert time.monotonic() - started < 1.5  # far below the 3 s cap it would otherwise wait for
    release.set()
    slow.join(10)
    assert isinstance(fast[0], str) and isinstance(out["url"][0], str)
    assert service.batcher.arriving() == 0


def test_requests_arriving_together_share_one_batch(service, monkeypatch):
    """Eight requests arriving 10 ms apart, each 40 ms decoding its image, become one model batch.

    With only the 5 ms quiet window, the first would run alone: the next is queued 10 ms later.
    """
    real = service_module.decode_image
    monkeypatch.setattr(service_module, "decode_image", lambda *a, **k: time.sleep(0.04) or real(*a, **k))
    before = service.batcher.batches_run
    images = [b64(picture(seed=40 + i)) for i in range(8)]
    answers = {}

    def client(i):
        time.sleep(0.01 * i)
        answers[i] = service.score_body(json.dumps({
            "input_data": {"columns": ["image", "text"], "index": [0], "data": [[images[i], "hi"]]},
            "parameters": {"max_new_tokens": 3},
        }))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(answers) == 8 and all(isinstance(a[0]["text"], str) for a in answers.values())
    assert service.batcher.batches_run - before == 1
    assert service.batcher.arriving() == 0


def test_loading_warm_up_and_batches_all_run_on_the_model_thread(tiny_model_dir, monkeypatch):
    from blip2 import model as model_loader
    from blip2.engine import Engine

    names = []
    real_load, real_batch = model_loader.load, Engine._generate_batch
    monkeypatch.setattr(model_loader, "load", lambda s: names.append(("load", threading.current_thread().name)) or real_load(s))

    def batch(self, items, params):
        names.append(("batch", threading.current_thread().name))
        return real_batch(self, items, params)

    monkeypatch.setattr(Engine, "_generate_batch", batch)
    svc = Service.from_settings(Settings.from_env({"BLIP2_MODEL": str(tiny_model_dir), "BLIP2_MAX_BATCH_SIZE": "2", "BLIP2_DTYPE": "float32"}))
    try:
        svc.score(ScoreRequest((Row(0, b64(picture(seed=77)), "a"),), GenerationParams(max_new_tokens=2)))
    finally:
        svc.close()
    assert [kind for kind, _ in names] == ["load", "batch", "batch"]  # load, warm-up, the request
    assert all(name.startswith("blip2-model") for _, name in names)


def test_a_bad_row_fails_its_request_before_the_model_runs(service, monkeypatch):
    """``score`` (the online path) answers a client's mistake with its 4xx at once: the good rows
    of that request are not run, so a model batch's fate cannot replace the 400 with a 504 or 500."""
    ran = []
    real = service.batcher.run_batch
    monkeypatch.setattr(service.batcher, "run_batch", lambda items, params: ran.append(len(items)) or real(items, params))
    rows = (Row(0, b64(picture(seed=7)), "hi"), Row(1, "bm90IGFuIGltYWdl", "hi"), Row(2, b64(picture(seed=8)), "hi"))
    with pytest.raises(service_module.ServiceError) as refused:
        service.score(ScoreRequest(rows, GenerationParams(max_new_tokens=3)))
    assert refused.value.status == 400 and refused.value.row == 1 and ran == []
    # the batch paths keep every row's own outcome
    results = service.score_rows(rows, GenerationParams(max_new_tokens=3))
    assert isinstance(results[0], str) and isinstance(results[1], service_module.ServiceError)
    assert isinstance(results[2], str) and ran == [2]


def test_slow_url_fetches_end_at_the_deadline_and_do_not_hold_up_decoding(tiny_model_dir, monkeypatch):
    """Fetching counts against the request's deadline: many slow URLs end in a 504 when it passes,
    not after every fetch has had its own timeout, and each fetch is given no more time than is left.
    Meanwhile another request's base64 rows are decoded at once (fetches have their own threads)."""
    svc = Service.from_settings(Settings.from_env({
        "BLIP2_MODEL": str(tiny_model_dir), "BLIP2_DTYPE": "float32",  # warmed up: no cold start in the timing
        "BLIP2_REQUEST_TIMEOUT_S": "1.5", "BLIP2_PREPROCESS_THREADS": "1",
    }))
    real, given = service_module.read_image_bytes, []

    def slow_fetch(ref, limits):
        if ref.startswith("https://"):
            given.append(limits.total_timeout_s)
            time.sleep(min(limits.total_timeout_s, 1.0))
            raise service_module.InvalidInput("too slow", code="url_timeout")
        return real(ref, limits)

    monkeypatch.setattr(service_module, "read_image_bytes", slow_fetch)
    params = GenerationParams(max_new_tokens=3)
    urls = tuple(Row(i, f"https://images.example.com/{i}.png", "hi") for i in range(12))
    outcome = {}

    def send_urls():
        started = time.monotonic()
        try:
            svc.score(ScoreRequest(urls, params))
        except service_module.ServiceError as err:
            outcome["error"], outcome["took"] = err, time.monotonic() - started

    try:
        slow = threading.Thread(target=send_urls)
        slow.start()
        time.sleep(0.2)
        started = time.monotonic()
        fast = svc.score(ScoreRequest((Row(0, b64(picture(seed=9)), "hi"), Row(1, b64(picture(seed=10)), "hi")), params))
        fast_took = time.monotonic() - started
        slow.join(10)
    finally:
        svc.close()
    assert all(isinstance(a, str) for a in fast) and fast_took < 1.4  # well before the URL request's 1.5 s deadline
    assert outcome["error"].status == 504 and outcome["error"].code == "deadline_exceeded"
    assert 1.4 < outcome["took"] < 2.5  # 12 fetches of 1 s on 4 threads would take 3 s
    assert given and max(given) <= 1.5 and min(given) < 1.0  # later fetches got only what was left


def test_the_stats_line_counts_batches_and_reused_embeddings(tiny_model_dir, caplog):
    svc = Service.from_settings(Settings.from_env({
        "BLIP2_MODEL": str(tiny_model_dir), "BLIP2_DTYPE": "float32", "BLIP2_STATS_INTERVAL_S": "0.001",
    }))  # warm-up on: its dummy batch must not be counted
    image = b64(picture(seed=50))
    params = GenerationParams(max_new_tokens=2)
    try:
        with caplog.at_level("INFO", logger="blip2.stats"):
            svc.score(ScoreRequest(tuple(Row(i, image, q) for i, q in enumerate(["a", "b", "c"])), params))
            svc.score(ScoreRequest((Row(0, image, "d"), Row(1, b64(picture(seed=51)), "e")), params))
    finally:
        svc.close()
    lines = [m for m in caplog.messages if m.startswith("last ")]
    assert len(lines) == 2
    assert "1 requests, 3 rows in 1 batches" in lines[0] and "1 images embedded, 2 rows reused" in lines[0]
    assert "1 requests, 2 rows in 1 batches" in lines[1] and "1 images embedded, 1 rows reused" in lines[1]


def test_a_prompt_and_answer_over_the_models_positions_is_a_413_not_a_crash(service):
    """Image tokens + prompt + max_new_tokens past the language model's position table would index
    out of range (on CUDA a device-side assert that breaks every later batch): refused per row."""
    limit = service.engine.max_positions
    long_prompt = "a " * 240
    n_prompt = len(service.engine.tokenize([long_prompt.strip()])[0])
    params = GenerationParams(max_new_tokens=256, min_new_tokens=256)
    assert service.engine.num_query_tokens + n_prompt + 256 > limit >= service.engine.num_query_tokens + 2 + 256
    rows = (Row(0, b64(picture(seed=80)), "hi"), Row(1, b64(picture(seed=81)), long_prompt.strip()))
    results = service.score_rows(rows, params)
    assert isinstance(results[0], str)
    error = results[1]
    assert isinstance(error, service_module.ServiceError) and error.status == 413 and error.code == "prompt_too_long"
    assert error.row == 1 and f"{limit} positions" in error.message
    assert isinstance(service.score_rows(rows, GenerationParams(max_new_tokens=8))[1], str)  # fits with a shorter answer
