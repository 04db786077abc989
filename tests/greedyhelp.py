"""Engines and batches for the tests of the greedy loop and its decode steps (test_greedy, test_stepgraphs)."""

from __future__ import annotations

import random

import torch

from blip2 import shapes
from blip2.config import Settings
from blip2.engine import Engine, GenItem
from blip2.greedy import GreedyDecoder
from blip2.model import load

PROMPTS = [
    "",
    "Question: what color is the shape? Answer:",
    "x",
    "Question: how many people are sitting at the long wooden table near the window? Answer:",
    "Question: what shape is this? Answer:",
]


def make_engine(model_dir, dtype: str | None = None, **kwargs) -> Engine:
    loaded = load(Settings.from_env({"BLIP2_MODEL": str(model_dir), **({"BLIP2_DTYPE": dtype} if dtype else {})}))
    return Engine(loaded.model, loaded.processor, device=loaded.device, dtype=loaded.dtype, max_batch_size=8, **kwargs)


def items_for(engine: Engine, images, prompts) -> list[GenItem]:
    pixels = engine.preprocess(images)
    return [GenItem(key=f"img-{i}", pixels=pixels[i], prompt=p) for i, p in enumerate(prompts)]


def tiny_items(engine: Engine) -> list[GenItem]:
    rng = random.Random(3)
    images = [shapes.sample(rng, (120, 90))[0] for _ in PROMPTS]
    return items_for(engine, images, PROMPTS)


def both(engine: Engine, items, max_new_tokens: int, min_new_tokens: int = 0, eos=None):
    """(generate's new tokens, the loop's new tokens), trailing all-pad columns dropped from both."""
    lm = engine.model.language_model
    with torch.inference_mode():
        input_ids, mask, embeds = engine.lm_inputs(items)
        extra = {} if eos is None else {"eos_token_id": eos}
        out = lm.generate(
            inputs_embeds=embeds, attention_mask=mask, input_ids=input_ids, pad_token_id=engine.pad_id,
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False, num_beams=1, **extra,
        )
        decoder = engine.greedy
        if eos is not None:
            decoder = GreedyDecoder(lm, engine.pad_id)
            decoder.eos = torch.tensor([eos])
        mine = decoder(embeds, mask, max_new_tokens, min_new_tokens)
    return strip_pad(out[:, input_ids.shape[1]:], engine.pad_id), strip_pad(mine, engine.pad_id)


def strip_pad(tokens: torch.Tensor, pad: int) -> list[list[int]]:
    rows = tokens.tolist()
    width = len(rows[0])
    while width and all(row[width - 1] == pad for row in rows):
        width -= 1
    return [row[:width] for row in rows]


def count_model_calls(lm, monkeypatch) -> list:
    """Record each forward call of the language model (the prefill and any step that goes through it)."""
    calls = []
    real = lm.forward
    monkeypatch.setattr(lm, "forward", lambda *a, **k: calls.append(k.get("input_ids") is None) or real(*a, **k))
    return calls
