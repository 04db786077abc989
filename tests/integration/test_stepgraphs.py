"""Decode steps at fixed shapes (``blip2.stepgraphs``): the eager path that CUDA graphs replay.

On the CPU nothing is captured, so these tests run the fixed-shape step eagerly and check
that it gives ``generate``'s tokens, that reused buffers leak nothing from an earlier
batch, that the byte budget holds, and, with a stand-in for the CUDA capture, that a graph
is kept only when its replay equals the eager step and that any failure falls back. The
real capture is checked where CUDA is present.
"""

from __future__ import annotations

import random

import pytest
import torch

from blip2 import shapes
from blip2.config import Settings
from blip2.engine import Engine
from blip2.greedy import GreedyDecoder
from blip2.stepgraphs import StepGraphs, _Buffers, _Step
from greedyhelp import both, count_model_calls, items_for, make_engine, strip_pad, tiny_items

BIG = 1 << 30


def with_graphs(engine: Engine, budget: int = BIG, capture: bool = False) -> GreedyDecoder:
    """The engine's greedy loop, its lean steps run at fixed shapes (``capture`` False: eagerly)."""
    decoder = GreedyDecoder(engine.model.language_model, engine.pad_id, graph_budget_bytes=budget,
                            graph_rows=engine.max_batch_size, capture=capture)
    assert decoder.graphs is not None
    engine.greedy = decoder
    return decoder


def same_prompt_items(engine, n: int, seed: int):
    rng = random.Random(seed)
    return items_for(engine, [shapes.sample(rng, (96, 96))[0] for _ in range(n)], ["Question: what shape is this? Answer:"] * n)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_fixed_shape_steps_give_the_tokens_of_generate(tiny_model_dir, dtype, monkeypatch):
    engine = make_engine(tiny_model_dir, dtype)
    graphs = with_graphs(engine).graphs
    for items in (tiny_items(engine), same_prompt_items(engine, 3, 4)):  # padded, then not
        want, got = both(engine, items, 9, min_new_tokens=3)
        assert got == want
        assert len({tuple(row) for row in want}) > 1 or len(items) == 3
    assert graphs.buffers and all(list(b.graphs) == [8] for b in graphs.buffers.values())  # the steps ran in fixed buffers
    with torch.inference_mode():
        _, mask, embeds = engine.lm_inputs(tiny_items(engine))
        calls = count_model_calls(engine.model.language_model, monkeypatch)
        engine.greedy(embeds, mask, 6)
    assert calls == [True]  # the prefill only: the steps ran on the fixed buffers


def step_logits(engine: Engine, begin, items, n: int) -> list[torch.Tensor]:
    """Logits of ``n`` steps after the prefill, run by ``begin(cache, mask, n)``, the tokens fed being the argmax."""
    from transformers import DynamicCache

    lm = engine.model.language_model
    with torch.inference_mode():
        _, mask, embeds = engine.lm_inputs(items)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=lm.config)
        logits = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                    **{engine.greedy._cache_arg: cache}).logits[:, -1]
        step, position, out = begin(cache, mask, n), positions[:, -1:], []
        for _ in range(n):
            position = position + 1
            logits = step(logits.argmax(-1), position).clone()
            out.append(logits)
    return out


def assert_same_steps(engine: Engine, graphs: StepGraphs, items, n: int) -> None:
    """The fixed-shape steps' logits equal the lean steps' (fp32; only the attention's extent differs)."""
    want = step_logits(engine, engine.greedy.steps.begin, items, n)
    got = step_logits(engine, graphs.begin, items, n)
    assert len(got) == len(want) == n
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_fixed_step_logits_match_the_lean_steps(tiny_model_dir):
    engine = make_engine(tiny_model_dir, "float32")
    graphs = StepGraphs(engine.greedy.steps, BIG, engine.max_batch_size, capture=False)
    assert_same_steps(engine, graphs, tiny_items(engine), 5)  # left padded
    assert_same_steps(engine, graphs, same_prompt_items(engine, 3, 4), 5)  # no padding


def test_reused_buffers_carry_nothing_from_the_previous_batch(tiny_model_dir):
    """Smaller batches with shorter prompts after larger ones, in the same buffers: the same logits and tokens."""
    engine = make_engine(tiny_model_dir, "float32")
    graphs = StepGraphs(engine.greedy.steps, BIG, engine.max_batch_size, capture=False)
    big = tiny_items(engine)  # 5 rows, left padded
    rng = random.Random(11)
    # one row padded over more positions than the next batches' whole prompts hold
    lopsided = items_for(engine, [shapes.sample(rng, (96, 96))[0] for _ in range(2)], ["a b " * 30 + "Answer:", ""])
    small = same_prompt_items(engine, 2, 9)  # 2 rows, a short prompt, no padding
    for items in (lopsided, small, big, big[1:4], small):
        prefix = engine.lm_inputs(items)[1].shape[1]
        assert_same_steps(engine, graphs, items, 121 - prefix)  # 121 positions: all in one 128-position shape
    assert list(graphs.buffers) == [128]
    loop = with_graphs(engine).graphs  # the greedy loop on such buffers gives generate's tokens
    for items in (lopsided, small):
        want, got = both(engine, items, 122 - engine.lm_inputs(items)[1].shape[1])
        assert got == want
    assert list(loop.buffers) == [128]


def test_smaller_batches_share_the_buffers_of_their_length_with_graphs_of_their_own(tiny_model_dir):
    engine = make_engine(tiny_model_dir, "float32")
    graphs = StepGraphs(engine.greedy.steps, BIG, 16, capture=False)
    ten = tiny_items(engine) + same_prompt_items(engine, 5, 6)
    for items in (ten, ten[:5], ten[3:6], ten):
        assert_same_steps(engine, graphs, items, 90 - engine.lm_inputs(items)[1].shape[1])
    assert list(graphs.buffers) == [96]
    assert sorted(graphs.buffers[96].graphs) == [8, 16]
    assert graphs.buffers[96].keys[0].shape[0] == 16
    assert graphs.held_bytes() == graphs.bytes_for(96)


def test_the_byte_budget_keeps_the_most_recent_length_and_sends_the_rest_to_the_lean_steps(tiny_model_dir):
    engine = make_engine(tiny_model_dir, "float32")
    probe = StepGraphs(engine.greedy.steps, BIG, engine.max_batch_size, capture=False)
    one = probe.bytes_for(96)
    graphs = with_graphs(engine, budget=one + one // 2).graphs  # room for one 96-position buffer, not two
    padded, even = tiny_items(engine), same_prompt_items(engine, 3, 5)
    want, got = both(engine, padded, 4)
    assert got == want and list(graphs.buffers) == [96]
    prefix = engine.lm_inputs(even)[1].shape[1]
    want, got = both(engine, even, 110 - prefix)  # 109 positions: a 128-position buffer, the 96 one dropped
    assert got == want
    assert list(graphs.buffers) == [128] and graphs.held_bytes() <= graphs.budget_bytes
    graphs.budget_bytes = one - 1  # now no length fits: the lean steps run, with the same tokens
    graphs.buffers.clear()
    want, got = both(engine, padded, 5)
    assert got == want and not graphs.buffers


def test_a_batch_over_the_graph_rows_runs_the_lean_steps(tiny_model_dir):
    engine = make_engine(tiny_model_dir, "float32")
    graphs = with_graphs(engine).graphs
    assert graphs.max_rows == engine.max_batch_size == 8
    graphs.max_rows = graphs.row_multiple = 4  # as if the engine's batches had at most 4 rows
    want, got = both(engine, tiny_items(engine), 5)  # 5 rows
    assert got == want and not graphs.buffers
    want, got = both(engine, tiny_items(engine)[:3], 5)
    assert got == want and [list(b.graphs) for b in graphs.buffers.values()] == [[4]]


def test_buffers_that_do_not_fit_in_device_memory_shrink_the_budget_not_the_batch(tiny_model_dir, monkeypatch, caplog):
    engine = make_engine(tiny_model_dir, "float32")
    graphs = with_graphs(engine).graphs
    want, got = both(engine, tiny_items(engine), 4)
    assert got == want and list(graphs.buffers) == [96]
    def full(self, owner, length):  # the device is full: no more buffers can be made
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(_Buffers, "__init__", full)
    even = same_prompt_items(engine, 3, 5)
    with caplog.at_level("WARNING", logger="blip2.stepgraphs"):
        want, got = both(engine, even, 110 - engine.lm_inputs(even)[1].shape[1])  # needs a 128-position buffer
    monkeypatch.undo()
    assert got == want  # answered by the lean steps
    assert "Out of device memory" in caplog.text
    assert list(graphs.buffers) == [96] and graphs.budget_bytes == graphs.bytes_for(96)  # what it holds still serves
    want, got = both(engine, tiny_items(engine), 4)
    assert got == want and list(graphs.buffers) == [96]


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: ``replay`` runs the step and writes its output."""

    def __init__(self, shape: _Step, out: torch.Tensor, skew: float = 0.0):
        self.shape, self.out, self.skew, self.replays = shape, out, skew, 0

    def replay(self):
        self.replays += 1
        self.out.copy_(self.shape.step() + self.skew)


def fake_record(made: list, skew: float = 0.0):
    def record(shape: _Step):
        eager = shape.step()
        graph = FakeGraph(shape, torch.empty_like(eager), skew)
        made.append(graph)
        return graph, graph.out, eager
    return record


def test_a_graph_that_replays_the_eager_step_is_kept_and_replayed(tiny_model_dir, monkeypatch):
    engine = make_engine(tiny_model_dir, "float32")
    made = []
    monkeypatch.setattr(_Step, "_record", fake_record(made))
    graphs = with_graphs(engine, capture=True).graphs
    items = tiny_items(engine)
    want, got = both(engine, items, 6)
    assert got == want
    assert graphs.graphs_made == 1 and graphs.failed is None and len(made) == 1
    assert made[0].replays == 5  # five steps after the prefill: the first checks the capture, the rest replay
    assert both(engine, items, 6)[1] == want and len(made) == 1 and made[0].replays == 10  # captured once


@pytest.mark.parametrize("failure", ["differs", "raises"])
def test_a_graph_that_differs_or_fails_is_dropped_and_the_steps_run_eagerly(tiny_model_dir, monkeypatch, caplog, failure):
    engine = make_engine(tiny_model_dir, "float32")
    made = []
    if failure == "differs":
        monkeypatch.setattr(_Step, "_record", fake_record(made, skew=1e-3))
    else:
        def broken(shape):
            raise RuntimeError("operation not permitted when stream is capturing")
        monkeypatch.setattr(_Step, "_record", broken)
    graphs = with_graphs(engine, capture=True).graphs
    items = tiny_items(engine)
    with caplog.at_level("WARNING", logger="blip2.stepgraphs"):
        want, got = both(engine, items, 6)
    assert got == want  # the step whose graph was dropped used the eager logits
    assert graphs.graphs_made == 0 and not graphs.capture
    assert ("differ" if failure == "differs" else "capture failed") in graphs.failed
    assert "without CUDA graphs" in caplog.text
    assert both(engine, items, 6)[1] == want and len(made) <= 1  # never tried again


def test_warm_up_makes_the_buffers_and_graph_of_a_default_request(tiny_model_dir, monkeypatch):
    engine = make_engine(tiny_model_dir, "float32")
    made = []
    monkeypatch.setattr(_Step, "_record", fake_record(made))
    graphs = with_graphs(engine, capture=True).graphs
    engine.warm_up()
    # 8 rows; 32 image tokens + a short question + 30 answer tokens (the default) fit 96 positions
    assert list(graphs.buffers) == [96] and list(graphs.buffers[96].graphs) == [8]
    assert graphs.graphs_made == 1 and len(made) == 1
    items = same_prompt_items(engine, 8, 3)
    want, got = both(engine, items, 30)
    assert got == want and graphs.graphs_made == 1  # a default request of a full batch: nothing new to capture


def test_engines_use_graphs_only_on_cuda_and_the_setting_reads_megabytes(tiny_model_dir):
    assert make_engine(tiny_model_dir).greedy.graphs is None  # the CPU: lean steps as they are
    assert Settings.from_env({}).cuda_graph_mb is None
    assert Settings.from_env({"BLIP2_CUDA_GRAPH_MB": "0"}).cuda_graph_mb == 0
    assert Settings.from_env({"BLIP2_CUDA_GRAPH_MB": "2048"}).cuda_graph_mb == 2048
    for bad in ("-1", "lots"):
        with pytest.raises(ValueError, match="BLIP2_CUDA_GRAPH_MB"):
            Settings.from_env({"BLIP2_CUDA_GRAPH_MB": bad})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_replay_the_eager_fixed_steps(tiny_model_dir):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model = Blip2ForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float16).to("cuda").eval()
    processor = Blip2Processor.from_pretrained(tiny_model_dir)
    processor.tokenizer.padding_side = "left"
    answers = {}
    for mb in (0, 64):
        engine = Engine(model, processor, device="cuda", dtype=torch.float16, max_batch_size=8, cuda_graph_mb=mb)
        items = tiny_items(engine)
        want, got = both(engine, items, 9, min_new_tokens=3)
        assert got == want
        answers[mb] = got
        if mb:
            assert engine.greedy.graphs.graphs_made >= 1 and engine.greedy.graphs.failed is None
    assert answers[0] == answers[64]
    assert strip_pad(torch.tensor(answers[0]), -1) == answers[0]


def test_buffers_dropped_from_the_budget_are_freed_at_once(tiny_model_dir, monkeypatch):
    """Each graph points back at its buffers: an evicted length must be freed when it is dropped,
    not at some later full garbage collection (on a GPU, gigabytes held past the budget)."""
    import gc
    import weakref

    engine = make_engine(tiny_model_dir, "float32")
    made = []
    monkeypatch.setattr(_Step, "_record", fake_record(made))
    probe = StepGraphs(engine.greedy.steps, BIG, engine.max_batch_size, capture=False)
    graphs = with_graphs(engine, budget=probe.bytes_for(128), capture=True).graphs  # one buffer set at a time
    items = same_prompt_items(engine, 2, 4)
    prefix = engine.lm_inputs(items)[1].shape[1]
    gc.disable()
    try:
        both(engine, items, 3)
        (first,) = graphs.buffers.values()
        assert first.graphs and graphs.graphs_made == 1
        made.clear()  # the stand-in graphs are listed here; a real CUDA graph does not point at its step
        dropped = weakref.ref(first)
        del first
        both(engine, items, 110 - prefix)  # another length: the first set is dropped
        assert dropped() is None
        assert len(graphs.buffers) == 1 and graphs.held_bytes() <= graphs.budget_bytes
    finally:
        gc.enable()


def test_a_capture_out_of_device_memory_leaves_only_its_shape_eager(tiny_model_dir, monkeypatch, caplog):
    engine = make_engine(tiny_model_dir, "float32")
    tries = []

    def full(shape):
        tries.append(shape.rows)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(_Step, "_record", full)
    graphs = with_graphs(engine, capture=True).graphs
    items = tiny_items(engine)
    with caplog.at_level("WARNING", logger="blip2.stepgraphs"):
        want, got = both(engine, items, 6)
    assert got == want and tries == [8]  # tried once for the shape, then eager steps
    assert graphs.capture and graphs.failed is None and "Out of device memory capturing" in caplog.text
    assert both(engine, items, 6)[1] == want and tries == [8]  # not tried again for that shape
    made = []
    monkeypatch.setattr(_Step, "_record", fake_record(made))
    assert both(engine, items[:3], 6)[1] == both(engine, items[:3], 6)[0]  # another shape still captures
    assert graphs.graphs_made == 1 and len(made) == 1


def test_a_nan_left_in_reused_buffers_does_not_reach_the_next_batch(tiny_model_dir):
    """Masked slots still enter attention with weight 0, and 0 * NaN is NaN: whatever an earlier
    batch left past the new prompt (here NaN, as an fp16 overflow would) must not reach the answers."""
    engine = make_engine(tiny_model_dir, "float32")
    graphs = with_graphs(engine).graphs
    items = same_prompt_items(engine, 3, 12)
    prefix = engine.lm_inputs(items)[1].shape[1]
    want, got = both(engine, items, 100 - prefix)
    assert got == want and list(graphs.buffers) == [128]
    with torch.inference_mode():
        for keys, values in zip(graphs.buffers[128].keys, graphs.buffers[128].values):
            keys.fill_(float("nan"))
            values.fill_(float("nan"))
    assert both(engine, items, 100 - prefix)[1] == want
