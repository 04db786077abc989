"""OPT's decode step at fixed shapes, replayed as a CUDA graph on the GPU.

A decode step of OPT-2.7b at batch 16 reads ~5.3 GB of weights, about 1.1 ms on an
H200, but the lean step of ``blip2.optsteps`` launches some 400 kernels from Python
to do it, which takes longer than the reading. A CUDA graph launches them all at
once. Capture needs every shape and every address fixed, so here the same step runs
in a fixed-shape form:

- keys and values live in buffers of a fixed number of rows and positions (rounded up
  to multiples of 8 and 32), zeroed when made, so that masked slots never hold NaN;
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
steps run eagerly.

Buffers are kept per (rows, positions) shape, the least recently used dropped first,
within a budget in bytes; a shape over the whole budget is not served here
(``begin`` returns None) and the caller runs ``OPTSteps``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn.functional as F

from .optsteps import OPTSteps

log = logging.getLogger("blip2.stepgraphs")


class StepGraphs:
    def __init__(self, steps: OPTSteps, budget_bytes: int, capture: bool | None = None,
                 row_multiple: int = 8, length_multiple: int = 32):
        self.steps = steps
        self.budget_bytes = int(budget_bytes)
        self.device = steps.embed_tokens.weight.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.row_multiple, self.length_multiple = row_multiple, length_multiple
        self.shapes: OrderedDict[tuple[int, int], _Shape] = OrderedDict()
        self.failed: str | None = None  # why capturing was given up, once it was
        self.graphs_made = 0

    def shape_for(self, batch: int, total: int) -> tuple[int, int]:
        """(rows, positions) of the buffers that serve ``batch`` rows of ``total`` positions."""
        return _round_up(batch, self.row_multiple), _round_up(total, self.length_multiple)

    def bytes_for(self, rows: int, length: int) -> int:
        """Bytes of keys and values for one shape."""
        s = self.steps
        size = s.embed_tokens.weight.element_size()
        return 2 * len(s.layers) * rows * s.heads * length * s.head_dim * size

    def held_bytes(self) -> int:
        return sum(self.bytes_for(*shape) for shape in self.shapes)

    def begin(self, cache, attention_mask: torch.Tensor, max_new_tokens: int):
        """Like ``OPTSteps.begin``: a callable ``(token, position) -> logits`` for the steps of one
        answer, over fixed buffers filled with the prefill's keys and values; None when the shape
        needs more than the whole budget."""
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != len(self.steps.layers):
            raise ValueError("the prefill cache does not hold one keys/values pair per layer")
        batch, prefix = attention_mask.shape
        key = self.shape_for(batch, prefix + max_new_tokens)
        if self.bytes_for(*key) > self.budget_bytes:
            return None
        shape = self.shapes.pop(key, None)
        if shape is None:
            while self.shapes and self.held_bytes() + self.bytes_for(*key) > self.budget_bytes:
                self.shapes.popitem(last=False)  # least recently used
            shape = _Shape(self, *key)
        self.shapes[key] = shape  # now the most recently used
        shape.load(layers, attention_mask)
        at = prefix

        def step(token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            nonlocal at
            shape.tokens[:batch].copy_(token)
            shape.positions[:batch].copy_(position)
            shape.at.fill_(at)
            at += 1
            return shape.run()[:batch]

        return step

    def _give_up(self, why: str) -> None:
        self.failed = why
        self.capture = False
        for shape in self.shapes.values():
            shape.graph = shape.out = None
        log.warning("Decode steps will run without CUDA graphs: %s", why)


class _Shape:
    """Fixed buffers for ``rows`` x ``length`` positions, and the graph of a step over them once captured."""

    def __init__(self, owner: StepGraphs, rows: int, length: int):
        s = owner.steps
        self.owner = owner
        dev, dtype = owner.device, s.embed_tokens.weight.dtype
        self.keys = [torch.zeros(rows, s.heads, length, s.head_dim, dtype=dtype, device=dev) for _ in s.layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.at = torch.zeros(1, dtype=torch.long, device=dev)  # where this step's key and value go
        self.open = torch.ones(rows, length, dtype=torch.bool, device=dev)  # False: left padding
        self.index = torch.arange(length, device=dev)
        self.weights = s.weights()
        self.graph = self.out = None

    def load(self, layers, attention_mask: torch.Tensor) -> None:
        """Take one batch's prefill keys and values and padding; rows past the batch keep old, finite values."""
        batch, prefix = attention_mask.shape
        for keys, values, layer in zip(self.keys, self.values, layers):
            keys[:batch, :, :prefix].copy_(layer.keys)
            values[:batch, :, :prefix].copy_(layer.values)
        self.open.fill_(True)
        self.open[:batch, :prefix].copy_(attention_mask.bool())

    def step(self) -> torch.Tensor:
        """One step on the fixed tensors only (nothing that changes per step is a Python value)."""
        at = self.at
        mask = (self.open & (self.index <= at))[:, None, None, :]

        def attend(i, q, k, v):
            keys, values = self.keys[i], self.values[i]
            keys.index_copy_(2, at, k.unsqueeze(2))
            values.index_copy_(2, at, v.unsqueeze(2))
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=0.0, scale=1.0)

        return self.owner.steps.step(self.weights, self.tokens, self.positions, attend)

    def run(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.out
        if self.owner.capture:
            try:
                return self._capture()
            except Exception as exc:  # noqa: BLE001 - a graph is an optimisation: fall back, never fail the batch
                self.owner._give_up(f"capture failed ({type(exc).__name__}: {exc})")
        return self.step()

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
