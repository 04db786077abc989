"""bench/gpu.py must not rot: its --small mode runs the whole script on the CPU."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"


def load_bench(name: str):
    """A fresh copy of bench/gpu.py as a module (it imports the engine inside main())."""
    spec = importlib.util.spec_from_file_location(name, BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_small_writes_its_table(tmp_path):
    module = load_bench("bench_gpu")
    out = tmp_path / "gpu.md"
    assert module.main(["--small", "--tokens", "3", "--out", str(out)]) == 0
    table = out.read_text()
    for measure in ("vision + Q-Former", "decode step, batch 1", "end to end, 8 concurrent", "baseline: naive"):
        assert measure in table
    assert table.count("\n| ") >= 9
    # the engine's greedy loop (lean OPT steps) answers as transformers' generate does, and as the
    # loop does with its steps through the model, with either KV cache
    for variant in ("lean steps without CUDA graphs", "transformers generate", "steps through the model",
                    "preallocated KV cache", "static KV cache"):
        assert f"{variant} (answers identical)" in table
    assert "| CUDA graphs of the decode step | off (not on CUDA) |" in table


def test_gpu_bench_past_its_budget_skips_and_still_writes_the_table(tmp_path):
    module = load_bench("bench_gpu_budget")
    out = tmp_path / "gpu.md"
    assert module.main(["--small", "--tokens", "2", "--budget-s", "0", "--out", str(out)]) == 0
    table = out.read_text()
    assert "vision + Q-Former" in table and "baseline: naive" in table  # the issue's own rows always run
    assert "| end to end, 1 concurrent clients | skipped:" in table
    assert "| decode step, batch 1, static KV cache | skipped:" in table
    assert "total wall time" in table


def test_a_failing_decode_variant_is_reported_and_the_rest_still_run(tmp_path, monkeypatch):
    import blip2.engine

    class Broken(blip2.engine.Engine):
        def __init__(self, *args, static_cache=False, **kwargs):
            if static_cache:
                raise RuntimeError("compile failed\nlong traceback")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(blip2.engine, "Engine", Broken)
    module = load_bench("bench_gpu_broken")
    out = tmp_path / "gpu.md"
    assert module.main(["--small", "--tokens", "2", "--out", str(out)]) == 0
    table = out.read_text()
    assert "| decode step, batch 1, static KV cache | FAILED: RuntimeError: compile failed |" in table
    assert "transformers generate (answers identical)" in table and "total wall time" in table
