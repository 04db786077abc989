"""Generation parameters a client may set, validated against server-side caps."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from .config import ParamCaps
from .errors import InvalidInput


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings for one request. Frozen and hashable: the batcher groups rows by it."""

    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``generate``; sampling knobs only when sampling."""
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "num_beams": self.num_beams,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }
        if self.num_beams > 1:
            kwargs["length_penalty"] = self.length_penalty
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


_FIELDS = {f.name for f in fields(GenerationParams)}


def parse_parameters(obj: object, caps: ParamCaps = ParamCaps()) -> GenerationParams:
    """Validate the request's ``parameters`` object.

    ``obj`` is the decoded JSON value (None or a dict). Raises ``InvalidInput``
    (code ``invalid_parameter``) naming the parameter, the allowed range and the
    value received; unknown keys are errors too.
    """
    if obj is None:
        return GenerationParams()
    if not isinstance(obj, dict):
        raise _bad("'parameters' must be a JSON object such as {\"max_new_tokens\": 30}.")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise _bad(
            f"Unknown parameter {unknown[0]!r}. Allowed parameters: {', '.join(sorted(_FIELDS))}."
        )
    v = _Validator(obj)
    max_new = v.integer("max_new_tokens", 30, 1, caps.max_new_tokens)
    params = GenerationParams(
        max_new_tokens=max_new,
        min_new_tokens=v.integer("min_new_tokens", 0, 0, max_new),
        num_beams=v.integer("num_beams", 1, 1, caps.num_beams),
        do_sample=v.boolean("do_sample", False),
        temperature=v.number("temperature", 1.0, 0.01, 100.0),  # lower: scaled logits can overflow
        top_p=v.number("top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=v.integer("top_k", min(50, caps.top_k), 0, caps.top_k),
        repetition_penalty=v.number("repetition_penalty", 1.0, 0.01, 10.0),
        length_penalty=v.number("length_penalty", 1.0, -10.0, 10.0),
        no_repeat_ngram_size=v.integer("no_repeat_ngram_size", 0, 0, 20),
    )
    # Knobs that cannot act are reset to their defaults (after they were checked): generation
    # ignores them either way, and the batcher puts together only requests with equal parameters,
    # so a greedy request that names a temperature still shares a batch with one that does not.
    if not params.do_sample:
        params = replace(params, temperature=1.0, top_p=1.0, top_k=GenerationParams.top_k)
    if params.num_beams == 1:
        params = replace(params, length_penalty=1.0)
    return params


def _bad(message: str) -> InvalidInput:
    return InvalidInput(message, code="invalid_parameter")


class _Validator:
    def __init__(self, obj: dict):
        self.obj = obj

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self.obj.get(name, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _bad(f"'{name}' must be a whole number from {lo} to {hi}; got {_show(value)}.")
        return value

    def number(self, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        value = self.obj.get(name, default)
        # a JSON integer may be too big for a float: compare it exactly instead of calling isfinite
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (isinstance(value, int) or math.isfinite(value))
        if ok:
            ok = (value > lo if lo_open else value >= lo) and value <= hi
        if not ok:
            low = f"greater than {lo:g}" if lo_open else f"at least {lo:g}"
            raise _bad(f"'{name}' must be a number {low} and at most {hi:g}; got {_show(value)}.")
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.obj.get(name, default)
        if not isinstance(value, bool):
            raise _bad(f"'{name}' must be true or false; got {_show(value)}.")
        return value


def _show(value: object) -> str:
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    return text if len(text) <= 40 else text[:37] + "..."
