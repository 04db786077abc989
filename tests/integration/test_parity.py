"""The service's answers equal transformers' own generate, one row at a time.

This is what proves left padding, the image tokens, prompt stripping and the
slicing of the prompt off the output, for batches of mixed prompt lengths.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Blip2ForConditionalGeneration

from blip2.config import Settings
from blip2.params import GenerationParams
from blip2.payload import Row, ScoreRequest
from blip2.service import Service
from support import b64, picture

PROMPTS = [
    "",
    "Question: what color is the shape? Answer: ",
    "  What is in the picture? Answer:",
    "Question: how many people are sitting at the long wooden table near the window? Answer:",
    "x",
    "Question: what shape is this? Answer:",
]


def reference_answers(model_dir, images: list[bytes], prompts: list[str], max_new_tokens: int) -> list[str]:
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    answers = []
    for data, prompt in zip(images, prompts):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        inputs = processor(images=image, text=prompt.strip(), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens)
        new = out[0, inputs["input_ids"].shape[1] :]
        answers.append(processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    settings = Settings.from_env({
        "BLIP2_MODEL": str(tiny_model_dir), "BLIP2_MAX_BATCH_SIZE": "4", "BLIP2_WARMUP": "0",
        "BLIP2_DTYPE": "float32",  # the reference is transformers in fp32
    })
    svc = Service.from_settings(settings)
    yield svc
    svc.close()


@pytest.mark.parametrize("max_new_tokens", [1, 12])
def test_batched_answers_equal_one_row_generate(service, tiny_model_dir, max_new_tokens):
    images = [picture(color=(40 * i, 200 - 30 * i, 90), size=(80 + 16 * i, 64 + 8 * i), seed=i) for i in range(len(PROMPTS))]
    rows = tuple(Row(i, b64(img), p.strip()) for i, (img, p) in enumerate(zip(images, PROMPTS)))
    got = service.score(ScoreRequest(rows, GenerationParams(max_new_tokens=max_new_tokens)))
    want = reference_answers(tiny_model_dir, images, PROMPTS, max_new_tokens)
    assert got == want
    # the rows really differ, so a row paired with the wrong image or prompt would show
    assert len(set(want)) > 1


def test_repeated_image_uses_cache_and_keeps_answers(service, tiny_model_dir):
    image = picture(seed=7)
    prompts = PROMPTS[1:4]
    rows = tuple(Row(i, b64(image), p.strip()) for i, p in enumerate(prompts))
    cache = service.engine.cache
    hits_before = cache.hits
    first = service.score(ScoreRequest(rows, GenerationParams(max_new_tokens=8)))
    second = service.score(ScoreRequest(rows, GenerationParams(max_new_tokens=8)))
    assert first == second == reference_answers(tiny_model_dir, [image] * 3, prompts, 8)
    assert cache.hits > hits_before


def test_static_kv_cache_gives_the_same_greedy_answers(service, tiny_model_dir):
    from blip2.engine import Engine

    static = Engine(
        service.engine.model, service.engine.processor, device="cpu", dtype=torch.float32,
        max_batch_size=4, static_cache=True,
    )
    images = [picture(seed=20 + i) for i in range(len(PROMPTS))]
    items = service._prepare_rows([Row(i, b64(img), p.strip()) for i, (img, p) in enumerate(zip(images, PROMPTS))])
    params = GenerationParams(max_new_tokens=10)
    assert static.generate(items, params) == service.engine.generate(items, params)
    assert static._cache_kwargs and not service.engine._cache_kwargs


def test_an_image_repeated_in_one_request_is_decoded_once(service, tiny_model_dir, monkeypatch):
    import blip2.service as service_module

    decoded = []
    real = service_module.decode_image
    monkeypatch.setattr(service_module, "decode_image", lambda data, *a, **k: decoded.append(data) or real(data, *a, **k))
    image, other = picture(seed=901), picture(seed=902)  # seeds no other test uses: not in the cache
    prompts = PROMPTS[1:5]
    rows = tuple(Row(i, b64(img), p.strip()) for i, (img, p) in enumerate(zip([image, other, image, image], prompts)))
    got = service.score(ScoreRequest(rows, GenerationParams(max_new_tokens=6)))
    assert sorted(decoded) == sorted([image, other])
    assert got == reference_answers(tiny_model_dir, [image, other, image, image], prompts, 6)
    assert service.batcher.arriving() == 0


def test_a_bad_image_repeated_in_rows_fails_each_row_with_its_own_index(service):
    bad = b64(b"this is not an image at all")
    rows = (Row(0, bad, "a"), Row(1, b64(picture(seed=3)), "b"), Row(2, bad, "c"))
    results = service.score_rows(rows, GenerationParams(max_new_tokens=3))
    assert [getattr(r, "row", None) for r in results] == [0, None, 2]
    assert results[0].code == results[2].code == "invalid_image" and isinstance(results[1], str)
    assert service.batcher.arriving() == 0


def test_bodies_that_fail_to_parse_are_not_left_announced(service):
    from blip2.errors import ServiceError

    for raw in (b"{not json", b'{"input_data": {"columns": ["image", "text"], "index": [0], "data": [[1]]}}'):
        with pytest.raises(ServiceError):
            service.score_body(raw)
    assert service.batcher.arriving() == 0
