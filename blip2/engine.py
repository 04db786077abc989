"""Batched BLIP-2 generation: image embeddings (cached per image) + OPT decoding.

Knows nothing of HTTP. ``Engine.generate`` takes rows that already carry their
preprocessed pixels (or a cache key that hits) and returns one answer per row,
computed in batches of at most ``max_batch_size`` with left padding, the prompt
sliced off and surrounding whitespace stripped. It reproduces what
``Blip2ForConditionalGeneration.generate`` does for one row, for whole batches.
Plain greedy requests decode in ``GreedyDecoder``'s short loop; everything else
(beams, sampling, penalties, the static cache) goes through transformers' ``generate``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from . import modelthread
from .cache import EmbedCache
from .errors import InvalidInput, ServiceError
from .greedy import GreedyDecoder
from .params import GenerationParams
from .preprocess import Preprocessor

log = logging.getLogger("blip2.engine")


@dataclass
class GenItem:
    """One row ready for the model: its image as pixels (3 x H x W) or as a cached embedding."""

    key: str  # content hash of the image bytes
    pixels: torch.Tensor | None  # uint8 after the resize (normalised on the device), or already normalised floats
    prompt: str
    embed: torch.Tensor | None = None  # num_query_tokens x hidden, from the cache
    prompt_ids: list[int] | None = None  # the prompt's token ids, when the caller has them already


def _graph_budget_mb(device: torch.device, asked: float | None) -> float:
    """MB of keys and values for CUDA-graph decode steps: 0 off the GPU; by default 4096 or a
    quarter of the free GPU memory, whichever is less."""
    if device.type != "cuda":
        return 0.0
    if asked is not None:
        return float(asked)
    free, _ = torch.cuda.mem_get_info(device)
    return min(4096.0, free / 4 / 2**20)


class RowTooLarge(ServiceError):
    status = 503
    code = "out_of_memory"


class Engine:
    def __init__(
        self, model, processor, *, device, dtype, max_batch_size: int = 16, cache: EmbedCache | None = None,
        static_cache: bool = False, fast_greedy: bool = True, preallocate_kv: bool = False, lean_steps: bool = True,
        cuda_graph_mb: float | None = None,
    ):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.pixel_norm = Preprocessor.from_processor(processor)
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.cache = cache
        # A static KV cache keeps decode shapes fixed; on CUDA transformers then compiles the
        # decode step. Greedy answers are the same as with the dynamic cache (tested).
        self._cache_kwargs = {"cache_implementation": "static"} if static_cache else {}
        # plain greedy requests skip generate's per-step machinery (same tokens, tested); not with a static cache
        # the loop's decode steps run as plain tensor ops for OPT (lean_steps); preallocate_kv (the model's own
        # steps over transformers' StaticCache) and lean_steps=False are for bench/gpu.py's comparison
        # on CUDA the lean steps replay as CUDA graphs, their keys and values within cuda_graph_mb (None: auto, 0: off)
        graph_mb = _graph_budget_mb(self.device, cuda_graph_mb)
        self.greedy = GreedyDecoder(
            model.language_model, processor.tokenizer.pad_token_id, preallocate=preallocate_kv, lean=lean_steps,
            graph_budget_bytes=int(graph_mb * 1024 * 1024), graph_rows=max_batch_size,
        )
        self.fast_greedy = fast_greedy and not static_cache
        if self.fast_greedy and self.greedy.blockers:
            log.info("Greedy requests go through generate: the generation config sets %s", ", ".join(self.greedy.blockers))
        elif self.fast_greedy and self.greedy.lean_unsupported not in (None, "off", "preallocate"):
            log.info("Greedy decode steps go through the model: %s", self.greedy.lean_unsupported)
        elif self.fast_greedy and self.greedy.graphs is not None:
            log.info("Greedy decode steps replay as CUDA graphs, keys and values within %.0f MB", graph_mb)
        config = model.config
        self.image_token_id = config.image_token_index
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        # image tokens + prompt + answer must fit the language model's position table
        self.max_positions = getattr(config.text_config, "max_position_embeddings", None)
        self.num_query_tokens = config.num_query_tokens
        self.pad_id = self.tokenizer.pad_token_id
        self._lock = threading.Lock()  # one batch on the device at a time
        self.images_embedded = 0  # images run through the vision tower and Q-Former
        self.rows_cached = 0  # rows whose image embedding came from the cache or an earlier row of the batch

    # -- text -----------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt as the model sees it (``</s>`` first), without image tokens."""
        return self.tokenizer(prompts, add_special_tokens=True)["input_ids"]

    # -- images ---------------------------------------------------------------------------
    def preprocess(self, images) -> torch.Tensor:
        """PIL images -> normalised pixel tensor (B x 3 x H x W, float32, CPU) via the model's processor."""
        return self.processor.image_processor(images, return_tensors="pt")["pixel_values"]

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B x 3 x H x W) -> the language model's image inputs (B x num_query_tokens x hidden)."""
        model = self.model
        pixels = pixels.to(self.device, self.dtype)
        image_embeds = model.vision_model(pixel_values=pixels, return_dict=True).last_hidden_state
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_output = model.qformer(
            query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=mask, return_dict=True
        ).last_hidden_state
        if query_output.dtype != image_embeds.dtype:  # the Q-Former stays fp32 in transformers
            query_output = query_output.to(image_embeds.dtype)
        return model.language_projection(query_output)

    def _image_inputs(self, items: list[GenItem]) -> torch.Tensor:
        """One embedding per row; each distinct image runs the vision tower once, cached across calls."""
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, torch.Tensor] = {}
        for item in items:
            if item.key in found or item.key in todo:
                continue
            cached = item.embed
            if cached is None and self.cache is not None:
                cached = self.cache.get(item.key)
            if cached is not None:
                found[item.key] = cached
            elif item.pixels is None:
                raise ValueError(f"row for image {item.key[:12]} has neither pixels nor an embedding")
            else:
                todo[item.key] = item.pixels
        if todo:
            keys = list(todo)
            embeds = self.embed_images(self._pixel_batch([todo[k] for k in keys]))
            for key, embed in zip(keys, embeds):
                found[key] = embed
                if self.cache is not None:
                    self.cache.put(key, embed)
        self.images_embedded += len(todo)
        self.rows_cached += len(items) - len(todo)
        return torch.stack([found[item.key] for item in items])

    def _pixel_batch(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """Rows of pixels -> one normalised float batch on the device (uint8 rows travel 4x smaller)."""
        if all(p.dtype == torch.uint8 for p in pixels):
            return self.pixel_norm.normalize(torch.stack(pixels).to(self.device))
        return torch.stack([self.pixel_norm.normalize(p) if p.dtype == torch.uint8 else p for p in pixels])

    # -- generation -----------------------------------------------------------------------
    def generate(self, items: list[GenItem], params: GenerationParams) -> list[str]:
        """Answers for ``items`` in order, in chunks of ``max_batch_size``; CUDA OOM splits a chunk.

        Runs on the process's model thread (``blip2.modelthread``), whichever thread calls it.
        """
        return modelthread.run(self._generate_chunks, items, params)

    def _generate_chunks(self, items: list[GenItem], params: GenerationParams) -> list[str]:
        answers: list[str] = []
        for start in range(0, len(items), self.max_batch_size):
            answers.extend(self._generate_splitting(items[start : start + self.max_batch_size], params))
        return answers

    def _generate_splitting(self, items: list[GenItem], params: GenerationParams) -> list[str]:
        try:
            # inference_mode: no autograd records for the vision tower (generate only covers the LM)
            with self._lock, torch.inference_mode():
                return self._generate_batch(items, params)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(items) == 1:
                raise RowTooLarge(
                    "This row does not fit in GPU memory even on its own; lower max_new_tokens or num_beams and retry.",
                ) from None
            half = len(items) // 2
            log.warning("Out of memory on a batch of %d rows; retrying as %d + %d", len(items), half, len(items) - half)
            return self._generate_splitting(items[:half], params) + self._generate_splitting(items[half:], params)

    def lm_inputs(self, items: list[GenItem]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, inputs_embeds) of the batch, image embeddings in place of the image tokens."""
        input_ids, attention_mask = self._pack(items)  # first: it checks the prompts
        image_inputs = self._image_inputs(items)
        inputs_embeds = self.model.get_input_embeddings()(input_ids)
        image_mask = (input_ids == self.image_token_id).unsqueeze(-1)
        inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_inputs.to(inputs_embeds.dtype))
        return input_ids, attention_mask, inputs_embeds

    def _generate_batch(self, items: list[GenItem], params: GenerationParams) -> list[str]:
        input_ids, attention_mask, inputs_embeds = self.lm_inputs(items)
        if self.fast_greedy and self.greedy.handles(params):
            new_tokens = self.greedy(inputs_embeds, attention_mask, params.max_new_tokens, params.min_new_tokens)
        else:
            output = self.model.language_model.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                input_ids=input_ids,
                pad_token_id=self.pad_id,
                **self._cache_kwargs,
                **params.generate_kwargs(),
            )
            new_tokens = output[:, input_ids.shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [text.strip() for text in texts]

    def _pack(self, items: list[GenItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids ``[pad..., <image> x Q, </s>, prompt...]`` and their attention mask."""
        missing = [item.prompt for item in items if item.prompt_ids is None]
        fresh = iter(self.tokenize(missing) if missing else [])
        image_part = [self.image_token_id] * self.num_query_tokens
        rows = [image_part + (item.prompt_ids if item.prompt_ids is not None else next(fresh)) for item in items]
        for row in rows:  # more image slots than embeddings would misplace them (the service refuses such prompts)
            if row.count(self.image_token_id) != self.num_query_tokens:
                raise InvalidInput(f"A prompt contains {self.image_token!r}, which the model reserves for the image; remove it.",
                                   code="invalid_text")
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def warm_up(self, batch_size: int | None = None) -> None:
        """Run one full-size dummy batch so memory and one-off costs show at start-up."""
        size = self.processor.image_processor.size
        pixels = torch.zeros(3, size["height"], size["width"])
        n = batch_size or self.max_batch_size
        items = [GenItem(key=f"warmup-{i}", pixels=pixels, prompt="Question: what is this? Answer:") for i in range(n)]
        # with CUDA graphs, a default request's answer length: its keys/values buffers and graph are made now
        tokens = GenerationParams().max_new_tokens if self.greedy.graphs is not None else 2
        cache, self.cache = self.cache, None  # keep the dummy images out of the cache
        counts = self.images_embedded, self.rows_cached  # and out of the counts
        try:
            self.generate(items, GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens))
        finally:
            self.cache = cache
            self.images_embedded, self.rows_cached = counts
