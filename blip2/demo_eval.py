"""How well a model answers the synthetic shape questions (``blip2.shapes``).

``evaluate`` draws fresh images, encodes them as a client would send them (small PNGs,
JPEGs at quality 70, 2000-pixel-wide photos), asks colour, shape and caption, and
returns the fraction answered right. It knows nothing of how answers are produced: the
caller passes ``answer_fn``, e.g. one that POSTs to a running endpoint, or
``transformers_answer_fn(model_dir)`` which calls plain transformers.

No torch or transformers import at module level.
"""

from __future__ import annotations

import io
import random
from typing import Callable, Sequence

from . import shapes

AnswerFn = Callable[[list[tuple[bytes, str]]], list[str]]

# (format, smallest width, largest width): image i uses sizes[i % len(sizes)]; its height is
# width * a random factor in ASPECTS (landscape and portrait), its format PNG or JPEG.
DEFAULT_SIZES: tuple[tuple[str, int, int], ...] = (
    ("PNG", 48, 400),  # small PNGs
    ("JPEG", 160, 1200),  # JPEGs at jpeg_quality
    ("JPEG", 2000, 2000),  # 2000-pixel-wide photos at jpeg_quality
)
ASPECTS = (0.5, 1.5)  # height / width


def make_cases(n: int, seed: int, sizes: Sequence[tuple[str, int, int]] = DEFAULT_SIZES, jpeg_quality: int = 70):
    """Encoded test cases: list of (image bytes, prompt, kind, expected answer), ``n`` per kind.

    Every case has its own fresh image; formats and sizes cycle through ``sizes``.
    """
    if n < 1:
        raise ValueError(f"n is {n}; ask for at least one image per kind")
    rng = random.Random(seed)
    cases = []
    for kind in shapes.QUESTIONS:
        for i in range(n):
            fmt, lo, hi = sizes[i % len(sizes)]
            width = rng.randint(lo, hi)
            height = max(3, round(width * rng.uniform(*ASPECTS)))
            image, color, shape = shapes.sample(rng, (width, height))
            buffer = io.BytesIO()
            if fmt.upper() == "JPEG":
                image.save(buffer, "JPEG", quality=jpeg_quality)
            else:
                image.save(buffer, fmt.upper())
            cases.append((buffer.getvalue(), shapes.QUESTIONS[kind], kind, shapes.expected(kind, color, shape)))
    return cases


def evaluate(
    answer_fn: AnswerFn,
    n: int,
    seed: int,
    sizes: Sequence[tuple[str, int, int]] = DEFAULT_SIZES,
    jpeg_quality: int = 70,
    batch_size: int = 16,
) -> dict[str, float]:
    """Accuracy per question kind on ``n`` fresh images per kind.

    ``answer_fn`` takes a list of (encoded image bytes, prompt) and returns one answer
    string per pair, in order. Answers are compared to ``shapes.expected`` after
    ``.strip()``, exactly (captions too). Returns {"color", "shape", "caption"} -> [0, 1].
    Raises ValueError if ``answer_fn`` returns the wrong number of answers.
    """
    cases = make_cases(n, seed, sizes, jpeg_quality)
    hits = {kind: 0 for kind in shapes.QUESTIONS}
    # Batches mix kinds (and so prompt lengths), as requests to the service would.
    order = list(range(len(cases)))
    random.Random(seed + 1).shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [cases[i] for i in order[start : start + batch_size]]
        answers = answer_fn([(data, prompt) for data, prompt, _, _ in chunk])
        if len(answers) != len(chunk):
            raise ValueError(f"answer_fn returned {len(answers)} answers for {len(chunk)} questions")
        for (_, _, kind, want), got in zip(chunk, answers):
            hits[kind] += got.strip() == want
    return {kind: hits[kind] / n for kind in shapes.QUESTIONS}


def transformers_answer_fn(model_dir, max_new_tokens: int = 10) -> AnswerFn:
    """An ``answer_fn`` on plain transformers: processor, left padding, greedy ``generate``."""
    import torch
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    processor = Blip2Processor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir).eval()

    def answer(pairs: list[tuple[bytes, str]]) -> list[str]:
        images = [Image.open(io.BytesIO(data)).convert("RGB") for data, _ in pairs]
        prompts = [prompt for _, prompt in pairs]
        inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in processor.batch_decode(new, skip_special_tokens=True)]

    return answer
