"""A real azmlinfsrv process serving score.py on a free loopback port (used by the integration tests)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from support import require_inference_server

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir, log_path: Path, extra_env: dict | None = None, threads: int = 8):
        require_inference_server()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BLIP2_", "AZUREML_"))}
        env.update(
            BLIP2_MODEL=str(model_dir),
            BLIP2_ALLOW_PRIVATE_URLS="1",  # the tests' image host is on loopback
            BLIP2_MAX_BATCH_SIZE="8",
            # fp32, whatever the CPU: tests compare exact answers of random-weight models across batch
            # compositions, which half precision does not keep (its last bits follow the batch's shape)
            BLIP2_DTYPE="float32",
            BLIP2_BATCH_WAIT_MS="5",
            GUNICORN_CMD_ARGS=f"--threads {threads}",
            AML_APP_ROOT=str(REPO),  # where azmlinfsrv looks for swagger.json
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra_env or {})
        exe = shutil.which("azmlinfsrv", path=str(Path(sys.executable).parent)) or "azmlinfsrv"
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [exe, "--entry_script", str(REPO / "score.py"), "--port", str(self.port)],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"azmlinfsrv exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if requests.get(self.url + "/", timeout=2).status_code == 200 and "Ready to serve" in self.log():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"azmlinfsrv did not become healthy in {timeout} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def score(self, body, **kwargs) -> requests.Response:
        if isinstance(body, (dict, list)):
            return requests.post(self.url + "/score", json=body, timeout=120, **kwargs)
        return requests.post(self.url + "/score", data=body, timeout=120, **kwargs)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()
