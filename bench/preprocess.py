"""Preprocessing benchmark: ms per 12-megapixel JPEG, this service's path vs the transformers processor.

Baseline (named, measured in the same run): decode the whole JPEG with Pillow and run
the model's ``BlipImageProcessor`` (what a hand-rolled transformers script does).
This path: ``blip2.images.decode_image`` with JPEG draft (DCT) scaling to no less than
twice the model input, then ``blip2.preprocess.Preprocessor`` (one resize + tensor ops).
Prints both timings, the speed-up ratio and the largest mean absolute pixel difference.

    python bench/preprocess.py [--images 6] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import time

from PIL import Image, ImageDraw, ImageFilter


def photo_jpeg(seed: int, size=(4032, 3024)) -> bytes:
    """A photo-like 12 MP JPEG: smooth gradients, many shapes, a little blur; quality 90."""
    rng = random.Random(seed)
    small = Image.new("RGB", (8, 6))
    small.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(48)])
    image = small.resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    w, h = size
    for _ in range(120):
        x, y, r = rng.randrange(w), rng.randrange(h), rng.randint(20, 400)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
    image = image.filter(ImageFilter.GaussianBlur(2))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    from blip2.config import ImageLimits
    from blip2.images import decode_image
    from blip2.preprocess import Preprocessor
    from blip2.tiny import build_processor, build_tokenizer

    torch.set_num_threads(1)  # per-image cost on one core: the service runs rows in parallel threads
    processor = build_processor(build_tokenizer())  # the real blip2-opt-2.7b image processor settings
    fast = Preprocessor.from_processor(processor)
    files = [photo_jpeg(seed) for seed in range(args.images)]
    limits = ImageLimits()

    def baseline(data):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return processor.image_processor(image, return_tensors="pt")["pixel_values"][0]

    def ours(data):
        return fast(decode_image(data, limits, draft=fast.draft_size))

    worst = max(float((baseline(d) - ours(d)).abs().mean()) for d in files)
    timings = {}
    for name, fn in (("transformers processor (baseline)", baseline), ("blip2 fast path", ours)):
        per_image = []
        for _ in range(args.repeat):
            for data in files:
                started = time.perf_counter()
                fn(data)
                per_image.append((time.perf_counter() - started) * 1000)
        timings[name] = statistics.median(per_image)
    base, fast_ms = timings.values()
    print(f"images: {args.images} JPEG 4032x3024 (q90), {args.repeat} passes, 1 torch thread")
    for name, ms in timings.items():
        print(f"  {name:36s} {ms:8.1f} ms/image (median)")
    print(f"  speed-up vs baseline: {base / fast_ms:.1f}x   (target >= 8x)")
    print(f"  max mean |pixel difference| (normalised): {worst:.4f}   (bound held in tests: 0.02)")


if __name__ == "__main__":
    main()
