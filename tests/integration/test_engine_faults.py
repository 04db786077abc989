"""The engine under faults: CUDA out-of-memory splits the batch instead of failing it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, Blip2ForConditionalGeneration

from blip2.engine import Engine, GenItem, RowTooLarge
from blip2.params import GenerationParams
from blip2.preprocess import Preprocessor
from blip2.images import decode_image
from blip2.config import ImageLimits
from support import picture


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    processor.tokenizer.padding_side = "left"
    return Engine(model, processor, device="cpu", dtype=torch.float32, max_batch_size=8)


def items(engine, n):
    pre = Preprocessor.from_processor(engine.processor)
    prompts = ["", "Question: what is it? Answer:", "a much longer prompt about the picture", "hi"]
    return [
        GenItem(key=f"img{i}", pixels=pre(decode_image(picture(seed=i), ImageLimits())), prompt=prompts[i % 4])
        for i in range(n)
    ]


def test_oom_splits_the_batch_and_keeps_every_answer(engine, monkeypatch, caplog):
    rows = items(engine, 7)
    params = GenerationParams(max_new_tokens=6)
    want = engine.generate(rows, params)
    real = engine._generate_batch
    sizes = []

    def flaky(batch, p):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(batch, p)

    monkeypatch.setattr(engine, "_generate_batch", flaky)
    assert engine.generate(rows, params) == want
    assert sizes[0] == 7 and max(s for s in sizes[1:]) <= 4 and "Out of memory" in caplog.text


def test_a_row_that_never_fits_gets_its_own_error(engine, monkeypatch):
    def always_oom(batch, p):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(engine, "_generate_batch", always_oom)
    with pytest.raises(RowTooLarge) as info:
        engine.generate(items(engine, 1), GenerationParams(max_new_tokens=2))
    assert info.value.status == 503 and "simulated" not in info.value.message


def test_uint8_pixels_give_the_same_answers_as_normalised_ones(engine):
    pre = Preprocessor.from_processor(engine.processor)
    images = [decode_image(picture(seed=i), ImageLimits()) for i in range(3)]
    params = GenerationParams(max_new_tokens=6)
    as_float = [GenItem(key=f"f{i}", pixels=pre(im), prompt="hi") for i, im in enumerate(images)]
    as_uint8 = [GenItem(key=f"u{i}", pixels=pre.resize(im), prompt="hi") for i, im in enumerate(images)]
    mixed = [as_uint8[0], as_float[1], as_uint8[2]]
    want = engine.generate(as_float, params)
    assert engine.generate(as_uint8, params) == want
    assert engine.generate(mixed, params) == want


def test_a_prompt_with_the_image_token_is_refused_before_the_model_runs(engine, monkeypatch):
    """The engine's own guard (the service refuses such prompts first): a row with more image
    placeholders than the image has embeddings must not reach ``masked_scatter``."""
    from blip2.errors import InvalidInput

    rows = items(engine, 2)
    rows[1].prompt = "what is <image> here?"
    ran = []
    monkeypatch.setattr(engine, "embed_images", lambda pixels: ran.append(pixels) or None)
    with pytest.raises(InvalidInput) as refused:
        engine.generate(rows, GenerationParams(max_new_tokens=2))
    assert refused.value.status == 400 and refused.value.code == "invalid_text" and not ran
