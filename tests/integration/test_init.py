"""score.init() loads the model from the places Azure and users put it, and fails clearly."""

from __future__ import annotations

import shutil

import pytest

from blip2.config import Settings
from blip2.model import ModelNotFound, find_blip2_folder, locate
from support import require_inference_server


def test_init_from_azureml_model_dir_nested(tiny_model_dir, tmp_path, monkeypatch):
    require_inference_server()
    import score

    nested = tmp_path / "registered" / "blip2-opt-2.7b" / "snapshot"
    shutil.copytree(tiny_model_dir, nested)
    (tmp_path / "registered" / "README.txt").write_text("not a model")
    for name in ("BLIP2_MODEL", "BLIP2_DTYPE", "BLIP2_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(tmp_path / "registered"))
    monkeypatch.setenv("BLIP2_MAX_BATCH_SIZE", "2")
    score.init()
    try:
        service = score._service
        assert service is not None
        import torch

        from blip2.model import default_dtype_name

        # no BLIP2_DTYPE: bf16 on a CPU with native bf16, else fp32 (the rule has its own unit tests)
        assert service.engine.dtype == getattr(torch, default_dtype_name("cpu"))
        assert next(service.engine.model.language_model.parameters()).dtype == service.engine.dtype
        assert service.engine.device.type == "cpu"
        assert service.engine.model.config.num_query_tokens == 32
    finally:
        score._service.close()
        score._service = None


def test_blip2_model_wins_over_azureml_model_dir(tiny_model_dir, tmp_path):
    settings = Settings.from_env({"BLIP2_MODEL": str(tiny_model_dir), "AZUREML_MODEL_DIR": str(tmp_path)})
    assert locate(settings).location == str(tiny_model_dir)


def test_find_prefers_shallowest_and_ignores_other_configs(tiny_model_dir, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text('{"model_type": "bert"}')
    shutil.copytree(tiny_model_dir, tmp_path / "b" / "deep")
    assert find_blip2_folder(tmp_path) == tmp_path / "b" / "deep"
    assert find_blip2_folder(tmp_path / "a") is None


def test_unfindable_weights_fail_with_one_clear_sentence(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(ModelNotFound) as info:
        from blip2 import model

        model.load(Settings.from_env({"BLIP2_MODEL": "no-such-org/no-such-blip2"}))
    message = str(info.value)
    assert "BLIP2_MODEL" in message and "no-such-org/no-such-blip2" in message
    assert "\n" not in message
    with pytest.raises(ModelNotFound, match="AZUREML_MODEL_DIR"):
        locate(Settings.from_env({"AZUREML_MODEL_DIR": str(tmp_path)}))


def test_fp16_keeps_the_qformer_in_fp32_and_answers(tiny_model_dir):
    import torch

    from blip2.params import GenerationParams
    from blip2.payload import Row, ScoreRequest
    from blip2.service import Service
    from support import b64, picture

    settings = Settings.from_env({"BLIP2_MODEL": str(tiny_model_dir), "BLIP2_DTYPE": "float16", "BLIP2_WARMUP": "0"})
    service = Service.from_settings(settings)
    try:
        model = service.engine.model
        assert model.vision_model.embeddings.patch_embedding.weight.dtype == torch.float16
        assert model.language_model.get_input_embeddings().weight.dtype == torch.float16
        assert next(model.qformer.parameters()).dtype == torch.float32
        rows = (Row(0, b64(picture(seed=1)), "Question: what is it? Answer:"), Row(1, b64(picture(seed=2)), ""))
        answers = service.score(ScoreRequest(rows, GenerationParams(max_new_tokens=4)))
        assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    finally:
        service.close()


def _damaged(tiny_model_dir, tmp_path, damage):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    damage(folder)
    from blip2 import model

    with pytest.raises(ModelNotFound) as info:
        model.load(Settings.from_env({"BLIP2_MODEL": str(folder), "BLIP2_DTYPE": "float32"}))
    message = str(info.value)
    assert str(folder) in message and "\n" not in message
    return message


def test_a_folder_without_its_tokenizer_files_fails_at_load_saying_so(tiny_model_dir, tmp_path):
    """transformers builds a near-empty tokenizer, without error, when the files are gone."""
    def drop(folder):
        for name in ("tokenizer.json", "vocab.json", "merges.txt"):
            (folder / name).unlink()

    message = _damaged(tiny_model_dir, tmp_path, drop)
    assert "tokenizer" in message and "missing" in message


def test_a_cut_off_weights_shard_names_the_folder_and_the_cause(tiny_model_dir, tmp_path):
    def cut(folder):
        shard = folder / "model-00002-of-00004.safetensors"
        shard.write_bytes(shard.read_bytes()[:5])

    message = _damaged(tiny_model_dir, tmp_path, cut)
    assert "incomplete or a file in it is damaged" in message and "(" in message


def test_a_missing_shard_is_reported_as_an_incomplete_folder(tiny_model_dir, tmp_path):
    message = _damaged(tiny_model_dir, tmp_path, lambda folder: (folder / "model-00003-of-00004.safetensors").unlink())
    assert "incomplete" in message and "huggingface-cli" not in message


def test_a_config_without_image_token_index_asks_for_a_current_revision(tiny_model_dir, tmp_path):
    import json

    def old(folder):
        config = json.loads((folder / "config.json").read_text())
        config.pop("image_token_index", None)
        config.pop("image_token_id", None)
        (folder / "config.json").write_text(json.dumps(config))

    message = _damaged(tiny_model_dir, tmp_path, old)
    assert "image_token_index" in message and "revision" in message


@pytest.mark.parametrize("device", ["cuda:x", "cudaX", "cuda:-1", "gpu"])
def test_a_malformed_device_names_the_variable(device):
    with pytest.raises(ValueError, match="BLIP2_DEVICE"):
        Settings.from_env({"BLIP2_DEVICE": device})


def test_an_absurd_size_in_megabytes_names_the_variable():
    with pytest.raises(ValueError, match="BLIP2_MAX_BODY_MB"):
        Settings.from_env({"BLIP2_MAX_BODY_MB": "1e308"})
