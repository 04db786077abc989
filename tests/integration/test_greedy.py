"""The engine's own greedy loop returns exactly the tokens of transformers' ``generate``.

Compared token for token on left-padded batches of mixed prompt lengths: on a tiny
random model (rows never end early, so an end token is also forced mid-batch), and on
the demo model, whose rows end at different steps on their own.
"""

from __future__ import annotations

import random

import pytest
import torch

from blip2.engine import Engine
from blip2.greedy import GreedyDecoder
from blip2.params import GenerationParams
from blip2 import shapes
from greedyhelp import both, count_model_calls, items_for, make_engine, strip_pad, tiny_items


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return make_engine(tiny_model_dir)


@pytest.fixture(scope="module")
def demo():
    return make_engine("demo")


class LoopMustNotRun:
    """Stands in for an engine's GreedyDecoder: same ``handles``, but fails the test if called."""

    def __init__(self, real: GreedyDecoder):
        self.handles = real.handles

    def __call__(self, *args, **kwargs):
        pytest.fail("this request must go to generate, not the greedy loop")


@pytest.mark.parametrize("max_new_tokens,min_new_tokens", [(1, 0), (7, 0), (12, 5)])
def test_tiny_model_same_tokens_as_generate(tiny, max_new_tokens, min_new_tokens):
    want, got = both(tiny, tiny_items(tiny), max_new_tokens, min_new_tokens)
    assert got == want
    assert len({tuple(row) for row in want}) > 1  # rows differ: a row paired with another's inputs would show
    assert all(len(row) == max_new_tokens for row in want)


def test_rows_that_end_at_different_steps_get_pad_after_their_end(tiny):
    items = tiny_items(tiny)
    free, _ = both(tiny, items, 10)
    # make a token the rows emit at different steps (or not at all) the end token
    def first_steps(t):
        return {row.index(t) if t in row else None for row in free}

    eos = max((t for row in free for t in row[1:] if t != tiny.pad_id), key=lambda t: len(first_steps(t)))
    want, got = both(tiny, items, 10, eos=eos)
    assert got == want
    ends = [row.index(eos) if eos in row else None for row in want]
    assert len(set(ends)) > 1 and any(end is not None and end < 9 for end in ends)
    for row, end in zip(got, ends):
        if end is not None:
            assert all(t == tiny.pad_id for t in row[end + 1 :])


def test_checking_for_the_end_every_few_steps_gives_the_same_tokens(demo):
    """On a GPU the loop asks whether all rows ended only every few steps; the extra steps must not show."""
    rng = random.Random(12)
    samples = [shapes.sample(rng, (160, 120)) for _ in range(4)]
    prompts = [list(shapes.QUESTIONS.values())[i % len(shapes.QUESTIONS)] for i in range(4)]
    items = items_for(demo, [s[0] for s in samples], prompts)
    want, every_step = both(demo, items, 20)
    assert demo.greedy.check_every == 1  # on the CPU
    demo.greedy.check_every = 3
    try:
        _, every_third = both(demo, items, 20)
    finally:
        demo.greedy.check_every = 1
    assert every_third == every_step == want
    assert max(len(row) for row in want) < 20  # the rows did end early, so extra steps were run


def test_a_preallocated_kv_cache_gives_the_same_tokens(demo, tiny, monkeypatch):
    import transformers

    made = []
    real = transformers.StaticCache
    monkeypatch.setattr(transformers, "StaticCache", lambda **kw: made.append(kw["max_cache_len"]) or real(**kw))
    rng = random.Random(8)
    demo_items = items_for(demo, [shapes.sample(rng, (128, 96))[0] for _ in range(4)],
                           [list(shapes.QUESTIONS.values())[i % 3] for i in range(4)])
    for engine, items in ((tiny, tiny_items(tiny)), (demo, demo_items)):
        want, _ = both(engine, items, 9, min_new_tokens=2)
        decoder = GreedyDecoder(engine.model.language_model, engine.pad_id, preallocate=True)
        with torch.inference_mode():
            _, mask, embeds = engine.lm_inputs(items)
            got = strip_pad(decoder(embeds, mask, 9, 2), engine.pad_id)
        assert got == want
        assert made[-1] == embeds.shape[1] + 9  # room for the prompt and the whole answer
    newline = demo.model.config.text_config.eos_token_id
    assert all(newline in row for row in want)  # the demo's rows ended: pad after the end is covered too


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_greedy_tokens_equal_generate(tiny_model_dir, dtype):
    """The GPU runs fp16 (the Q-Former in fp32): the loop must agree with generate there too."""
    engine = make_engine(tiny_model_dir, dtype)
    assert engine.model.language_model.dtype == getattr(torch, dtype)
    want, got = both(engine, tiny_items(engine), 6, min_new_tokens=2)
    assert got == want and len({tuple(row) for row in want}) > 1


def test_demo_model_rows_end_on_their_own_and_match_generate(demo):
    assert demo.greedy.steps is not None  # the lean OPT steps: ended rows keep feeding pad there too
    rng = random.Random(11)
    samples = [shapes.sample(rng, (160, 120)) for _ in range(6)]
    prompts = [list(shapes.QUESTIONS.values())[i % len(shapes.QUESTIONS)] for i in range(6)]
    items = items_for(demo, [s[0] for s in samples], prompts)
    want, got = both(demo, items, 20)
    assert got == want
    newline = demo.model.config.text_config.eos_token_id
    assert all(newline in row for row in want) and len({row.index(newline) for row in want}) > 1
    # forced past the end token, every row runs the full length, again as generate does
    want, got = both(demo, items, 8, min_new_tokens=8)
    assert got == want and all(len(row) == 8 for row in want)


def test_engine_answers_equal_with_the_loop_and_with_generate(demo, monkeypatch):
    rng = random.Random(5)
    samples = [shapes.sample(rng, (128, 128)) for _ in range(5)]
    prompts = [list(shapes.QUESTIONS.values())[i % len(shapes.QUESTIONS)] for i in range(5)]
    items = items_for(demo, [s[0] for s in samples], prompts)
    params = GenerationParams(max_new_tokens=12)
    lm = demo.model.language_model
    real_generate = lm.generate
    monkeypatch.setattr(lm, "generate", lambda *a, **k: pytest.fail("greedy rows must not reach generate"))
    fast = demo.generate(items, params)
    monkeypatch.setattr(lm, "generate", real_generate)
    slow = make_engine("demo", fast_greedy=False)
    monkeypatch.setattr(slow, "greedy", LoopMustNotRun(slow.greedy))
    assert slow.generate(items, params) == fast
    assert fast == [shapes.expected(kind, color, shape) for kind, (_, color, shape) in zip(
        [list(shapes.QUESTIONS)[i % len(shapes.QUESTIONS)] for i in range(5)], samples)]


@pytest.mark.parametrize("params", [
    GenerationParams(num_beams=2), GenerationParams(do_sample=True), GenerationParams(repetition_penalty=1.3),
    GenerationParams(no_repeat_ngram_size=2),
])
def test_other_decoding_goes_to_generate(tiny, params, monkeypatch):
    assert not tiny.greedy.handles(params)
    monkeypatch.setattr(tiny, "greedy", LoopMustNotRun(tiny.greedy))
    answers = tiny.generate(tiny_items(tiny)[:2], GenerationParams(**{**params.__dict__, "max_new_tokens": 3}))
    assert len(answers) == 2


def test_a_generation_config_with_processors_falls_back(tiny_model_dir, caplog):
    engine = make_engine(tiny_model_dir)
    assert engine.greedy.handles(GenerationParams()) and engine.greedy.blockers == []
    engine.model.language_model.generation_config.repetition_penalty = 1.2
    decoder = GreedyDecoder(engine.model.language_model, engine.pad_id)
    assert decoder.blockers == ["repetition_penalty"] and not decoder.handles(GenerationParams())
    with caplog.at_level("INFO", logger="blip2.engine"):
        Engine(engine.model, engine.processor, device="cpu", dtype=torch.float32)
    assert "generation config sets repetition_penalty" in caplog.text


def test_static_cache_keeps_generate(tiny_model_dir):
    assert make_engine(tiny_model_dir).fast_greedy
    assert not make_engine(tiny_model_dir, static_cache=True).fast_greedy
    assert not make_engine(tiny_model_dir, fast_greedy=False).fast_greedy


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_lean_opt_steps_give_the_tokens_of_generate_and_of_the_model_steps(tiny_model_dir, dtype, monkeypatch):
    engine = make_engine(tiny_model_dir, dtype)
    lm = engine.model.language_model
    assert engine.greedy.steps is not None and engine.greedy.lean_unsupported is None
    model_steps = GreedyDecoder(lm, engine.pad_id, lean=False)
    assert model_steps.steps is None and model_steps.lean_unsupported == "off"
    padded = tiny_items(engine)
    same_length = items_for(engine, [it for it in (shapes.sample(random.Random(4), (96, 96))[0] for _ in range(3))],
                            ["Question: what shape is this? Answer:"] * 3)  # no padding: SDPA gets no mask
    for items in (padded, same_length):
        want, _ = both(engine, items, 9, min_new_tokens=3)
        with torch.inference_mode():
            _, mask, embeds = engine.lm_inputs(items)
            calls = count_model_calls(lm, monkeypatch)
            lean = strip_pad(engine.greedy(embeds, mask, 9, 3), engine.pad_id)
            assert calls == [True]  # the prefill only: the eight steps after it ran in OPTSteps
            through_model = strip_pad(model_steps(embeds, mask, 9, 3), engine.pad_id)
            assert calls == [True, True] + [False] * 8
            monkeypatch.undo()
        assert lean == through_model == want
        assert len({tuple(row) for row in want}) > 1 or items is same_length


def test_layouts_the_lean_steps_do_not_cover_go_through_the_model(tiny_model_dir, caplog):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from blip2.optsteps import OPTSteps

    model = Blip2ForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    processor = Blip2Processor.from_pretrained(tiny_model_dir)
    processor.tokenizer.padding_side = "left"
    lm = model.language_model
    assert "eager" in OPTSteps.unsupported(lm)
    with pytest.raises(ValueError, match="eager"):
        OPTSteps(lm)
    with caplog.at_level("INFO", logger="blip2.engine"):
        engine = Engine(model, processor, device="cpu", dtype=torch.float32, max_batch_size=8)
    assert engine.greedy.steps is None and "decode steps go through the model" in caplog.text
    want, got = both(engine, tiny_items(engine), 6)
    assert got == want
    sdpa = make_engine(tiny_model_dir).model  # its own copy: changed below
    opt = sdpa.language_model
    assert OPTSteps.unsupported(opt) is None
    assert "training" in OPTSteps.unsupported(opt.train())
    opt.eval()
    opt.config.do_layer_norm_before = False
    assert "after attention" in OPTSteps.unsupported(opt)
    opt.config.do_layer_norm_before = True
    opt.model.decoder.project_out = torch.nn.Linear(32, 32)
    assert "projected" in OPTSteps.unsupported(opt)
    assert "not 'opt'" in OPTSteps.unsupported(sdpa.vision_model)


def test_lean_step_logits_equal_the_models_bit_for_bit(tiny_model_dir):
    """Stronger than equal tokens: each step's logits, padded rows included, are the model's exactly (fp32)."""
    from transformers import DynamicCache

    tiny = make_engine(tiny_model_dir, "float32")
    lm = tiny.model.language_model
    decoder = tiny.greedy
    with torch.inference_mode():
        _, mask, embeds = tiny.lm_inputs(tiny_items(tiny))
        assert not bool(mask.all())  # left padding present
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        caches = [DynamicCache(config=lm.config) for _ in range(2)]
        first = [lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                    **{decoder._cache_arg: c}).logits[:, -1] for c in caches]
        steps = decoder.steps.begin(caches[1], mask, 4)
        token, position, grown = first[0].argmax(-1), positions[:, -1:], mask
        for _ in range(4):
            position = position + 1
            grown = torch.cat([grown, grown.new_ones(grown.shape[0], 1)], dim=1)
            want = lm(input_ids=token[:, None], attention_mask=grown, position_ids=position, use_cache=True,
                      **{decoder._cache_arg: caches[0]}).logits[:, -1]
            got = steps(token, position)
            assert torch.equal(got, want)
            token = want.argmax(-1)


def test_fused_query_key_value_weights_are_the_models_own_storage(tiny_model_dir):
    """The lean steps' one QKV product reads a tensor that the model's three projections are views of:
    nothing is held twice, the model's own outputs do not change, and a moved model is fused anew."""
    from transformers import Blip2ForConditionalGeneration

    from blip2.optsteps import OPTSteps, fused_qkv

    model = Blip2ForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    lm = model.language_model
    ids = torch.tensor([[2, 40, 41, 42, 43], [1, 1, 2, 44, 45]])
    mask = (ids != 1).long()
    with torch.no_grad():
        before = lm(input_ids=ids, attention_mask=mask).logits
    n_before = sum(p.numel() for p in lm.parameters())
    originals = [[p.weight.clone() for p in (l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj)]
                 for l in lm.model.decoder.layers]
    OPTSteps(lm)
    for layer, want in zip(lm.model.decoder.layers, originals):
        attn = layer.self_attn
        weight, bias = fused_qkv(attn)
        assert fused_qkv(attn)[0] is weight  # found again, not stacked twice
        assert torch.equal(weight, torch.cat(want))
        rows = attn.q_proj.weight.shape[0]
        for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
            assert isinstance(proj.weight, torch.nn.Parameter)
            assert proj.weight.data_ptr() == weight[i * rows].data_ptr()
            assert proj.bias.data_ptr() == bias[i * rows].data_ptr()
    assert sum(p.numel() for p in lm.parameters()) == n_before
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids, attention_mask=mask).logits, before)
    lm.to(torch.float64)  # new storage for every parameter: the old stack is stale
    attn = lm.model.decoder.layers[0].self_attn
    weight, _ = fused_qkv(attn)
    assert weight.dtype == torch.float64 and attn.k_proj.weight.data_ptr() == weight[attn.k_proj.weight.shape[0]].data_ptr()
