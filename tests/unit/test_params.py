import pytest

from blip2.config import ParamCaps
from blip2.errors import InvalidInput
from blip2.params import GenerationParams, parse_parameters


def test_defaults_are_greedy_30_tokens():
    p = parse_parameters(None)
    assert p == GenerationParams() and p.max_new_tokens == 30 and not p.do_sample and p.num_beams == 1
    kwargs = p.generate_kwargs()
    assert kwargs["do_sample"] is False and "temperature" not in kwargs and "top_p" not in kwargs


def test_sampling_knobs_pass_through_only_when_sampling():
    p = parse_parameters({"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20})
    assert p.generate_kwargs()["temperature"] == 0.7 and p.generate_kwargs()["top_k"] == 20
    beams = parse_parameters({"num_beams": 3, "length_penalty": -1})
    assert beams.generate_kwargs()["length_penalty"] == -1.0


@pytest.mark.parametrize(
    "params",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": 257},
        {"max_new_tokens": True},
        {"max_new_tokens": "30"},
        {"max_new_tokens": 3.5},
        {"min_new_tokens": 40},  # above the default max_new_tokens of 30
        {"num_beams": 9},
        {"do_sample": 1},
        {"temperature": 0},
        {"temperature": 1e-39},  # the logits divided by it overflow and sampling fails: the client's mistake
        {"temperature": 0.009},
        {"temperature": float("inf")},
        {"temperature": 10**400},  # a JSON integer too big for a float
        {"top_p": 1.5},
        {"top_k": -1},
        {"repetition_penalty": 0},
        {"repetition_penalty": 1e-40},
        {"no_repeat_ngram_size": 21},
        {"unknown": 1},
        [1, 2],
        "max_new_tokens=3",
    ],
)
def test_bad_values_are_invalid_parameter(params):
    with pytest.raises(InvalidInput) as info:
        parse_parameters(params)
    assert info.value.code == "invalid_parameter"


def test_caps_come_from_settings():
    caps = ParamCaps(max_new_tokens=10, num_beams=2, top_k=5)
    assert parse_parameters({"max_new_tokens": 10}, caps).max_new_tokens == 10
    with pytest.raises(InvalidInput, match="1 to 10"):
        parse_parameters({"max_new_tokens": 11}, caps)
    assert parse_parameters({"max_new_tokens": 12.0}).max_new_tokens == 12


def test_knobs_that_cannot_act_do_not_split_batches():
    """The batcher groups requests by equal parameters: greedy requests that name sampling or beam
    knobs generate exactly as without them, so they must compare equal."""
    plain = parse_parameters({"max_new_tokens": 12})
    named = parse_parameters({"max_new_tokens": 12, "temperature": 0.3, "top_p": 0.5, "top_k": 7, "length_penalty": 2})
    assert named == plain and hash(named) == hash(plain)
    assert named.generate_kwargs() == plain.generate_kwargs()
    # where they act, they are kept and they separate requests
    sampled = parse_parameters({"do_sample": True, "temperature": 0.3, "top_p": 0.5, "top_k": 7})
    assert (sampled.temperature, sampled.top_p, sampled.top_k) == (0.3, 0.5, 7)
    assert sampled != parse_parameters({"do_sample": True})
    beams = parse_parameters({"num_beams": 2, "length_penalty": 2})
    assert beams.length_penalty == 2.0 and beams != parse_parameters({"num_beams": 2})
    # an out-of-range knob is still refused even where it could not act
    with pytest.raises(InvalidInput):
        parse_parameters({"temperature": -1})


def test_the_smallest_temperature_and_penalty_allowed_are_accepted():
    p = parse_parameters({"do_sample": True, "temperature": 0.01, "repetition_penalty": 0.01})
    assert p.temperature == 0.01 and p.repetition_penalty == 0.01
