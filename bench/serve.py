"""Serving benchmark: this service vs the catalog-style baseline, same model, same load, one run.

Starts the real ``azmlinfsrv`` twice on loopback with a small BLIP-2 on the CPU:
(a) ``score.py`` with ``GUNICORN_CMD_ARGS=--threads N`` and the micro-batcher, and
(b) the baseline ``bench/naive_score.py`` (sync worker, processor + ``generate`` per
request, fp32). Each is driven by ``--clients`` concurrent clients sending
``--requests`` one-row requests (every request a different image, so the embedding
cache gives no help), after a short warm-up. Both servers run side by side and the
timed requests go in ``--rounds`` rounds, each to one server then the other, so the
shared machine's drift weighs on both. Prints requests/s, p50 and p99 latency for
both, the throughput ratio (and each round's). Answers of the two servers are compared too.

    python bench/serve.py [--clients 16] [--requests 640] [--rounds 4] [--max-new-tokens 10]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
MODELS = {  # TinySizes overrides
    "tiny": {},
    "small": {"vision_hidden": 192, "vision_layers": 4, "vision_heads": 4, "patch_size": 16,
              "qformer_hidden": 128, "text_hidden": 256, "text_layers": 4, "text_heads": 4},
    # BLIP-2's balance: the language model dominates (OPT-2.7b vs a 1B ViT, one pass per token);
    # ~80M parameters of OPT whose decode is bound by reading its weights, as on a GPU
    "lm-heavy": {"text_hidden": 1024, "text_layers": 6, "text_heads": 16},
    # BLIP-2's proportions: vision ~0.37x the language model's parameters (1B vs 2.7B), 257 image
    # tokens, so one image costs about twice the prefill of a short question, as it does for BLIP-2
    "blip2-shaped": {"vision_hidden": 512, "vision_layers": 9, "vision_heads": 8, "patch_size": 14,
                     "qformer_hidden": 128, "text_hidden": 1024, "text_layers": 6, "text_heads": 16},
}
PROMPTS = ["Question: what color is the shape? Answer:", "Question: what shape is this? Answer:", ""]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(entry: Path, env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = Path(sys.executable).parent / "azmlinfsrv"
    proc = subprocess.Popen(
        [str(exe), "--entry_script", str(entry), "--port", str(port)],
        cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{entry.name} exited; see {log}")
        try:
            if requests.get(url + "/", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{entry.name} did not start; see {log}")


def images(n: int, seed: int) -> list[str]:
    from blip2.shapes import COLORS, SHAPES, make_image

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        make_image(rng.choice(list(COLORS)), rng.choice(SHAPES), size=(160, 120), rng=rng).save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


class Clients:
    """``n`` client threads, kept across calls to ``drive``; each call opens fresh keep-alive
    connections (the server drops idle ones after gunicorn's 2 s keep-alive, e.g. during the
    other server's round, and a POST on a dropped connection fails)."""

    def __init__(self, url: str, n: int):
        self.url = url
        self.pool = ThreadPoolExecutor(max_workers=n)
        self.sessions: dict = {}

    def _one(self, body):
        session = self.sessions.setdefault(threading.get_ident(), requests.Session())
        started = time.perf_counter()
        r = session.post(self.url + "/score", json=body, timeout=600)
        elapsed = time.perf_counter() - started
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        return elapsed, r.json()

    def drive(self, bodies: list[dict]) -> tuple[float, list[float], list]:
        """Send ``bodies`` (one request each, as many at once as there are threads): wall s, latencies, answers."""
        self.close_sessions()
        started = time.perf_counter()
        results = list(self.pool.map(self._one, bodies))
        wall = time.perf_counter() - started
        return wall, [r[0] for r in results], [r[1] for r in results]

    def close_sessions(self) -> None:
        for session in self.sessions.values():
            session.close()
        self.sessions.clear()

    def close(self) -> None:
        self.pool.shutdown()
        self.close_sessions()


def stop_all(pools: dict, procs: dict) -> None:
    """Close the client pools, then stop the servers."""
    for pool in pools.values():
        pool.close()
    for proc in procs.values():
        proc.terminate()
    for proc in procs.values():
        proc.wait(timeout=30)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=4, help="timed requests are split into this many rounds, "
                        "each sent to both servers in turn")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="BLIP2_DTYPE for this service (default: the service's own choice for this CPU); the baseline stays fp32")
    parser.add_argument("--model", choices=sorted(MODELS), default="small",
                        help="tiny: HTTP overhead dominates; small: the model's own cost matters, as it does for BLIP-2")
    args = parser.parse_args(argv)

    from blip2.tiny import TinySizes, make_tiny_blip2

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = make_tiny_blip2(work / "model", TinySizes(**MODELS[args.model]))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("BLIP2_", "GUNICORN_"))}
    base_env.update(BLIP2_MODEL=str(model), HF_HUB_OFFLINE="1")
    params = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens}
    pictures = images(args.requests + 2 * args.clients, seed=1)
    body = lambda i: {"input_data": {"columns": ["image", "text"], "index": [0], "data": [[pictures[i], PROMPTS[i % 3]]]}, "parameters": params}  # noqa: E731
    warm = [body(args.requests + i) for i in range(2 * args.clients)]
    timed = [body(i) for i in range(args.requests)]

    servers = {
        "blip2-endpoint (score.py, threads + micro-batcher)": (
            REPO / "score.py",
            {**base_env, "GUNICORN_CMD_ARGS": f"--threads {args.threads}", "BLIP2_MAX_BATCH_SIZE": str(args.clients), "BLIP2_BATCH_WAIT_MS": "5",
             **({"BLIP2_DTYPE": args.dtype} if args.dtype else {})},
        ),
        # The baseline gets OMP_NUM_THREADS=1, its best setting here: with torch's default of one
        # thread per core its generate ran ~15x slower inside the sync worker (750 vs 45 ms a request).
        "baseline (naive_score.py, sync worker, generate per request)": (
            REPO / "bench" / "naive_score.py", {**base_env, "OMP_NUM_THREADS": "1"},
        ),
    }
    # Both servers run side by side, idle in turn: the timed requests go in rounds, each round to
    # one server then the other (the order alternating), so that the shared machine's drift over the
    # run weighs on both alike.
    procs, pools = {}, {}
    try:
        for name, (entry, env) in servers.items():
            procs[name], url = start(entry, env, work / f"{entry.stem}.log")
            pools[name] = Clients(url, args.clients)
        for name in servers:
            pools[name].drive(warm)
        walls = {name: 0.0 for name in servers}
        latencies = {name: [] for name in servers}
        answers = {name: [] for name in servers}
        round_ratios = []
        size = -(-len(timed) // args.rounds)
        for r, start_at in enumerate(range(0, len(timed), size)):
            chunk = timed[start_at : start_at + size]
            took = {}
            for name in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                wall, lat, out = pools[name].drive(chunk)
                took[name] = wall
                walls[name] += wall
                latencies[name] += lat
                answers[name] += out
            ours_s, base_s = (took[name] for name in servers)
            round_ratios.append(base_s / ours_s)
    finally:
        stop_all(pools, procs)
    report = {name: (len(timed) / walls[name], pct(latencies[name], 0.5), pct(latencies[name], 0.99)) for name in servers}
    ours, base = report.values()
    same = sum(a == b for a, b in zip(*answers.values()))
    from blip2.model import default_dtype_name

    print(f"{args.requests} one-row requests, {args.clients} concurrent clients, max_new_tokens={args.max_new_tokens}, "
          f"{args.model} BLIP-2 ({MODELS[args.model] or 'tiny defaults'}) on CPU ({os.cpu_count()} cores)")
    print(f"  dtype: this service {args.dtype or default_dtype_name('cpu')}"
          f"{'' if args.dtype else ' (its default on this CPU)'}, baseline float32")
    for name, (rps, p50, p99) in report.items():
        print(f"  {name:62s} {rps:7.1f} req/s   p50 {p50:7.0f} ms   p99 {p99:7.0f} ms")
    print(f"  throughput ratio vs baseline: {ours[0] / base[0]:.1f}x   (target >= 5x at 16 clients; "
          f"{len(round_ratios)} interleaved rounds: {' / '.join(f'{x:.1f}x' for x in round_ratios)})")
    print(f"  identical answers: {same}/{args.requests}"
          + ("" if same == args.requests else "  (random weights leave near-ties that bf16 vs fp32 can flip)"))


if __name__ == "__main__":
    main()
