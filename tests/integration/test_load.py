"""Load and soak: many concurrent clients, mixed good and bad requests, against a real azmlinfsrv.

Each good request must get exactly the answer it got when sent alone (the micro-batcher
mixes rows of different requests in one model batch); no good request may get a 5xx;
every bad request gets its 4xx and code. Throughput, latency percentiles and the
resident memory of the server's worker processes are printed.

The short variant runs in the normal suite; the long one is ``slow`` (``make test-slow``).
Clients use only the standard library and requests; everything stays on loopback and
every run is bounded in request count and time.
"""

from __future__ import annotations

import base64
import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from serverproc import Server
from support import b64, picture


@dataclass(frozen=True)
class Template:
    name: str
    body: bytes
    status: int = 200  # expected status
    code: str | None = None  # expected error code for a bad request


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _split(rows, parameters=None) -> bytes:
    body = {"input_data": {"columns": ["image", "text"], "index": list(range(len(rows))), "data": [list(r) for r in rows]}}
    if parameters is not None:
        body["parameters"] = parameters
    return _json(body)


def templates() -> list[Template]:
    pics = [b64(picture(color, size=size, fmt=fmt, seed=seed)) for color, size, fmt, seed in [
        ((220, 30, 30), (96, 72), "PNG", 1), ((30, 40, 220), (120, 90), "PNG", 2), ((30, 180, 40), (64, 64), "JPEG", 3),
        ((200, 200, 30), (160, 100), "JPEG", 4), ((120, 30, 160), (80, 120), "PNG", 5), ((10, 10, 10), (50, 50), "PNG", 6),
    ]]
    prompts = ["", "Question: what is in the picture? Answer:", "Question: what color is the shape? Answer: red. Question: why? Answer:"]
    params = [None, {"max_new_tokens": 6}, {"max_new_tokens": 12, "min_new_tokens": 4}, {"max_new_tokens": 8, "num_beams": 2}]
    good = []
    for i, pic in enumerate(pics):
        good.append(Template(f"good-{i}", _split([(pic, prompts[i % 3])], params[i % 4])))
        good.append(Template(f"good-{i}-2rows", _split([(pic, prompts[(i + 1) % 3]), (pics[(i + 1) % 6], prompts[i % 3])],
                                                       params[(i + 1) % 4])))
    good.append(Template("good-records", _json({"input_data": [{"image": pics[0], "text": prompts[1]}, {"image": pics[3]}]})))
    bad = [
        Template("bad-junk-base64", _split([("@@@ definitely not base64 @@@", "q")]), 400, "invalid_base64"),
        Template("bad-not-an-image", _split([(base64.b64encode(b"GIF89a but not really" * 20).decode(), "q")]), 400, "invalid_image"),
        Template("bad-truncated-jpeg", _split([(base64.b64encode(picture(fmt="JPEG", size=(200, 160))[:500]).decode(), "q")]),
                 400, "invalid_image"),
        Template("bad-num-beams", _split([(pics[0], "q")], {"num_beams": 99}), 400, "invalid_parameter"),
        Template("bad-unknown-param", _split([(pics[1], "q")], {"beam_size": 2}), 400, "invalid_parameter"),
        Template("bad-json", b'{"input_data": {"columns": ["image", "text"], "data": [[', 400, "invalid_json"),
        Template("bad-not-utf8", b"\xff\xfe{\x00}", 400, "invalid_json"),
        Template("bad-empty", _json({"input_data": {"columns": ["image", "text"], "data": []}}), 400, "empty_input"),
        Template("bad-second-row", _split([(pics[2], "q"), ("aGVsbG8=", "q")]), 400, "invalid_image"),
        Template("bad-too-many-rows", _split([("aGVsbG8=", "q")] * 65), 413, "too_many_rows"),
    ]
    return good + bad


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the gunicorn master's workers and their children)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def worker_rss_mib(server) -> float:
    """Resident memory of the server's worker processes (the children of azmlinfsrv), MiB."""
    pids = descendants(server.proc.pid) or [server.proc.pid]
    return sum(rss_kib(p) for p in pids) / 1024


@dataclass
class Outcome:
    template: Template
    status: int
    body: bytes
    seconds: float


def run_load(server, tpls: list[Template], count: int, clients: int, seed: int, max_seconds: float,
             on_progress=None) -> tuple[list[Outcome], float]:
    """Send ``count`` requests drawn from ``tpls`` by ``clients`` threads; stop issuing after ``max_seconds``."""
    rng = random.Random(seed)
    schedule = [rng.choice(tpls) for _ in range(count)]
    lock = threading.Lock()
    cursor = iter(range(count))
    outcomes: list[Outcome] = []
    started = time.monotonic()

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                i = next(cursor, None)
            if i is None or time.monotonic() - started > max_seconds:
                return
            tpl = schedule[i]
            t0 = time.perf_counter()
            try:
                r = session.post(server.url + "/score", data=tpl.body, headers={"Content-Type": "application/json"}, timeout=120)
                status, body = r.status_code, r.content
            except requests.RequestException as exc:  # counted as a failure below
                status, body = -1, repr(exc).encode()
            out = Outcome(tpl, status, body, time.perf_counter() - t0)
            with lock:
                outcomes.append(out)
                done = len(outcomes)
            if on_progress is not None:
                on_progress(done)

    with ThreadPoolExecutor(clients) as pool:
        for fut in [pool.submit(client) for _ in range(clients)]:
            fut.result()
    return outcomes, time.monotonic() - started


def baseline(server, tpls: list[Template]) -> dict[str, list]:
    """Each good request sent alone: the answers every later copy must equal."""
    expected = {}
    for tpl in tpls:
        if tpl.status == 200:
            r = requests.post(server.url + "/score", data=tpl.body, headers={"Content-Type": "application/json"}, timeout=120)
            assert r.status_code == 200, (tpl.name, r.text)
            expected[tpl.name] = r.json()
    return expected


def judge(outcomes: list[Outcome], expected: dict[str, list]) -> list[str]:
    """Every way the outcomes are wrong, as lines (empty: all right)."""
    problems = []
    for o in outcomes:
        t = o.template
        if t.status == 200:
            if o.status != 200:
                problems.append(f"{t.name}: HTTP {o.status} {o.body[:200]!r}")
            elif json.loads(o.body) != expected[t.name]:
                problems.append(f"{t.name}: wrong answer {o.body[:200]!r}, alone it was {expected[t.name]}")
        else:
            if not 400 <= o.status < 500:
                problems.append(f"{t.name}: HTTP {o.status} for a bad request {o.body[:200]!r}")
                continue
            code = json.loads(o.body)["error"]["code"]
            if (o.status, code) != (t.status, t.code):
                problems.append(f"{t.name}: {o.status} {code}, expected {t.status} {t.code}")
    return problems


def figures(label: str, outcomes: list[Outcome], seconds: float, rss_before: float, rss_after: float,
            server=None) -> dict:
    lat = sorted(o.seconds for o in outcomes)
    good = sorted(o.seconds for o in outcomes if o.template.status == 200)
    pct = statistics.quantiles(lat, n=100, method="inclusive")
    gpct = statistics.quantiles(good, n=100, method="inclusive") if len(good) > 1 else pct
    return {
        "run": label, "requests": len(outcomes), "good": len(good), "bad": len(outcomes) - len(good),
        "seconds": round(seconds, 1), "rps": round(len(outcomes) / seconds, 1),
        "p50_ms": round(pct[49] * 1000), "p99_ms": round(pct[98] * 1000),
        "good_p50_ms": round(gpct[49] * 1000), "good_p99_ms": round(gpct[98] * 1000),
        "rss_before_mib": round(rss_before), "rss_after_mib": round(rss_after),
        "rss_growth_mib": round(rss_after - rss_before),
        "worker_processes": len(descendants(server.proc.pid)) if server is not None else None,
    }


def _report(capsys, stats: dict) -> None:
    with capsys.disabled():
        print("\n[load] " + json.dumps(stats))


def test_load_short(server, capsys):
    """~200 mixed requests from 16 clients against the shared test server."""
    tpls = templates()
    expected = baseline(server, tpls)
    rss_before = worker_rss_mib(server)
    outcomes, seconds = run_load(server, tpls, count=200, clients=16, seed=5, max_seconds=90)
    rss_after = worker_rss_mib(server)
    stats = figures("short", outcomes, seconds, rss_before, rss_after, server)
    _report(capsys, stats)
    assert len(outcomes) == 200, f"only {len(outcomes)} of 200 requests were sent in time"
    problems = judge(outcomes, expected)
    assert not problems, f"{len(problems)} wrong outcomes:\n" + "\n".join(problems[:20])
    assert stats["good"] > 100 and stats["bad"] > 30
    assert rss_before > 0, "could not read the workers' resident memory"
    assert stats["rss_growth_mib"] < 400, stats
    assert requests.get(server.url + "/", timeout=10).status_code == 200


@pytest.mark.slow
def test_soak_long(tiny_model_dir, tmp_path, capsys):
    """Thousands of mixed requests over a few minutes against a fresh server with 16 threads
    (as ``make serve`` runs it); the workers' memory must level off."""
    count, clients = 4000, 16
    server = Server(tiny_model_dir, tmp_path / "azmlinfsrv.log", threads=16)
    try:
        tpls = templates()
        expected = baseline(server, tpls)
        rss_start = worker_rss_mib(server)
        marks: dict[str, float] = {}

        def progress(done: int) -> None:
            if done == count // 4 and "quarter" not in marks:
                marks["quarter"] = worker_rss_mib(server)

        outcomes, seconds = run_load(server, tpls, count=count, clients=clients, seed=11, max_seconds=420,
                                     on_progress=progress)
        rss_end = worker_rss_mib(server)
        stats = figures("soak", outcomes, seconds, rss_start, rss_end, server)
        stats["rss_at_quarter_mib"] = round(marks.get("quarter", 0))
        stats["rss_growth_after_quarter_mib"] = round(rss_end - marks.get("quarter", rss_end))
        _report(capsys, stats)
        assert len(outcomes) == count, f"only {len(outcomes)} of {count} requests were sent in 420 s"
        problems = judge(outcomes, expected)
        assert not problems, f"{len(problems)} wrong outcomes:\n" + "\n".join(problems[:20])
        # after the first quarter (warm caches, allocator pools) memory must not keep climbing
        assert stats["rss_growth_after_quarter_mib"] < 150, stats
        assert "Traceback" not in server.log()
    finally:
        server.stop()
