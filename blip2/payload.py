"""Request parsing: untrusted JSON -> typed rows and generation parameters.

Knows nothing of images or the model. Accepted shapes of ``input_data``:

* pandas "split" orientation: ``{"columns": [...], "index": [...], "data": [[...], ...]}``
  with the columns in any order; ``image`` is required, ``text`` optional (captioning);
* a list of records: ``[{"image": ..., "text": ...}, ...]``.

Next to ``input_data`` an optional ``parameters`` object sets generation options.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .config import ParamCaps
from .errors import InvalidInput, PayloadTooLarge
from .params import GenerationParams, parse_parameters

COLUMNS = ("image", "text")
_EXAMPLE = '{"input_data": {"columns": ["image", "text"], "index": [0], "data": [["<URL or base64>", "Question: ... Answer:"]]}}'


@dataclass(frozen=True)
class Row:
    """One question about one image. ``index`` is the row's position in ``data`` (0-based)."""

    index: int
    image: str
    prompt: str  # whitespace-stripped; "" means captioning


@dataclass(frozen=True)
class ScoreRequest:
    rows: tuple[Row, ...]
    params: GenerationParams


def parse_body(raw: str | bytes, max_bytes: int) -> object:
    """Decode a request body to JSON; 413 over ``max_bytes``, 400 for bad UTF-8 or JSON."""
    if len(raw) > max_bytes:
        raise PayloadTooLarge(
            f"The request body is {len(raw)} bytes, over the limit of {max_bytes}. "
            "Send fewer or smaller images per request.",
            code="body_too_large",
        )
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")  # a leading byte-order mark is dropped (Windows PowerShell 5 sends one)
        except UnicodeDecodeError:
            raise InvalidInput("The request body is not UTF-8 text. Send a UTF-8 JSON body.", code="invalid_json") from None
    elif raw.startswith("\ufeff"):
        raw = raw[1:]
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidInput(f"The request body is not valid JSON. Send a body like {_EXAMPLE}.", code="invalid_json") from None


def parse_request(body: object, max_rows: int = 64, caps: ParamCaps = ParamCaps()) -> ScoreRequest:
    """Validate a decoded JSON body; raises ``InvalidInput`` / ``PayloadTooLarge`` with the row at fault."""
    if not isinstance(body, dict) or "input_data" not in body:
        raise InvalidInput(f"The body must be a JSON object with an 'input_data' key, like {_EXAMPLE}.", code="missing_input_data")
    extra = sorted(set(body) - {"input_data", "parameters"})
    if extra:
        raise InvalidInput(
            f"Unknown top-level key {extra[0]!r}; the body takes 'input_data' and optionally 'parameters'.",
            code="invalid_input",
        )
    params = parse_parameters(body.get("parameters"), caps)
    data = body["input_data"]
    if isinstance(data, dict):
        cells = _split_rows(data)
    elif isinstance(data, list):
        cells = _record_rows(data)
    else:
        raise InvalidInput(
            "'input_data' must be an object with 'columns' and 'data' (pandas split orientation) "
            "or a list of {\"image\": ..., \"text\": ...} records.",
            code="invalid_input_data",
        )
    if not cells:
        raise InvalidInput("'input_data' has no rows; send at least one [image, text] row.", code="empty_input")
    if len(cells) > max_rows:
        raise PayloadTooLarge(
            f"The request has {len(cells)} rows, over the limit of {max_rows} per request. Split it into smaller requests.",
            code="too_many_rows",
        )
    rows = tuple(_make_row(i, image, text) for i, (image, text) in enumerate(cells))
    return ScoreRequest(rows=rows, params=params)


def _split_rows(data: dict) -> list[tuple[object, object]]:
    unknown = sorted(set(data) - {"columns", "index", "data"})
    if unknown:
        raise InvalidInput(f"Unknown key {unknown[0]!r} in 'input_data'; expected 'columns', 'index' and 'data'.", code="invalid_input_data")
    columns = data.get("columns")
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise InvalidInput("'input_data.columns' must be a list of column names such as [\"image\", \"text\"].", code="invalid_columns")
    bad = [c for c in columns if c not in COLUMNS]
    if bad or len(set(columns)) != len(columns) or "image" not in columns:
        what = f"unknown column {bad[0]!r}" if bad else ("a repeated column" if len(set(columns)) != len(columns) else "no 'image' column")
        raise InvalidInput(f"'input_data.columns' has {what}; use [\"image\", \"text\"] (text may be left out for captions).", code="invalid_columns")
    rows = data.get("data")
    if not isinstance(rows, list):
        raise InvalidInput("'input_data.data' must be a list of rows, each a list like [image, text].", code="invalid_input_data")
    index = data.get("index")
    if index is not None and (not isinstance(index, list) or len(index) != len(rows)):
        raise InvalidInput(
            f"'input_data.index' must be a list with one entry per row ({len(rows)}); or leave it out.",
            code="invalid_input_data",
        )
    where = {name: pos for pos, name in enumerate(columns)}
    cells = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(columns):
            raise InvalidInput(
                f"Row {i} of 'input_data.data' must be a list of {len(columns)} values in the order of 'columns' {columns}.",
                code="invalid_row",
                row=i,
            )
        cells.append((row[where["image"]], row[where["text"]] if "text" in where else None))
    return cells


def _record_rows(records: list) -> list[tuple[object, object]]:
    cells = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "image" not in record or set(record) - set(COLUMNS):
            raise InvalidInput(
                f"Record {i} of 'input_data' must be an object with 'image' and optionally 'text', and no other keys.",
                code="invalid_row",
                row=i,
            )
        cells.append((record["image"], record.get("text")))
    return cells


def _encodable(text: str) -> bool:
    """False for strings holding lone UTF-16 surrogates (JSON ``\ud800``), which nothing downstream can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _make_row(i: int, image: object, text: object) -> Row:
    if not isinstance(image, str) or not image.strip() or not _encodable(image):
        raise InvalidInput(
            f"Row {i}: 'image' must be a non-empty string: a public http(s) URL or base64-encoded image bytes.",
            code="invalid_image_field",
            row=i,
        )
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise InvalidInput(f"Row {i}: 'text' must be a string (the question or prompt), or empty for a caption.", code="invalid_text", row=i)
    if "\x00" in text or not _encodable(text):
        raise InvalidInput(
            f"Row {i}: 'text' contains a NUL character or an unpaired UTF-16 surrogate; send plain UTF-8 text.",
            code="invalid_text",
            row=i,
        )
    return Row(index=i, image=image.strip(), prompt=text.strip())
