import json

import pytest
from hypothesis import given, settings, strategies as st

from blip2.errors import InvalidInput, PayloadTooLarge, ServiceError
from blip2.payload import parse_body, parse_request


def split(data, columns=("image", "text"), **extra):
    return {"input_data": {"columns": list(columns), "index": list(range(len(data))), "data": data}, **extra}


def test_split_orientation_strips_prompts_and_keeps_order():
    req = parse_request(split([["img-a", "What is in the picture? Answer: "], ["img-b", " q2 "]]))
    assert [(r.index, r.image, r.prompt) for r in req.rows] == [(0, "img-a", "What is in the picture? Answer:"), (1, "img-b", "q2")]


def test_columns_in_any_order_and_text_optional():
    req = parse_request(split([["hello", "img"]], columns=("text", "image")))
    assert (req.rows[0].image, req.rows[0].prompt) == ("img", "hello")
    caption = parse_request(split([["img"]], columns=("image",)))
    assert caption.rows[0].prompt == ""
    none_text = parse_request(split([["img", None]]))
    assert none_text.rows[0].prompt == ""


def test_records_form():
    req = parse_request({"input_data": [{"image": "a", "text": "t"}, {"image": "b"}]})
    assert [(r.image, r.prompt) for r in req.rows] == [("a", "t"), ("b", "")]


@pytest.mark.parametrize(
    "body,code,row",
    [
        ([], "missing_input_data", None),
        ({"input": {}}, "missing_input_data", None),
        ({"input_data": "x"}, "invalid_input_data", None),
        ({"input_data": {"columns": ["image", "txt"], "data": [["a", "b"]]}}, "invalid_columns", None),
        ({"input_data": {"columns": ["image", "image"], "data": [["a", "b"]]}}, "invalid_columns", None),
        ({"input_data": {"columns": "image", "data": [["a"]]}}, "invalid_columns", None),
        ({"input_data": {"columns": ["image"], "data": "a"}}, "invalid_input_data", None),
        ({"input_data": {"columns": ["image"], "index": [0, 1], "data": [["a"]]}}, "invalid_input_data", None),
        ({"input_data": {"columns": ["image"], "data": [["a"], ["b", "c"]]}}, "invalid_row", 1),
        ({"input_data": {"columns": ["image", "text"], "data": [["a", "q"], [7, "q"]]}}, "invalid_image_field", 1),
        ({"input_data": {"columns": ["image", "text"], "data": [["", "q"]]}}, "invalid_image_field", 0),
        ({"input_data": {"columns": ["image", "text"], "data": [["a", ["q"]]]}}, "invalid_text", 0),
        ({"input_data": [{"image": "a", "question": "q"}]}, "invalid_row", 0),
        ({"input_data": [{"image": "a", "text": "what \ud800 is it"}]}, "invalid_text", 0),
        ({"input_data": [{"image": "http://x/\udfff.png"}]}, "invalid_image_field", 0),
        ({"input_data": []}, "empty_input", None),
        ({"input_data": [{"image": "a"}], "params": {}}, "invalid_input", None),
        ({"input_data": [{"image": "a"}], "parameters": {"top_q": 1}}, "invalid_parameter", None),
    ],
)
def test_bad_bodies_name_the_problem(body, code, row):
    with pytest.raises(InvalidInput) as info:
        parse_request(body)
    assert info.value.code == code and info.value.row == row
    assert info.value.status == 400


def test_row_and_body_limits_are_413():
    with pytest.raises(PayloadTooLarge) as info:
        parse_request(split([["a", "q"]] * 5), max_rows=4)
    assert info.value.code == "too_many_rows" and info.value.status == 413
    with pytest.raises(PayloadTooLarge):
        parse_body("x" * 101, max_bytes=100)


def test_parse_body_rejects_bad_utf8_and_json():
    for raw in (b"\xff\xfe", "{", "", "[1,", "NaN-ish"):
        with pytest.raises(InvalidInput) as info:
            parse_body(raw, 1000)
        assert info.value.code == "invalid_json"
    assert parse_body(b'{"a": 1}', 1000) == {"a": 1}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(["image", "text", "columns", "data", "index", "input_data", "parameters", "max_new_tokens", "x"]), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_parser_only_ever_raises_service_errors(value):
    try:
        req = parse_request(value)
    except ServiceError as err:
        assert 400 <= err.status < 500 and err.message
    else:
        assert req.rows and all(isinstance(r.image, str) and r.image for r in req.rows)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_body_parser_never_raises_anything_else(raw):
    try:
        parse_body(raw, 150)
    except ServiceError as err:
        assert err.status in (400, 413)


def test_deeply_nested_json_is_a_400_not_a_crash():
    with pytest.raises(InvalidInput):
        parse_body("[" * 100_000, 10**6)
    assert json.loads("[[]]") == [[]]


def test_a_utf8_byte_order_mark_before_the_json_is_ignored():
    body = '{"input_data": {"columns": ["image", "text"], "index": [0], "data": [["aGk=", "q"]]}}'
    plain = parse_body(body.encode(), 10_000)
    assert parse_body(b"\xef\xbb\xbf" + body.encode(), 10_000) == plain
    assert parse_body("\ufeff" + body, 10_000) == plain
    with pytest.raises(InvalidInput):  # only at the start
        parse_body(body.encode()[:-1] + b"\xef\xbb\xbf}", 10_000)
