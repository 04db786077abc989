"""Small BLIP-2 models in the real hub layout, for tests, the demo model and benchmarks.

The real ``Salesforce/blip2-opt-2.7b`` repo holds a ``Blip2Config`` (EVA ViT-g, a
Q-Former, OPT-2.7b) with ``image_token_index`` and ``num_query_tokens`` 32, sharded
safetensors, a GPT-2 style byte-level BPE tokenizer that knows ``<image>`` and puts
``</s>`` first, a ``BlipImageProcessor`` and a ``processor_config.json``. This module
writes the same layout with a tiny configuration, so that every loading path the
service uses on the real model is exercised here without downloading it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Words the tiny tokenizer learns merges for; any other text still encodes byte by byte.
_CORPUS = """
Question: what color is the shape? Answer: red
Question: what shape is this? Answer: circle
What is in the picture? Answer: a stream in the desert
what are people doing? Answer: they're buying coffee
a red circle. a green square. a blue triangle. a yellow circle. a purple square.
an orange triangle. the dog is on the grass. two people sit at a table with cups.
How many cats are there? Answer: two. Is it raining? Answer: no, it is sunny.
"""

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class TinySizes:
    """Widths and depths of a small BLIP-2; the defaults build in about a second."""

    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    patch_size: int = 32
    image_size: int = 224
    qformer_hidden: int = 32
    qformer_layers: int = 2
    qformer_heads: int = 2
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 2
    num_query_tokens: int = 32
    vocab_target: int = 600


def build_tokenizer(vocab_target: int = 600, extra_corpus: str = ""):
    """Train a byte-level BPE tokenizer shaped like OPT's.

    Returns a transformers ``GPT2Tokenizer`` with ``</s>`` as bos/eos (prepended to
    every text, as OPT does), ``<pad>``, ``<unk>`` and the special ``<image>`` token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in (_CORPUS + extra_corpus).splitlines() if line.strip()]
    bpe.train_from_iterator(lines * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = GPT2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
    )
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer


def build_config(tokenizer, sizes: TinySizes = TinySizes()):
    """A ``Blip2Config`` with OPT as the language model, sized by ``sizes``."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    vision = Blip2VisionConfig(
        hidden_size=sizes.vision_hidden,
        intermediate_size=sizes.vision_hidden * 4,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        initializer_range=0.02,  # the class default (1e-10) starts a dead tower
    )
    qformer = Blip2QFormerConfig(
        hidden_size=sizes.qformer_hidden,
        num_hidden_layers=sizes.qformer_layers,
        num_attention_heads=sizes.qformer_heads,
        intermediate_size=sizes.qformer_hidden * 4,
        encoder_hidden_size=sizes.vision_hidden,
        cross_attention_frequency=1,
    )
    newline = tokenizer.convert_tokens_to_ids("Ċ")  # answers end at "\n", like blip2-opt-2.7b
    text = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.text_hidden,
        word_embed_proj_dim=sizes.text_hidden,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        ffn_dim=sizes.text_hidden * 4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=newline,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=sizes.num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )


def build_processor(tokenizer, sizes: TinySizes = TinySizes()):
    """A ``Blip2Processor``: BLIP image processor (bicubic, CLIP normalisation) + tokenizer."""
    from transformers import BlipImageProcessor, Blip2Processor

    image_processor = BlipImageProcessor(
        size={"height": sizes.image_size, "width": sizes.image_size},
        resample=3,  # bicubic
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    return Blip2Processor(image_processor, tokenizer, num_query_tokens=sizes.num_query_tokens)


def build_model(config, seed: int = 0):
    """A randomly initialised ``Blip2ForConditionalGeneration`` (query tokens re-drawn, std 0.02)."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)  # zeros by default: every query would be the same
    return model.eval()


def save_hub_layout(model, processor, path: str | Path, max_shard_size: str = "200KB") -> Path:
    """Write model + processor like the hub repo: sharded safetensors, vocab.json, merges.txt."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    processor.save_pretrained(path)
    tokenizer = processor.tokenizer
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (path / "vocab.json").write_text(json.dumps(spec["vocab"], ensure_ascii=False))
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["merges"]]
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return path


def make_tiny_blip2(path: str | Path, sizes: TinySizes = TinySizes(), seed: int = 0) -> Path:
    """Build and save a random tiny BLIP-2 in the hub layout; returns ``path``."""
    tokenizer = build_tokenizer(sizes.vocab_target)
    config = build_config(tokenizer, sizes)
    model = build_model(config, seed=seed)
    return save_hub_layout(model, build_processor(tokenizer, sizes), path)
