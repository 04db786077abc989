"""Greedy decoding in a short loop of our own, token for token what ``generate`` returns.

``generate`` rebuilds its inputs, runs its logits processors and stopping criteria
and updates its kwargs on every step; for short answers on a batch that costs as much
as a small model's forward pass (measured: 1.1-1.7x the time of this loop on CPU). For
the plain greedy case this loop does only what that case needs:

- one prefill over the prompt embeddings, keeping only the last position's logits;
- per step: argmax, with the end-of-sequence tokens masked while fewer than
  ``min_new_tokens`` are out; rows that have ended get the pad token; the attention
  mask grows by one and the positions by one, as ``generate`` does it;
- stop after ``max_new_tokens`` or once every row has ended.

For OPT (BLIP-2's language model) the steps after the prefill run in ``blip2.optsteps``:
the same arithmetic as plain tensor ops over preallocated keys and values; on the GPU,
at fixed shapes replayed as CUDA graphs (``blip2.stepgraphs``).

``GreedyDecoder.handles(params)`` says when it applies: no sampling, one beam, no
repetition penalty or n-gram ban, and a generation config with nothing set that
would add a logits processor or stopping criterion (anything else goes to
``generate``). Parity with ``generate`` is tested on the transformers versions CI
installs, including the GPU machine's 5.17.
"""

from __future__ import annotations

import inspect

import torch

# GenerationConfig fields that add logits processors, stopping criteria or extra
# sequences to greedy search; the loop is used only when all keep their defaults.
_MUST_BE_DEFAULT = (
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "force_words_ids", "sequence_bias", "min_length", "min_new_tokens", "forced_bos_token_id",
    "forced_eos_token_id", "forced_decoder_ids", "suppress_tokens", "begin_suppress_tokens", "remove_invalid_values",
    "exponential_decay_length_penalty", "renormalize_logits", "guidance_scale", "watermarking_config", "max_time",
    "stop_strings", "num_return_sequences", "num_beams", "num_beam_groups", "do_sample", "penalty_alpha",
    "dola_layers", "constraints", "output_scores", "output_logits", "return_dict_in_generate",
    "prompt_lookup_num_tokens", "assistant_early_exit", "cache_implementation", "compile_config",
)


class GreedyDecoder:
    def __init__(self, language_model, pad_token_id: int, preallocate: bool = False, lean: bool = True,
                 graph_budget_bytes: int = 0, graph_rows: int = 16, capture: bool | None = None):
        """``lean``: after the prefill, run OPT's decode steps as plain tensor ops over keys and values
        in buffers sized up front (``blip2.optsteps``; same tokens), when the model's layout allows;
        else each step goes through the model. ``preallocate`` (for the model's own steps only):
        keep keys and values in transformers' StaticCache, run eagerly, instead of a cache that
        grows by concatenation. bench/gpu.py times all three.

        ``graph_budget_bytes`` > 0 (with the lean steps): run the steps of batches of up to
        ``graph_rows`` rows at fixed shapes within that many bytes of keys and values, replayed as
        CUDA graphs where ``capture`` (default: on CUDA), eagerly otherwise (``blip2.stepgraphs``)."""
        from transformers import GenerationConfig

        from .optsteps import OPTSteps
        from .stepgraphs import StepGraphs

        self.lm = language_model
        self.pad_id = int(pad_token_id)
        self.preallocate = preallocate
        self.lean_unsupported = "off" if not lean else "preallocate" if preallocate else OPTSteps.unsupported(language_model)
        self.steps = OPTSteps(language_model) if self.lean_unsupported is None else None
        self.graphs = (
            StepGraphs(self.steps, graph_budget_bytes, graph_rows, capture)
            if self.steps is not None and graph_budget_bytes > 0 else None
        )
        accepted = inspect.signature(language_model.forward).parameters
        # transformers 5.25 renamed ``past_key_values`` to ``cache``; 5.17 (the GPU machine) has the old name
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        self._trim_logits = "logits_to_keep" in accepted
        config = language_model.generation_config
        eos = config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos = torch.tensor(eos, dtype=torch.long)
        # on an accelerator, asking "has every row ended?" waits for the device: ask every few steps
        self.check_every = 1 if language_model.device.type == "cpu" else 4
        default = GenerationConfig()
        self.blockers = [
            name for name in _MUST_BE_DEFAULT if getattr(config, name, None) != getattr(default, name, None)
        ]

    def handles(self, params) -> bool:
        """True when ``generate`` with ``params`` is plain greedy search, which this loop reproduces."""
        return (
            not self.blockers and params.num_beams == 1 and not params.do_sample
            and params.repetition_penalty == 1.0 and params.no_repeat_ngram_size == 0
        )

    def __call__(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, min_new_tokens: int = 0,
    ) -> torch.Tensor:
        """New token ids (rows x at most ``max_new_tokens``), pad after each row's end, as ``generate`` has them."""
        from transformers import DynamicCache, StaticCache

        device = inputs_embeds.device
        if self.preallocate:
            cache = StaticCache(config=self.lm.config, max_cache_len=inputs_embeds.shape[1] + max_new_tokens)
        else:
            cache = DynamicCache(config=self.lm.config)
        eos = self.eos.to(device)
        mask = attention_mask
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        extra = {self._cache_arg: cache, "use_cache": True}
        if self._trim_logits:
            extra["logits_to_keep"] = 1
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions, **extra)
        position = positions[:, -1:]
        logits = out.logits[:, -1]
        if self.steps is not None and max_new_tokens > 1:
            step_fn = self.graphs.begin(cache, mask, max_new_tokens - 1) if self.graphs is not None else None
            if step_fn is None:  # no graphs, or a shape over their whole budget
                step_fn = self.steps.begin(cache, mask, max_new_tokens - 1)
            del out, cache, extra  # the steps hold their own copies of the keys and values
        else:
            ones = mask.new_ones(mask.shape[0], 1)

            def step_fn(token, position):
                nonlocal mask
                mask = torch.cat([mask, ones], dim=1)
                return self.lm(input_ids=token[:, None], attention_mask=mask, position_ids=position, **extra).logits[:, -1]

        running = torch.ones(inputs_embeds.shape[0], dtype=torch.bool, device=device)
        check_every = self.check_every
        tokens = []
        for step in range(max_new_tokens):
            if step < min_new_tokens and eos.numel():
                logits = logits.clone()
                logits[:, eos] = float("-inf")
            token = torch.where(running, logits.argmax(-1), self.pad_id)
            tokens.append(token)
            if eos.numel():
                running &= ~torch.isin(token, eos)
            if step + 1 == max_new_tokens or ((step + 1) % check_every == 0 and not bool(running.any())):
                break
            position = position + 1
            logits = step_fn(token, position)
        return _trim_ended(torch.stack(tokens, dim=1), running, self.pad_id)


def _trim_ended(tokens: torch.Tensor, running: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop trailing all-pad columns (steps run after every row had ended), as ``generate`` stops sooner."""
    if bool(running.any()):
        return tokens
    width = tokens.shape[1]
    while width > 1 and bool((tokens[:, width - 1] == pad_id).all()):
        width -= 1
    return tokens[:, :width]
