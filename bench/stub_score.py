"""Entry scripts for bench/cpu_path.py: the service's own request path with the model stubbed out,
and a bare azmlinfsrv entry script as the floor. Written for the benchmark only.

``BENCH_STUB=service`` (default): ``score.py`` as it is, except that each model batch answers
"x" per row at once. Parsing, base64, image decoding and resizing, tokenising, the batcher and
the thread hand-offs all run; the vision tower and the language model do not.
``BENCH_STUB=bare``: ``run()`` answers ``[{"text": "x"}]`` without reading the body.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from azureml_inference_server_http.api.aml_request import rawhttp  # noqa: E402

import score  # noqa: E402

BARE = os.environ.get("BENCH_STUB") == "bare"


def init():
    if BARE:
        return
    score.init()
    score._service.batcher.run_batch = lambda items, params: ["x"] * len(items)


@rawhttp
def run(request):
    if BARE:
        return [{"text": "x"}]
    return score.run(request)
