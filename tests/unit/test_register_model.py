"""deployment/register_model.py: the plan, the folder checks and the fp16 conversion.

No network and no Azure: downloading and registering are not exercised; ``--source`` stands
in for the hub snapshot. The conversion test builds a tiny BLIP-2 (blip2.tiny) and is marked
slow because importing torch and transformers dominates it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deployment" / "register_model.py"


@pytest.fixture(scope="module")
def rm():
    spec = importlib.util.spec_from_file_location("register_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_checkpoint(folder: Path, model_type: str = "blip-2") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    (folder / "model-00001-of-00001.safetensors").write_bytes(b"weights")
    (folder / "model.safetensors.index.json").write_text("{}")
    (folder / "preprocessor_config.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text('{"padding_side": "left"}')
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "vocab.json").write_text("{}")
    return folder


def test_dry_run_prints_the_plan_and_touches_nothing(rm, tmp_path, capsys):
    work = tmp_path / "work"
    assert rm.main(["--dry-run", "--fp16", "--work", str(work), "--workspace", "ws1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["download", "convert", "check", "register"]
    assert "Salesforce/blip2-opt-2.7b" in lines[0] and str(work / "hub" / "blip2-opt-2.7b") in lines[0]
    assert str(work / "blip2-opt-2.7b") in lines[1] and "2GB" in lines[1]
    assert "custom_model 'blip2-opt-2.7b'" in lines[3] and "ws1" in lines[3]
    assert not work.exists()
    assert rm.main(["--dry-run", "--source", str(tmp_path), "--skip-register"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["check"]


def test_check_model_folder(rm, tmp_path):
    good = fake_checkpoint(tmp_path / "good")
    assert rm.check_model_folder(good)["model_type"] == "blip-2"
    with pytest.raises(rm.FolderError, match="no config.json"):
        rm.check_model_folder(tmp_path)
    with pytest.raises(rm.FolderError, match="expected 'blip-2'"):
        rm.check_model_folder(fake_checkpoint(tmp_path / "clip", model_type="clip"))
    (good / "preprocessor_config.json").unlink()
    with pytest.raises(rm.FolderError, match="preprocessor_config.json nor processor_config.json"):
        rm.check_model_folder(good)
    (good / "processor_config.json").write_text("{}")  # what transformers 5 writes
    rm.check_model_folder(good)
    nowt = fake_checkpoint(tmp_path / "noweights")
    (nowt / "model-00001-of-00001.safetensors").unlink()
    with pytest.raises(rm.FolderError, match="no .safetensors"):
        rm.check_model_folder(nowt)
    notok = fake_checkpoint(tmp_path / "notokenizer")
    (notok / "vocab.json").unlink()  # transformers would build a near-empty tokenizer without it
    with pytest.raises(rm.FolderError, match="no tokenizer files"):
        rm.check_model_folder(notok)
    (notok / "tokenizer.json").write_text("{}")
    rm.check_model_folder(notok)


def test_copy_side_files_skips_weights_and_existing(rm, tmp_path):
    src = fake_checkpoint(tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "config.json").write_text('{"model_type": "blip-2", "dtype": "float16"}')
    copied = rm.copy_side_files(src, dst)
    assert copied == ["merges.txt", "preprocessor_config.json", "tokenizer_config.json", "vocab.json"]
    assert json.loads((dst / "config.json").read_text())["dtype"] == "float16"  # not overwritten


def test_main_with_a_local_source(rm, tmp_path, capsys):
    good = fake_checkpoint(tmp_path / "good")
    assert rm.main(["--source", str(good), "--skip-register"]) == 0
    assert f"model folder ready: {good}" in capsys.readouterr().out
    bad = fake_checkpoint(tmp_path / "bad", model_type="opt")
    assert rm.main(["--source", str(bad), "--skip-register"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("register_model: ") and err.count("\n") == 1


def test_script_imports_no_heavy_library():
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['register_model.py', '--dry-run']\n"
        f"try:\n    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'huggingface_hub', 'azure.ai.ml') if m in sys.modules]\n"
        "print('HEAVY:' + ','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "HEAVY:"


@pytest.mark.slow
def test_fp16_conversion_of_a_tiny_blip2(rm, tmp_path):
    pytest.importorskip("transformers")
    from safetensors import safe_open

    from blip2.tiny import make_tiny_blip2

    src = make_tiny_blip2(tmp_path / "src")
    dst = rm.convert_fp16(src, tmp_path / "blip2-tiny", max_shard_size="100KB")
    config = rm.check_model_folder(dst)
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
    dtypes = {}
    for shard in dst.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                dtypes[name] = f.get_slice(name).get_dtype()
    assert len(list(dst.glob("*.safetensors"))) > 1  # sharded by max_shard_size
    lm = {d for n, d in dtypes.items() if n.startswith("language_model.")}
    qformer = {d for n, d in dtypes.items() if n.startswith("qformer.")}
    assert lm == {"F16"}
    assert qformer == {"F32"}  # transformers keeps the Q-Former in fp32
    for name in ("processor_config.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (dst / name).is_file(), name
    import torch
    from transformers import Blip2ForConditionalGeneration

    loaded = Blip2ForConditionalGeneration.from_pretrained(dst, dtype="auto")
    assert loaded.language_model.dtype == torch.float16 and loaded.qformer.dtype == torch.float32
    with pytest.raises(rm.FolderError, match="not empty"):
        rm.convert_fp16(src, dst)
