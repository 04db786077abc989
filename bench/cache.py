"""Image-embedding cache benchmark: five questions about one image vs five different images.

Every case sends the same five questions through ``blip2.service.Service`` (the
server's code path, minus HTTP) on a model whose vision tower is large enough to
matter and a small language model, greedy with a short answer. ``--vision base``
(the default) is a ViT-B-sized tower: 768 wide, 12 layers, patch 14, 257 tokens
per image, about a twelfth of BLIP-2's ViT-g in FLOPs. ``--vision small`` (384
wide, 6 layers) is the tower earlier sessions measured; on a CPU with bf16 matrix
units its cost is so close to the rest of a question's that no cache can reach
3x there (bench/RESULTS.md). Two pairs, each measured against its
named baseline in the same run and sent the same way, so only the images differ:
(a) one five-row request about one image vs about five different images (the
cache works within a batch), (b) five one-row requests about one image vs about
five different images (the cache works across requests). Every repeat uses fresh
images, encoded before the clock starts, so no earlier repeat warms the cache.
Prints ms per five questions and the ratios.

    python bench/cache.py [--repeat 5] [--dtype float32] [--vision small]
"""

from __future__ import annotations

import argparse
import base64
import io
import random
import statistics
import tempfile
import time

# vision towers (hidden width, layers); heads are 64 wide, patches 14 pixels, images 224 x 224
VISION = {"base": (768, 12), "small": (384, 6)}

QUESTIONS = [
    "Question: what color is the shape? Answer:",
    "Question: what shape is this? Answer:",
    "Question: where is the shape? Answer:",
    "Question: is it big? Answer:",
    "",
]


def encoded_image(seed: int) -> str:
    from blip2.shapes import COLORS, SHAPES, make_image

    rng = random.Random(seed)
    image = make_image(rng.choice(list(COLORS)), rng.choice(SHAPES), size=(320, 240), rng=rng)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="the service's dtype (default: its own CPU default, bfloat16 where the CPU has it)")
    parser.add_argument("--vision", choices=tuple(VISION), default="base",
                        help="the vision tower: base = 768 wide, 12 layers (default); small = 384 wide, 6 layers")
    args = parser.parse_args(argv)

    from blip2 import modelthread
    from blip2.config import Settings
    from blip2.params import GenerationParams
    from blip2.payload import Row, ScoreRequest
    from blip2.service import Service
    from blip2.tiny import TinySizes, make_tiny_blip2

    width, layers = VISION[args.vision]
    sizes = TinySizes(vision_hidden=width, vision_layers=layers, vision_heads=width // 64, patch_size=14,
                      qformer_hidden=128, text_hidden=64)
    # built on the model thread, as in the server, where the main thread runs no torch work
    folder = modelthread.run(make_tiny_blip2, tempfile.mkdtemp(prefix="bench-cache-") + "/model", sizes)
    env = {"BLIP2_MODEL": str(folder), "BLIP2_WARMUP": "1", "BLIP2_MAX_BATCH_SIZE": "8"}
    service = Service.from_settings(Settings.from_env({**env, **({"BLIP2_DTYPE": args.dtype} if args.dtype else {})}))
    params = GenerationParams(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)
    seeds = iter(range(10**6))

    def one_request(images: list[str]) -> None:
        rows = tuple(Row(i, img, q) for i, (img, q) in enumerate(zip(images, QUESTIONS)))
        service.score(ScoreRequest(rows, params))

    def separate_requests(images: list[str]) -> None:
        for img, q in zip(images, QUESTIONS):
            service.score(ScoreRequest((Row(0, img, q),), params))

    n = len(QUESTIONS)
    # (name, number of fresh images, how they are sent); each pair differs only in the images
    cases = {
        "one request, five different images (baseline)": (n, one_request),
        "one request, one image asked five times": (1, lambda images: one_request(images * n)),
        "five one-row requests, five different images (baseline)": (n, separate_requests),
        "five one-row requests, one image (cache across requests)": (1, lambda images: separate_requests(images * n)),
    }
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeat):  # interleaved, so drift in machine load hits every case alike
        for name, (n_images, case) in cases.items():
            images = [encoded_image(next(seeds)) for _ in range(n_images)]  # encoded before the clock starts
            started = time.perf_counter()
            case(images)
            timings[name].append((time.perf_counter() - started) * 1000)
    service.close()
    medians = [(name, statistics.median(ms)) for name, ms in timings.items()]
    print(f"vision tower ({args.vision}): {sizes.vision_hidden} wide, {sizes.vision_layers} layers, patch {sizes.patch_size}; "
          f"max_new_tokens={args.max_new_tokens}; {args.repeat} repeats, median ms for five questions; "
          f"dtype {str(service.engine.dtype).replace('torch.', '')}")
    for (base_name, base), (name, ms) in (medians[0:2], medians[2:4]):
        print(f"  {base_name:58s} {base:8.1f} ms")
        print(f"  {name:58s} {ms:8.1f} ms   {base / ms:5.2f}x cheaper")
    print("  target: the repeated-image case at least 3x cheaper")


if __name__ == "__main__":
    main()
