"""OPT's decode step at fixed shapes, replayed as a CUDA graph on the GPU.

A decode step of OPT-2.7b at batch 16 reads ~5.3 GB of weights, about 1.1 ms on an
H200, but the lean step of ``blip2.optsteps`` launches some 400 kernels from Python
to do it, which can take longer than the reading (``bench/gpu.py`` measures both; not
yet run on a GPU). A CUDA graph launches them all at once, and holds the GIL for a
moment instead of the whole step, which leaves it to the request threads. Capture
needs every shape and every address fixed, so here the same step runs in a
fixed-shape form:

- keys and values live in buffers of a fixed number of rows and positions (rounded up
  to multiples of 8 and 32), zeroed when made and past each batch's prompt when reused,
  so that masked slots never hold NaN;
- each step writes its key and value at a position held on the device
  (``index_copy_``) and attends over the whole buffer, with the left padding and the
  positions not yet written masked;
- the step's inputs (tokens, positions, the write position) are copied into fixed
  tensors before each replay, and its logits come out in a fixed tensor.

The same function runs eagerly where nothing is captured (``capture=False``: the CPU,
the tests), which is the "eager path" that the graphs must equal. Each graph is
checked when it is made: captured after two eager warm-up runs on the same inputs,
then replayed, its logits must equal the last warm-up's bit for bit. A graph that
differs, or a capture that fails, is dropped with a warning, and from then on the
steps run eagerly; a capture that runs out of device memory leaves only its own shape
eager.

Buffers are kept per length (for the engine's largest batch), the least recently used
dropped first, within a budget in bytes; a smaller batch's step works on the leading
rows of the same buffers, with a graph of its own. A length over the whole budget is
not served here (``begin`` returns None) and the caller runs ``OPTSteps``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn.functional as F

from .optsteps import OPTSteps

log = logging.getLogger("blip2.stepgraphs")


class StepGraphs:
    def __init__(self, steps: OPTSteps, budget_bytes: int, max_rows: int, capture: bool | None = None,
                 row_multiple: int = 8, length_multiple: int = 32):
        self.steps = steps
        self.budget_bytes = int(budget_bytes)
        self.row_multiple, self.length_multiple = row_multiple, length_multiple
        self.max_rows = _round_up(max_rows, row_multiple)
        self.device = steps.embed_tokens.weight.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.buffers: OrderedDict[int, _Buffers] = OrderedDict()  # by length, least recently used first
        self.failed: str | None = None  # why capturing was given up, once it was
        self.graphs_made = 0

    def shape_for(self, batch: int, total: int) -> tuple[int, int]:
        """(rows, positions) of the step that serves ``batch`` rows of ``total`` positions."""
        return _round_up(batch, self.row_multiple), _round_up(total, self.length_multiple)

    def bytes_for(self, length: int) -> int:
        """Bytes of keys and values for ``max_rows`` rows of ``length`` positions."""
        s = self.steps
        size = s.embed_tokens.weight.element_size()
        return 2 * len(s.layers) * self.max_rows * s.heads * length * s.head_dim * size

    def held_bytes(self) -> int:
        return sum(self.bytes_for(length) for length in self.buffers)

    def begin(self, cache, attention_mask: torch.Tensor, max_new_tokens: int):
        """Like ``OPTSteps.begin``: a callable ``(token, position) -> logits`` for the steps of one
        answer, over fixed buffers filled with the prefill's keys and values; None when the batch
        has more rows than ``max_rows`` or its length needs more than the whole budget."""
        layers = self.steps.cache_layers(cache)
        batch, prefix = attention_mask.shape
        rows, length = self.shape_for(batch, prefix + max_new_tokens)
        if rows > self.max_rows or self.bytes_for(length) > self.budget_bytes:
            return None
        buffers = self.buffers.pop(length, None)
        if buffers is None:
            while self.buffers and self.held_bytes() + self.bytes_for(length) > self.budget_bytes:
                self.buffers.popitem(last=False)[1].release()  # freed now, before the new ones are made
            try:
                buffers = _Buffers(self, length)
            except torch.OutOfMemoryError:  # the budget is more than the device has now: shrink it, not the batch
                self._shrink_budget(length)
                return None
        self.buffers[length] = buffers  # now the most recently used
        buffers.load(layers, attention_mask)
        graph = buffers.graphs.get(rows)
        if graph is None:
            graph = buffers.graphs[rows] = _Step(buffers, rows)
        at = prefix

        def step(token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            nonlocal at
            buffers.tokens[:batch].copy_(token)
            buffers.positions[:batch].copy_(position)
            buffers.at.fill_(at)
            at += 1
            return graph.run()[:batch]

        return step

    def _shrink_budget(self, length: int) -> None:
        """After the buffers for ``length`` did not fit in device memory: hold only what fits now."""
        held = self.held_bytes()
        self.budget_bytes = held if held else self.bytes_for(length) - 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("Out of device memory for the decode-step buffers of %d positions; these steps run without "
                    "graphs, and the graphs' budget is now %.0f MB", length, self.budget_bytes / 2**20)

    def _give_up(self, why: str) -> None:
        self.failed = why
        self.capture = False
        for buffers in self.buffers.values():
            for graph in buffers.graphs.values():
                graph.graph = graph.out = None
        log.warning("Decode steps will run without CUDA graphs: %s", why)


class _Buffers:
    """Keys, values and step inputs for ``max_rows`` rows of ``length`` positions; the steps of
    fewer rows (``_Step``) work on their leading rows."""

    def __init__(self, owner: StepGraphs, length: int):
        s = owner.steps
        self.owner = owner
        rows, dev, dtype = owner.max_rows, owner.device, s.embed_tokens.weight.dtype
        self.keys = [torch.zeros(rows, s.heads, length, s.head_dim, dtype=dtype, device=dev) for _ in s.layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.at = torch.zeros(1, dtype=torch.long, device=dev)  # where this step's key and value go
        self.open = torch.ones(rows, length, dtype=torch.bool, device=dev)  # False: left padding
        self.index = torch.arange(length, device=dev)
        self.weights = s.weights()
        self.graphs: dict[int, _Step] = {}

    def release(self) -> None:
        """Drop the graphs: each ``_Step`` points back at these buffers, and without this the cycle
        would keep keys, values and graph memory alive until a full garbage collection."""
        for graph in self.graphs.values():
            graph.graph = graph.out = None
        self.graphs.clear()

    def load(self, layers, attention_mask: torch.Tensor) -> None:
        """Take one batch's prefill keys and values and padding. The batch's positions not yet
        written are zeroed: masked, but a NaN or inf left there by an earlier batch (an fp16
        overflow) would still reach the output through its zero attention weight. Rows past the
        batch keep old values; nothing reads them into the batch's rows."""
        batch, prefix = attention_mask.shape
        for keys, values, layer in zip(self.keys, self.values, layers):
            keys[:batch, :, :prefix].copy_(layer.keys)
            values[:batch, :, :prefix].copy_(layer.values)
            keys[:batch, :, prefix:].zero_()
            values[:batch, :, prefix:].zero_()
        self.open.fill_(True)
        self.open[:batch, :prefix].copy_(attention_mask.bool())


class _Step:
    """The step over the first ``rows`` rows of ``buffers``, and its CUDA graph once captured."""

    def __init__(self, buffers: _Buffers, rows: int):
        self.b, self.rows = buffers, rows
        self.owner = buffers.owner
        self.graph = self.out = None
        self.eager_only = False  # its capture ran out of device memory: this shape stays eager

    def step(self) -> torch.Tensor:
        """One step on the fixed tensors only (nothing that changes per step is a Python value)."""
        b, n = self.b, self.rows
        at = b.at
        mask = (b.open[:n] & (b.index <= at))[:, None, None, :]

        def attend(i, q, k, v):
            keys, values = b.keys[i][:n], b.values[i][:n]
            keys.index_copy_(2, at, k.unsqueeze(2))
            values.index_copy_(2, at, v.unsqueeze(2))
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=0.0, scale=1.0)

        return self.owner.steps.step(b.weights, b.tokens[:n], b.positions[:n], attend)

    def run(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.out
        if self.owner.capture and not self.eager_only:
            try:
                return self._capture()
            except torch.OutOfMemoryError:  # a full device says nothing about graphs: other shapes still try
                self.eager_only = True
                if self.owner.device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning("Out of device memory capturing the decode step of %d rows; that shape runs "
                            "without a graph", self.rows)
            except Exception as exc:  # noqa: BLE001 - a graph is an optimisation: fall back, never fail the batch
                self.owner._give_up(f"capture failed ({type(exc).__name__}: {exc})")
        return self.step()  # out of memory here too: raised, and the engine splits the batch

    def _capture(self) -> torch.Tensor:
        """Record this step as a graph, replay it, and keep it only if its logits equal the eager ones exactly."""
        graph, out, eager = self._record()
        graph.replay()
        if not torch.equal(out, eager):
            diff = (out.float() - eager.float()).abs().max().item()
            self.owner._give_up(f"a replayed step's logits differ from the eager step's (max {diff:.3g})")
            return eager
        self.graph, self.out = graph, out
        self.owner.graphs_made += 1
        return out

    def _record(self):
        """(graph, its output tensor, the eager logits): two eager warm-up runs on a side stream, then capture.

        The warm-up runs are real steps on this step's inputs; writing the same key and value
        again is harmless, so the graph's first replay gives this step's logits too.
        """
        device = self.owner.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                eager = self.step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # request threads may touch CUDA meanwhile
            out = self.step()
        return graph, out, eager


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
