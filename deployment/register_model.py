"""Download BLIP-2 once, optionally convert it to fp16, and register it in Azure ML.

Usage (from the repository root)::

    python deployment/register_model.py --fp16 \\
        --subscription SUB --resource-group RG --workspace WS
    python deployment/register_model.py --fp16 --skip-register   # prepare the folder only
    python deployment/register_model.py --dry-run                # print the plan, do nothing

Steps:

1. ``huggingface_hub.snapshot_download`` of ``Salesforce/blip2-opt-2.7b`` (safetensors,
   configs and tokenizer files only; no ``.bin`` duplicates) into ``<work>/hub/<name>``.
2. ``--fp16``: load with ``transformers`` in ``dtype=float16`` and ``save_pretrained`` as
   safetensors shards of ``--max-shard-size`` into ``<work>/<name>``; the processor and
   tokenizer files are copied unchanged. The Q-Former and query tokens stay fp32 (transformers
   keeps them so). The upload shrinks from about 15.5 GB to about 7.7 GB, and the container
   loads it faster. Without ``--fp16`` the downloaded files are used as they are.
3. Register the folder as a ``custom_model`` asset with ``azure-ai-ml``. In the container
   ``AZUREML_MODEL_DIR`` points at the registered asset; the files sit one folder below it
   (the folder's own name, ``<name>``), where ``score.init()`` finds the ``config.json`` whose
   ``model_type`` is ``blip-2``.

``<work>`` defaults to ``~/.cache/blip2-endpoint``: outside the repository on purpose, since the
deployment uploads the repository root as its code folder and must not carry the weights.

Heavy libraries (torch, transformers, huggingface_hub, azure-ai-ml) are imported inside the
functions that need them, so ``--dry-run`` and ``--help`` run with the standard library only.
Exit status: 0 on success, 2 on a usage or folder problem (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

DEFAULT_MODEL_ID = "Salesforce/blip2-opt-2.7b"
DEFAULT_NAME = "blip2-opt-2.7b"
# Files worth downloading: weights as safetensors, every config, the tokenizer.
DOWNLOAD_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.model"]
DEFAULT_WORK = Path.home() / ".cache" / "blip2-endpoint"
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class FolderError(Exception):
    """The model folder is missing something the service needs."""


def check_model_folder(folder: Path) -> dict:
    """Check that ``folder`` holds a loadable BLIP-2 and return its ``config.json`` as a dict.

    Requires ``config.json`` with ``"model_type": "blip-2"``, at least one ``.safetensors``
    file and the image processor settings (``preprocessor_config.json`` as on the hub, or the
    ``processor_config.json`` transformers 5 writes) and the tokenizer's files. Raises ``FolderError``
    saying what is missing.
    """
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FolderError(f"{folder} has no config.json; point --source at a BLIP-2 checkpoint folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FolderError(f"{config_path} is not readable JSON ({exc.__class__.__name__})") from None
    if config.get("model_type") != "blip-2":
        raise FolderError(f"{config_path} has model_type {config.get('model_type')!r}, expected 'blip-2'")
    if not any(folder.glob("*.safetensors")):
        raise FolderError(f"{folder} has no .safetensors weights")
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        raise FolderError(f"{folder} has neither {' nor '.join(PROCESSOR_FILES)} (the image processor settings)")
    if not ((folder / "tokenizer.json").is_file() or all((folder / n).is_file() for n in ("vocab.json", "merges.txt"))):
        raise FolderError(f"{folder} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt)")
    return config


def download(model_id: str, dest: Path, revision: str | None = None) -> Path:
    """Download the hub snapshot of ``model_id`` into ``dest`` (resumable) and return ``dest``."""
    from huggingface_hub import snapshot_download

    dest.mkdir(parents=True, exist_ok=True)
    snapshot_download(repo_id=model_id, revision=revision, local_dir=dest, allow_patterns=DOWNLOAD_PATTERNS)
    return dest


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the non-weight files of ``src`` (processor, tokenizer) that ``dst`` lacks.

    Weight files and shard indexes are skipped (``dst`` has its own). Returns the copied names.
    """
    copied = []
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name.endswith(WEIGHT_SUFFIXES) or path.name.endswith(".index.json"):
            continue
        if (dst / path.name).exists():
            continue
        shutil.copy2(path, dst / path.name)
        copied.append(path.name)
    return copied


def convert_fp16(src: Path, dst: Path, max_shard_size: str = "2GB") -> Path:
    """Rewrite the checkpoint in ``src`` as float16 safetensors shards in ``dst``; return ``dst``.

    ``dst`` must not exist yet or be empty. Modules transformers keeps in fp32 (the Q-Former)
    stay fp32. transformers 5 always writes safetensors, so there is no format switch to pass.
    """
    import torch
    from transformers import Blip2ForConditionalGeneration

    if dst.exists() and any(dst.iterdir()):
        raise FolderError(f"{dst} is not empty; remove it or choose another --work folder")
    dst.mkdir(parents=True, exist_ok=True)
    model = Blip2ForConditionalGeneration.from_pretrained(src, dtype=torch.float16)
    model.save_pretrained(dst, max_shard_size=max_shard_size)
    # save_pretrained records the dtype of the first parameter, the fp32 query tokens; the
    # folder is float16, which is what dtype="auto" should load.
    config_path = dst / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["dtype"] = "float16"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    copy_side_files(src, dst)
    return dst


def register(folder: Path, name: str, args: argparse.Namespace) -> str:
    """Register ``folder`` as a ``custom_model`` asset named ``name``; return ``name:version``."""
    from azure.ai.ml import MLClient
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Model
    from azure.identity import DefaultAzureCredential

    credential = DefaultAzureCredential()
    if args.subscription and args.resource_group and args.workspace:
        client = MLClient(credential, args.subscription, args.resource_group, args.workspace)
    else:  # a config.json written by the Azure ML studio or `az ml workspace show`
        client = MLClient.from_config(credential=credential)
    model = Model(
        path=str(folder),
        name=name,
        version=args.version,
        type=AssetTypes.CUSTOM_MODEL,
        description=f"{args.model_id} for the blip2-endpoint scoring service",
        tags={"source": args.model_id, "dtype": "float16" if args.fp16 else "float32"},
    )
    created = client.models.create_or_update(model)
    return f"{created.name}:{created.version}"


def plan(args: argparse.Namespace) -> list[str]:
    """The steps this invocation would take, as human-readable lines."""
    work = Path(args.work)
    source = Path(args.source) if args.source else work / "hub" / args.name
    final = work / args.name if args.fp16 else source
    steps = []
    if not args.source:
        steps.append(f"download {args.model_id} ({', '.join(DOWNLOAD_PATTERNS)}) into {source}")
    if args.fp16:
        steps.append(f"convert to float16 safetensors (shards of {args.max_shard_size}) into {final}")
    steps.append(f"check {final}: config.json model_type 'blip-2', safetensors, processor settings")
    if not args.skip_register:
        where = args.workspace or "the workspace in ./config.json"
        steps.append(f"register {final} as custom_model '{args.name}' (version {args.version or 'next'}) in {where}")
    return steps


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-id", default=DEFAULT_MODEL_ID, help="hub repository (default %(default)s)")
    p.add_argument("--revision", default=None, help="hub revision: branch, tag or commit")
    p.add_argument("--source", default=None, help="use this local checkpoint folder instead of downloading")
    p.add_argument("--work", default=str(DEFAULT_WORK), help="working folder (default %(default)s)")
    p.add_argument("--fp16", action="store_true", help="convert to float16 safetensors before registering")
    p.add_argument("--max-shard-size", default="2GB", help="shard size for --fp16 (default %(default)s)")
    p.add_argument("--name", default=DEFAULT_NAME, help="model asset name (default %(default)s)")
    p.add_argument("--version", default=None, help="model asset version (default: next free)")
    p.add_argument("--subscription", default=None)
    p.add_argument("--resource-group", default=None)
    p.add_argument("--workspace", default=None)
    p.add_argument("--skip-register", action="store_true", help="prepare the folder only")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run:
        for step in plan(args):
            print(step)
        return 0
    work = Path(args.work)
    try:
        source = Path(args.source) if args.source else download(args.model_id, work / "hub" / args.name, args.revision)
        folder = convert_fp16(source, work / args.name, args.max_shard_size) if args.fp16 else source
        check_model_folder(folder)
    except FolderError as exc:
        print(f"register_model: {exc}", file=sys.stderr)
        return 2
    print(f"model folder ready: {folder}")
    if args.skip_register:
        return 0
    print(f"registered {register(folder, args.name, args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
