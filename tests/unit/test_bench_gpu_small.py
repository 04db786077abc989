"""bench/gpu.py must not rot: its --small mode runs the whole script on the CPU."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"


def test_gpu_bench_small_writes_its_table(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu.md"
    assert module.main(["--small", "--tokens", "3", "--out", str(out)]) == 0
    table = out.read_text()
    for measure in ("vision + Q-Former", "decode step, batch 1", "end to end, 8 concurrent", "baseline: naive"):
        assert measure in table
    assert table.count("\n| ") >= 9
    # the engine's greedy loop (lean OPT steps) answers as transformers' generate does, and as the
    # loop does with its steps through the model, with either KV cache
    for variant in ("transformers generate", "steps through the model", "preallocated KV cache", "static KV cache"):
        assert f"{variant} (answers identical)" in table
