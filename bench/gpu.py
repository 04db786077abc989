"""GPU benchmark: the full blip2-opt-2.7b architecture with random fp16 weights (no download).

On a CUDA machine this builds ``Blip2ForConditionalGeneration`` from the real
configuration (EVA ViT-g/14 1408x39, Q-Former 768x12, OPT-2.7b 2560x32) directly on
the GPU in fp16 (the Q-Former in fp32, as transformers keeps it) and prints a table:

* vision + Q-Former images/s (batch 64);
* decode ms/step at batch 1/8/32/128 (two answer lengths, difference / extra steps), with
  the engine's greedy loop (OPT's steps as plain tensor ops, ``blip2/optsteps.py``, replayed
  as CUDA graphs, ``blip2/stepgraphs.py``), and how many graphs it captured; the variants
  (the lean steps without graphs, transformers' ``generate``, the loop with its steps through
  the model with a dynamic then a preallocated KV cache, ``generate`` with a static KV
  cache) come last;
* end-to-end requests/s at concurrency 1/16/64 through ``Service.score_rows`` and the
  micro-batcher (base64 PNGs decoded, preprocessed, embedded and answered);
* the baseline, measured in the same run: naive per-request transformers (processor +
  ``generate`` for each request, one at a time, as the catalog's sync worker does);
* last, the decode variants above at batch 1 and 32.

The table file is rewritten after every row, so a run cut short keeps what it measured; past
``--budget-s`` (default 420) the remaining concurrency levels and variants are skipped and
marked so, and a variant that fails is marked FAILED without stopping the rest.

Random weights answer nonsense, so every answer is forced to ``--tokens`` tokens
(``min_new_tokens = max_new_tokens``). Each figure is set beside its physical
ceiling on an H200 (fp16 dense ~989 TFLOP/s, HBM ~4.8 TB/s): ViT-g ~520 GFLOP per
image; OPT-2.7b reads ~5.3 GB of fp16 weights per decode step; ~1,000 short VQA
requests/s in all. The table is written to ``--out`` (default bench/out/gpu.md).

``--small`` runs the same script with a tiny configuration on the CPU in seconds, so
CI checks that it does not rot; its fractions mean nothing.

    python bench/gpu.py            # on the GPU machine, inside 8 minutes
    python bench/gpu.py --small    # anywhere
"""

from __future__ import annotations

import argparse
import base64
import io
import random
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the GPU machine runs this from a plain checkout

H200_FLOPS = 989e12
H200_BYTES_PER_S = 4.8e12
VIT_FLOP_PER_IMAGE = 520e9
OPT_WEIGHT_BYTES = 5.3e9
E2E_CEILING_RPS = 1000.0
PROMPT = "Question: what is in the picture? Answer:"


def full_sizes():
    from blip2.tiny import TinySizes

    return TinySizes(
        vision_hidden=1408, vision_layers=39, vision_heads=16, patch_size=14, image_size=224,
        qformer_hidden=768, qformer_layers=12, qformer_heads=12,
        text_hidden=2560, text_layers=32, text_heads=32, num_query_tokens=32,
    )


def build(small: bool, device, dtype):
    """(model, processor) with random weights; full size unless ``small``."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    from blip2.tiny import TinySizes, build_config, build_processor, build_tokenizer

    sizes = TinySizes() if small else full_sizes()
    tokenizer = build_tokenizer()
    config = build_config(tokenizer, sizes)
    if not small:  # the real model's widths that TinySizes does not derive
        config.vision_config.intermediate_size = 6144
        config.qformer_config.intermediate_size = 3072
        config.qformer_config.cross_attention_frequency = 2
        config.text_config.ffn_dim = 10240
        config.text_config.vocab_size = 50272
        config.text_config.max_position_embeddings = 2048
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Blip2ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.qformer.float()
    model.query_tokens.data = model.query_tokens.data.float()
    return model.eval(), build_processor(tokenizer, sizes)


def pictures(n: int) -> list[str]:
    from PIL import Image

    rng = random.Random(0)
    out = []
    for _ in range(n):
        image = Image.new("RGB", (320, 240), tuple(rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        image.save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


class Timer:
    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self, fn, repeat: int = 1) -> float:
        """Seconds per call, after one warm-up call."""
        fn()
        self.sync()
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        self.sync()
        return (time.perf_counter() - started) / repeat


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny config on the CPU (CI check)")
    parser.add_argument("--tokens", type=int, default=10, help="answer length, forced")
    parser.add_argument("--requests", type=int, default=256, help="requests per concurrency level")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "gpu.md"))
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="after this many seconds the remaining decode variants and concurrency levels are skipped")
    args = parser.parse_args(argv)

    import torch

    from blip2.config import Settings
    from blip2.engine import Engine, GenItem
    from blip2.params import GenerationParams
    from blip2.payload import Row
    from blip2.service import Service

    started_all = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    torch.set_grad_enabled(False)
    model, processor = build(args.small, device, dtype)
    processor.tokenizer.padding_side = "left"
    timer = Timer(device)
    tokens = args.tokens
    params = GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)
    lines = [f"# bench/gpu.py {'--small ' if args.small else ''}on {torch.cuda.get_device_name() if cuda else 'CPU'}",
             f"torch {torch.__version__}, dtype {str(dtype).replace('torch.', '')}, answers forced to {tokens} tokens", "",
             "| measure | value | ceiling (H200) | fraction |", "|---|---|---|---|"]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def emit(line: str) -> None:
        """Add a line to the table, print it, and rewrite the file: a run cut short keeps what it measured."""
        lines.append(line)
        print(line, flush=True)
        out.write_text("\n".join(lines) + "\n")

    def over_budget(what: str) -> bool:
        spent = time.perf_counter() - started_all
        if spent < args.budget_s:
            return False
        emit(f"| {what} | skipped: {spent:.0f} s spent of the {args.budget_s:.0f} s budget | - | - |")
        return True

    def row(name, value, unit, ceiling=None):
        frac = f"{value / ceiling:.0%}" if ceiling and not args.small else "n/a"
        ceil = f"{ceiling:,.0f} {unit}" if ceiling else "-"
        emit(f"| {name} | {value:,.1f} {unit} | {ceil} | {frac} |")

    print("\n".join(lines), flush=True)
    engine = Engine(model, processor, device=device, dtype=dtype, max_batch_size=128 if cuda else 16)

    # 1. vision + Q-Former
    size = processor.image_processor.size
    batch = 64 if cuda else 4
    pixels = torch.randn(batch, 3, size["height"], size["width"])
    per_batch = timer(lambda: engine.embed_images(pixels), repeat=5 if cuda else 1)
    row(f"vision + Q-Former, batch {batch}", batch / per_batch, "images/s", H200_FLOPS / VIT_FLOP_PER_IMAGE)

    # 2. decode ms/step: same prompt, two answer lengths; the difference is pure decode
    embed = engine.embed_images(pixels[:1])[0]
    short, long_ = max(2, tokens // 4), tokens * 3

    def decode_step_ms(eng, b: int) -> float:
        items = [GenItem(key=f"d{i}", pixels=None, prompt=PROMPT, embed=embed) for i in range(b)]
        t_short = timer(lambda: eng.generate(items, GenerationParams(max_new_tokens=short, min_new_tokens=short)))
        t_long = timer(lambda: eng.generate(items, GenerationParams(max_new_tokens=long_, min_new_tokens=long_)))
        return (t_long - t_short) / (long_ - short) * 1000

    def same_answers(eng, b: int) -> str:
        items = [GenItem(key=f"s{i}", pixels=None, prompt=PROMPT, embed=embed) for i in range(b)]
        mine, ref = eng.generate(items, params), engine.generate(items, params)
        differ = sum(a != b for a, b in zip(mine, ref))
        return "identical" if not differ else f"{differ} of {len(ref)} DIFFER"

    for b in (1, 8, 32, 128) if cuda else (1, 8):
        step_ms = decode_step_ms(engine, b)
        floor_ms = max(OPT_WEIGHT_BYTES / H200_BYTES_PER_S, b * 2 * 2.7e9 / H200_FLOPS) * 1000
        frac = f"{floor_ms / step_ms:.0%}" if not args.small else "n/a"
        emit(f"| decode step, batch {b} (engine's greedy loop) | {step_ms:.2f} ms/step | {floor_ms:.2f} ms/step | {frac} |")
    graphs = engine.greedy.graphs
    if graphs is None:
        graph_state = "off (not on CUDA)"
    else:
        graph_state = f"{graphs.graphs_made} captured, {graphs.held_bytes() / 2**20:,.0f} MB of keys/values held"
        if graphs.failed:
            graph_state += f"; DROPPED: {graphs.failed}"
    emit(f"| CUDA graphs of the decode step | {graph_state} | - | - |")

    # 3. end to end through Service + batcher, fresh images so the cache does not help
    settings = Settings.from_env({"BLIP2_MAX_BATCH_SIZE": "64" if cuda else "16", "BLIP2_BATCH_WAIT_MS": "5",
                                  "BLIP2_EMBED_CACHE_MB": "0", "BLIP2_PREPROCESS_THREADS": "8"})
    service = Service(settings, engine)
    n_requests = args.requests if cuda else 24
    images = pictures(n_requests)
    for clients in (1, 16, 64) if cuda else (1, 8):
        if over_budget(f"end to end, {clients} concurrent clients"):
            continue
        count = min(n_requests, max(clients * 4, 32 if cuda else 8))
        todo = iter(range(count))
        lock = threading.Lock()
        errors = []

        def client():
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                result = service.score_rows([Row(0, images[i], PROMPT)], params)
                if not isinstance(result[0], str):
                    errors.append(result[0])

        threads = [threading.Thread(target=client) for _ in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rps = count / (time.perf_counter() - t0)
        if errors:
            print(f"errors: {errors[:3]}", file=sys.stderr)
            return 1
        row(f"end to end, {clients} concurrent clients ({count} requests)", rps, "req/s", E2E_CEILING_RPS)
    service.close()

    # 4. baseline: naive per-request transformers, one request at a time
    from PIL import Image

    count = 16 if cuda else 4
    t0 = time.perf_counter()
    for i in range(count):
        image = Image.open(io.BytesIO(base64.b64decode(images[i]))).convert("RGB")
        inputs = processor(images=image, text=PROMPT, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens)
    timer.sync()
    row("baseline: naive transformers generate per request", count / (time.perf_counter() - t0), "req/s", E2E_CEILING_RPS)

    # 5. last, so that the rows above come first under the time budget: decode steps through
    # transformers' generate (BLIP2_FAST_GREEDY=0); through the loop with its steps going through the
    # model (dynamic cache, then StaticCache run eagerly); through generate with a static KV cache
    # (BLIP2_STATIC_CACHE=1; on CUDA transformers compiles decode). Each is checked against the loop's answers.
    variants = [
        ("greedy loop, lean steps without CUDA graphs", dict(cuda_graph_mb=0), (1, 32) if cuda else (1,)),
        ("transformers generate", dict(fast_greedy=False), (1, 32) if cuda else (1,)),
        ("greedy loop, steps through the model", dict(lean_steps=False), (1, 32) if cuda else (1,)),
        ("greedy loop, steps through the model, preallocated KV cache", dict(preallocate_kv=True), (1, 32) if cuda else (1,)),
        # batch 32: the dynamic cache copies all keys and values on every step (torch.cat), ~0.6 GB a
        # step for BLIP-2 at batch 32 and ~60 tokens beside 5.3 GB of weights; a static cache does not
        ("static KV cache", dict(static_cache=True), (1, 32) if cuda else (1,)),
    ]
    for label, options, sizes in variants:
        for b in sizes:
            if over_budget(f"decode step, batch {b}, {label}"):
                continue
            try:  # one variant failing (a compile error, say) must not cost the rest of the table
                other = Engine(model, processor, device=device, dtype=dtype, max_batch_size=engine.max_batch_size, **options)
                emit(f"| decode step, batch {b}, {label} (answers {same_answers(other, b)}) "
                     f"| {decode_step_ms(other, b):.2f} ms/step | - | - |")
            except Exception as exc:  # noqa: BLE001 - reported in the table
                emit(f"| decode step, batch {b}, {label} | FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''} | - | - |")

    emit("")
    emit("Variant answers are compared with the engine's default loop (on CUDA: its steps replayed as CUDA graphs, each "
         "graph checked bit for bit against its eager step when captured). Random fp16 weights leave near-tied logits "
         "that another kernel's rounding can flip, so a few differing answers in a variant row are not by themselves a "
         "fault; many are.")
    emit(f"total wall time {time.perf_counter() - started_all:.0f} s")
    print(f"table written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
