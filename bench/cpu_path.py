"""How many requests/s the service's CPU side can carry, with the model stubbed out.

The issue asks that the CPU-side path never be what holds the GPU back. On the GPU a
batch of BLIP-2 costs milliseconds, so the request path (HTTP, JSON, base64, image
decoding and resizing, tokenising, the batcher's hand-offs) sets a ceiling of its own:
this measures it. Two real ``azmlinfsrv`` servers on loopback, driven in interleaved
rounds by the same one-row requests as bench/serve.py (160x120 PNGs):

(a) ``score.py`` with each model batch answered at once (``bench/stub_score.py``);
(b) the floor: a bare entry script that answers without reading the body.

It prints both rates and (a)'s share of (b)'s. The clients run on the same cores.

    python bench/cpu_path.py [--clients 16] [--requests 2000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import MODELS, PROMPTS, REPO, Clients, images, pct, start, stop_all  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args(argv)

    from blip2.tiny import TinySizes, make_tiny_blip2

    work = Path(tempfile.mkdtemp(prefix="bench-cpu-path-"))
    model = make_tiny_blip2(work / "model", TinySizes(**MODELS["small"]))  # its tokenizer and processor are used
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("BLIP2_", "GUNICORN_", "BENCH_"))}
    base_env.update(BLIP2_MODEL=str(model), HF_HUB_OFFLINE="1", GUNICORN_CMD_ARGS=f"--threads {args.threads}",
                    BLIP2_MAX_BATCH_SIZE=str(args.clients), BLIP2_WARMUP="0")
    pictures = images(args.requests + 2 * args.clients, seed=1)
    body = lambda i: {"input_data": {"columns": ["image", "text"], "index": [0], "data": [[pictures[i], PROMPTS[i % 3]]]}}  # noqa: E731
    warm = [body(args.requests + i) for i in range(2 * args.clients)]
    timed = [body(i) for i in range(args.requests)]
    servers = {
        "score.py, model stubbed (bench/stub_score.py)": {**base_env, "BENCH_STUB": "service"},
        "floor: bare entry script, body unread": {**base_env, "BENCH_STUB": "bare"},
    }
    procs, pools = {}, {}
    walls = {name: 0.0 for name in servers}
    latencies = {name: [] for name in servers}
    try:
        for i, (name, env) in enumerate(servers.items()):
            procs[name], url = start(REPO / "bench" / "stub_score.py", env, work / f"server{i}.log")
            pools[name] = Clients(url, args.clients)
            pools[name].drive(warm)
        size = -(-len(timed) // args.rounds)
        for r, at in enumerate(range(0, len(timed), size)):
            for name in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                wall, lat, answers = pools[name].drive(timed[at : at + size])
                if any(a != [{"text": "x"}] for a in answers):
                    raise RuntimeError(f"{name}: unexpected answers")
                walls[name] += wall
                latencies[name] += lat
    finally:
        stop_all(pools, procs)
    rates = {name: len(timed) / walls[name] for name in servers}
    print(f"{args.requests} one-row requests (160x120 PNG), {args.clients} concurrent clients, "
          f"{args.threads} server threads, on CPU ({os.cpu_count()} cores, clients included)")
    for name in servers:
        print(f"  {name:50s} {rates[name]:7.1f} req/s   p50 {pct(latencies[name], 0.5):6.1f} ms   "
              f"p99 {pct(latencies[name], 0.99):6.1f} ms")
    ours, floor = rates.values()
    print(f"  the service's request path runs at {ours / floor:.0%} of the bare server's rate")


if __name__ == "__main__":
    main()
