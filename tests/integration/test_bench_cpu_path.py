"""bench/cpu_path.py must not rot: a short run starts both servers, checks every answer and prints the rates."""

import importlib.util
import re
import sys
from pathlib import Path

from support import require_inference_server

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_cpu_path_bench_runs_both_servers_and_reports_the_share(capsys, monkeypatch):
    require_inference_server()
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_cpu_path", BENCH / "cpu_path.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--requests", "40", "--rounds", "2", "--clients", "4", "--threads", "4"])
    out = capsys.readouterr().out
    rates = re.findall(r"^  (score\.py, model stubbed|floor: bare entry script).*?([\d.]+) req/s", out, re.M)
    assert [name for name, _ in rates] == ["score.py, model stubbed", "floor: bare entry script"]
    assert all(float(rate) > 0 for _, rate in rates)
    share = re.search(r"runs at (\d+)% of the bare server's rate", out)
    assert share and 0 < int(share.group(1))
    sys.modules.pop("serve", None)  # bench/serve.py was imported by name; leave no trace for other tests
