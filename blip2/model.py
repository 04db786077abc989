"""Find the BLIP-2 weights, load model and processor, pick device and dtype.

Sources, first match wins:
1. ``BLIP2_MODEL``: ``demo`` (the toy model shipped in this package), a local folder, or a hub id;
2. ``AZUREML_MODEL_DIR``: the registered model's folder; the files may sit folders below it,
   so the folder whose ``config.json`` says ``"model_type": "blip-2"`` is used;
3. ``Salesforce/blip2-opt-2.7b`` from the Hugging Face hub.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_MODEL, Settings

log = logging.getLogger("blip2.model")

DEMO_DIR = Path(__file__).parent / "demo_model"
_MAX_SEARCH_DEPTH = 4


class ModelNotFound(RuntimeError):
    """No weights could be found or fetched; the message says what was tried."""


@dataclass(frozen=True)
class ModelSource:
    location: str  # local folder or hub id
    origin: str  # which setting chose it, for the log
    is_demo: bool = False


@dataclass
class LoadedModel:
    model: object  # Blip2ForConditionalGeneration
    processor: object  # Blip2Processor, tokenizer padding on the left
    device: object  # torch.device
    dtype: object  # torch.dtype of the vision tower and language model
    source: ModelSource


def find_blip2_folder(root: str | Path, max_depth: int = _MAX_SEARCH_DEPTH) -> Path | None:
    """The shallowest folder at or below ``root`` whose config.json has model_type blip-2."""
    root = Path(root)
    level = [root]
    for _ in range(max_depth + 1):
        for folder in sorted(level):
            if _is_blip2_folder(folder):
                return folder
        level = [child for folder in level if folder.is_dir() for child in sorted(folder.iterdir()) if child.is_dir()]
        if not level:
            break
    return None


def _is_blip2_folder(folder: Path) -> bool:
    config = folder / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == "blip-2"
    except (OSError, ValueError):
        return False


def locate(settings: Settings) -> ModelSource:
    """Decide where the weights come from; raises ModelNotFound for a named source that is unusable."""
    if settings.model:
        if settings.model == "demo":
            return ModelSource(str(DEMO_DIR), "BLIP2_MODEL=demo (toy model for offline use and tests, not BLIP-2)", True)
        path = Path(settings.model).expanduser()
        if path.exists():
            folder = find_blip2_folder(path)
            if folder is None:
                raise ModelNotFound(
                    f"BLIP2_MODEL points at {path}, but no config.json with model_type 'blip-2' is in it or below it; "
                    "point BLIP2_MODEL at the folder that holds the model's config.json and weights."
                )
            return ModelSource(str(folder), "BLIP2_MODEL (local folder)")
        return ModelSource(settings.model, "BLIP2_MODEL (hub id)")
    if settings.azureml_model_dir:
        folder = find_blip2_folder(settings.azureml_model_dir)
        if folder is None:
            raise ModelNotFound(
                f"AZUREML_MODEL_DIR is {settings.azureml_model_dir}, but no config.json with model_type 'blip-2' is "
                "in it or up to 4 folders below; register the folder that holds the BLIP-2 files, or set BLIP2_MODEL."
            )
        return ModelSource(str(folder), "AZUREML_MODEL_DIR")
    return ModelSource(DEFAULT_MODEL, "default hub id")


# /proc/cpuinfo flags of CPUs that do bf16 arithmetic in hardware: AVX512-BF16 (Intel Cooper Lake and
# later, AMD Zen 4 and later) and AMX (Intel Sapphire Rapids and later). Elsewhere torch emulates bf16,
# which is slower than fp32.
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU's flags (Linux ``/proc/cpuinfo``, or ``cpuinfo`` text) include native bf16."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool(_NATIVE_BF16_FLAGS & set(line.partition(":")[2].split()))
    return False


def default_dtype_name(device_type: str) -> str:
    """fp16 on CUDA; on a CPU bf16 where it is native (half the memory, about 1.7x the matmul rate
    measured on an AMD EPYC with AVX512-BF16), else fp32."""
    if device_type == "cuda":
        return "float16"
    return "bfloat16" if device_type == "cpu" and cpu_has_native_bf16() else "float32"


def pick_device_and_dtype(settings: Settings):
    """(torch.device, torch.dtype): CUDA when present, else CPU; dtype from BLIP2_DTYPE or ``default_dtype_name``."""
    import torch

    if settings.device:
        device = torch.device(settings.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("BLIP2_DEVICE asks for CUDA but no CUDA device is visible; unset BLIP2_DEVICE or set it to cpu.")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"BLIP2_DEVICE is {settings.device}, but only {torch.cuda.device_count()} CUDA device(s) "
                             "are visible (numbered from 0); set it to one of them, or to cuda.")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = settings.dtype or default_dtype_name(device.type)
    return device, getattr(torch, name)


def load(settings: Settings) -> LoadedModel:
    """Load model and processor from the located source; logs source, dtype, device, size and time."""
    import torch
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    source = locate(settings)
    device, dtype = pick_device_and_dtype(settings)
    started = time.perf_counter()
    if source.is_demo:
        log.warning("Serving the DEMO model: a tiny toy trained on coloured shapes, for offline use and tests. It is not BLIP-2.")
    local = Path(source.location).is_dir()
    try:
        processor = AutoProcessor.from_pretrained(source.location)
        model = Blip2ForConditionalGeneration.from_pretrained(source.location, dtype=dtype)
    except OSError as exc:
        raise ModelNotFound(_not_found_message(settings, source, exc)) from exc
    except (MemoryError, ImportError):  # not the folder's fault: as they are
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file (a cut-off shard, broken JSON): say which folder
        if not local:
            raise
        raise ModelNotFound(_not_found_message(settings, source, exc)) from exc
    check_processor(model.config, processor, source.location)
    processor.tokenizer.padding_side = "left"
    model.to(device).eval()
    torch.set_grad_enabled(False)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "Loaded BLIP-2 from %s (%s): dtype %s, device %s, %.1fM parameters, %.1f s",
        source.location, source.origin, str(dtype).replace("torch.", ""), device, n_params / 1e6,
        time.perf_counter() - started,
    )
    return LoadedModel(model=model, processor=processor, device=device, dtype=dtype, source=source)


def check_processor(config, processor, location: str) -> None:
    """The tokenizer must be the model's: transformers builds a near-empty one, without error,
    from a folder whose tokenizer files are missing, and the failure would come much later."""
    image_id = getattr(config, "image_token_index", None)
    if image_id is None:
        raise ModelNotFound(
            f"The model in {location} has no image_token_index in its config.json: it is an older revision of "
            "the checkpoint, which transformers 5 cannot run. Download the current revision of "
            "Salesforce/blip2-opt-2.7b (or register it again)."
        )
    tokenizer = processor.tokenizer
    image_token = getattr(processor, "image_token", "<image>")
    image_token = str(getattr(image_token, "content", image_token))  # an AddedToken in some versions
    if tokenizer.pad_token_id is None or len(tokenizer) <= image_id or tokenizer.convert_tokens_to_ids(image_token) != image_id:
        raise ModelNotFound(
            f"The tokenizer in {location} does not belong to the model (it has {len(tokenizer)} tokens, and "
            f"{image_token!r} is not token {image_id}): its tokenizer files (tokenizer.json, or vocab.json and "
            "merges.txt, with tokenizer_config.json and special_tokens_map.json) are missing or from another "
            "model. Copy them from the model's hub files into that folder."
        )


def _not_found_message(settings: Settings, source: ModelSource, cause: BaseException | None = None) -> str:
    why = f" ({type(cause).__name__}: {' '.join(str(cause).split())[:300]})" if cause is not None else ""
    if Path(source.location).is_dir():  # a folder that is there but will not load: incomplete or damaged
        return (
            f"Could not load BLIP-2 from {source.location} ({source.origin}){why}. The folder is incomplete or a "
            "file in it is damaged (an interrupted download or upload?); download or register the model again."
        )
    tried = []
    if settings.model:
        tried.append(f"BLIP2_MODEL={settings.model}")
    elif settings.azureml_model_dir:
        tried.append(f"AZUREML_MODEL_DIR={settings.azureml_model_dir}")
    else:
        tried.append("BLIP2_MODEL (unset), AZUREML_MODEL_DIR (unset)")
    tried.append(f"{source.location} ({source.origin})")
    offline = " (offline?)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return (
        f"Could not load BLIP-2 weights{offline}{why}: tried {', then '.join(tried)}; download the model once "
        "(e.g. `huggingface-cli download Salesforce/blip2-opt-2.7b --local-dir ./blip2-opt-2.7b`) and set "
        "BLIP2_MODEL to that folder, or set BLIP2_MODEL=demo for the offline toy model."
    )
