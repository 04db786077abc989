"""bench/cache.py must not rot: a short run times all four cases and prints both ratios."""

import importlib.util
import re
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_cache_bench_times_each_case_against_its_baseline(capsys):
    spec = importlib.util.spec_from_file_location("bench_cache", BENCH / "cache.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--repeat", "1", "--vision", "small", "--max-new-tokens", "1", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert "vision tower (small): 384 wide, 6 layers" in out
    assert "dtype float32" in out
    rows = re.findall(r"^  (.+?)\s+([\d.]+) ms(?:\s+([\d.]+)x cheaper)?$", out, re.M)
    assert [name for name, _, _ in rows] == [
        "one request, five different images (baseline)",
        "one request, one image asked five times",
        "five one-row requests, five different images (baseline)",
        "five one-row requests, one image (cache across requests)",
    ]
    assert all(float(ms) > 0 for _, ms, _ in rows)
    for (_, base, _), (_, ms, ratio) in (rows[0:2], rows[2:4]):
        assert abs(float(ratio) - float(base) / float(ms)) < 0.01 + 0.01 * float(ratio)
