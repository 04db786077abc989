"""Batch scoring from files: CSV files and image files -> identified rows -> answers in chunks.

Shared by the Azure ML batch entry script (``deployment/batch/score_batch.py``) and the
local batch CLI (``blip2.batch_cli``). Two steps, each one function:

* ``read_items(path, ...)`` turns one file into ``BatchItem``s, each with its identity
  ``(file, row)``: a CSV file as the published samples write it (``DataFrame({"image": [...],
  "text": [...]}).to_csv(path)``; the unnamed index column gives the row numbers) gives its
  rows; an image file (``.jpg .jpeg .png .webp .gif .bmp``) one row, number 0, asked
  ``question``; anything else, or a CSV that cannot be read, one item with row number
  ``FILE_ROW`` (-1) carrying the error. A bad row becomes an item with its error; the
  others are unaffected.

* ``answer_items(service, items, params, chunk_size)`` sends the items to
  ``Service.score_rows`` ``chunk_size`` at a time (the engine batches each chunk) and
  yields one list of ``BatchResult`` per chunk, in input order.

``run_mini_batch`` puts both together for Azure's ``run(mini_batch)``: a DataFrame with the
columns ``row_number_per_file, text, file_name``; a failed row's text is
``ERROR[<code>]: <message>`` (see ``error_marker``).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Sequence

from .client import format_prompt
from .config import ParamCaps
from .errors import InvalidInput, PayloadTooLarge, ServiceError
from .params import GenerationParams, parse_parameters
from .payload import Row

if TYPE_CHECKING:  # the service pulls in torch; this module is typed against it only
    import pandas as pd

    from .service import Service

log = logging.getLogger("blip2.batch")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
CSV_SUFFIXES = frozenset({".csv"})
FILE_ROW = -1  # row number of an item that stands for a whole file that could not be read
DEFAULT_CHUNK = 64
OUTPUT_COLUMNS = ("row_number_per_file", "text", "file_name")  # the published reader's names
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_CSV_HOW = 'write it with pandas: DataFrame({"image": [...], "text": [...]}).to_csv(path)'


@dataclass(frozen=True)
class BatchOptions:
    """What the batch entry script reads from the environment (see ``from_env``)."""

    question: str = ""  # asked of every image file; "" asks for a caption
    params: GenerationParams = field(default_factory=GenerationParams)
    chunk_size: int = DEFAULT_CHUNK  # rows per Service.score_rows call

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, caps: ParamCaps = ParamCaps()) -> "BatchOptions":
        """Read BLIP2_BATCH_QUESTION (see ``question_prompt``), BLIP2_BATCH_PARAMETERS (JSON) and BLIP2_BATCH_CHUNK.

        Raises ValueError naming the variable and what to set it to.
        """
        env = os.environ if env is None else env
        return cls(
            question=question_prompt(env.get("BLIP2_BATCH_QUESTION", "")),
            params=parameters_from_json(env.get("BLIP2_BATCH_PARAMETERS", ""), caps, "BLIP2_BATCH_PARAMETERS"),
            chunk_size=chunk_size_from_text(env.get("BLIP2_BATCH_CHUNK", ""), "BLIP2_BATCH_CHUNK"),
        )


def question_prompt(question: str) -> str:
    """The prompt for a question asked of every image file: a plain question becomes BLIP-2's
    ``Question: ... Answer:`` (as ``blip2 ask`` does); text that already ends in ``Answer:`` is a
    prompt and is kept as it is; blank asks for a caption."""
    text = question.strip()
    if not text or text.lower().endswith("answer:"):
        return text
    return format_prompt(text)


def parameters_from_json(text: str, caps: ParamCaps, source: str) -> GenerationParams:
    """A JSON object of generation parameters ("" = defaults); ValueError names ``source``."""
    if not text.strip():
        return GenerationParams()
    try:
        obj = json.loads(text)
    except ValueError:
        raise ValueError(f'{source} is not valid JSON; set it to an object such as {{"max_new_tokens": 30}}.') from None
    try:
        return parse_parameters(obj, caps)
    except InvalidInput as err:
        raise ValueError(f"{source}: {err.message}") from None


def chunk_size_from_text(text: str, source: str) -> int:
    """A whole number >= 1 ("" = DEFAULT_CHUNK); ValueError names ``source``."""
    if not text.strip():
        return DEFAULT_CHUNK
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{source} is {text!r}; set it to a whole number of rows >= 1 (default {DEFAULT_CHUNK}).")
    return value


@dataclass(frozen=True)
class BatchItem:
    """One row of one input file, ready for the service or already failed."""

    file: str  # identity: the file's label (base name on Azure, path in the CLI)
    row: int  # identity: the CSV index value, 0 for an image file, FILE_ROW for a whole file
    source: str  # what the image was, for reports: a URL, a path, or "<base64 N chars>"
    request: Row | None  # what the service is asked; None when ``error`` is set
    error: ServiceError | None = None


@dataclass(frozen=True)
class BatchResult:
    """The outcome of one item: ``text`` on success, ``error`` otherwise (never both)."""

    file: str
    row: int
    source: str
    text: str | None
    error: ServiceError | None


def error_marker(err: ServiceError) -> str:
    """The one-line text that stands for a failed row: ``ERROR[<code>]: <message>``."""
    message = " ".join(str(err.message).split())
    return f"ERROR[{err.code}]: {message}"


def file_kind(path: str | os.PathLike) -> str | None:
    """``"csv"``, ``"image"`` or None (unsupported), from the file name's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    return None


def read_items(
    path: str | os.PathLike,
    *,
    question: str = "",
    name: str | None = None,
    skip: frozenset | set = frozenset(),
    max_image_bytes: int | None = None,
) -> Iterator[BatchItem]:
    """The items of one input file, in file order (see the module docstring).

    CSV: the first column, when its header is empty (pandas' index), holds the row numbers
    (whole numbers); without it, or when it repeats a value, rows are numbered 0, 1, ... by position. ``image`` is required (public
    URL or base64, MIME line breaks allowed); ``text`` is optional (empty or absent: a
    caption); other columns are ignored. Cells are read as text, never as NaN.
    ``name`` labels the items (default: the file's base name). Items whose ``(name, row)``
    is in ``skip`` are left out; an image file in ``skip`` is not even opened. An image file
    over ``max_image_bytes`` fails with ``image_too_large`` without being read. Never raises
    for bad input: problems become items with an error.
    """
    path = Path(path)
    name = os.path.basename(path) if name is None else name
    kind = file_kind(path)
    if kind == "image":
        if (name, 0) not in skip:
            yield _image_item(path, name, question, max_image_bytes)
        return
    try:
        if kind is None:
            raise InvalidInput(
                f"The file {name!r} is neither a .csv file nor an image ({' '.join(sorted(IMAGE_SUFFIXES))}); "
                "remove it from the input or convert it.",
                code="unsupported_file",
            )
        numbers, images, texts = _read_csv(path, name)
    except ServiceError as err:
        if (name, FILE_ROW) not in skip:
            yield BatchItem(name, FILE_ROW, str(path), None, err.with_row(FILE_ROW))
        return
    for number, image, text in zip(numbers, images, texts):
        if (name, number) in skip:
            continue
        cell = image.strip()
        source = cell if _URL_RE.match(cell) or not cell else f"<base64 {len(image)} chars>"
        try:
            request, error = _csv_row(number, image, text), None
        except ServiceError as err:
            request, error = None, err.with_row(number)
        yield BatchItem(name, number, source, request, error)


def row_numbers(path: str | os.PathLike) -> list[int]:
    """The row numbers ``read_items`` gives this file: ``[0]`` for an image (not opened),
    the CSV's row numbers, or ``[FILE_ROW]`` for a file it cannot read."""
    kind = file_kind(path)
    if kind == "image":
        return [0]
    if kind is None:
        return [FILE_ROW]
    try:
        return _read_csv(Path(path), os.path.basename(path))[0]
    except ServiceError:
        return [FILE_ROW]


def answer_items(
    service: "Service", items: Iterable[BatchItem], params: GenerationParams, chunk_size: int = DEFAULT_CHUNK
) -> Iterator[list[BatchResult]]:
    """Answer ``items`` ``chunk_size`` at a time; yields each chunk's results in input order.

    Items are consumed lazily, so only one chunk's images are held. Failed items pass
    through as results in their place. A row the service refuses gets its error; an error
    that fails a whole chunk (deadline, shutdown, model failure) is raised, with the chunk's
    results not yielded, so the caller can retry or resume.
    """
    chunk: list[BatchItem] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= chunk_size:
            yield _answer_chunk(service, chunk, params)
            chunk = []
    if chunk:
        yield _answer_chunk(service, chunk, params)


def run_mini_batch(service: "Service", paths: Sequence[str | os.PathLike], options: BatchOptions) -> "pd.DataFrame":
    """Azure's ``run(mini_batch)``: answer every row of every file, one output row each.

    Returns a DataFrame with the columns ``OUTPUT_COLUMNS`` in that order: the row number
    within its file, the answer (or ``error_marker``), the file's base name. Raises what
    ``answer_items`` raises when a whole chunk fails, so that Azure retries the mini-batch.
    """
    import pandas as pd

    max_bytes = service.settings.images.max_bytes
    items = (
        item
        for path in paths
        for item in read_items(os.fspath(path), question=options.question, max_image_bytes=max_bytes)
    )
    records, failed = [], 0
    for results in answer_items(service, items, options.params, options.chunk_size):
        records.extend((r.row, r.text if r.error is None else error_marker(r.error), r.file) for r in results)
        failed += sum(r.error is not None for r in results)
    log.info("Mini-batch of %d files done: %d rows, %d errors", len(paths), len(records), failed)
    return pd.DataFrame.from_records(records, columns=list(OUTPUT_COLUMNS))


# -- helpers --------------------------------------------------------------------------------
def _answer_chunk(service: "Service", chunk: list[BatchItem], params: GenerationParams) -> list[BatchResult]:
    rows = [item.request for item in chunk if item.request is not None]
    answers = iter(service.score_rows(rows, params) if rows else [])
    results = []
    for item in chunk:
        outcome = next(answers) if item.request is not None else item.error
        if isinstance(outcome, ServiceError):
            results.append(BatchResult(item.file, item.row, item.source, None, outcome))
        else:
            results.append(BatchResult(item.file, item.row, item.source, outcome, None))
    return results


def _image_item(path: Path, name: str, question: str, max_bytes: int | None) -> BatchItem:
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise PayloadTooLarge(
                f"The image file is over the {max_bytes / (1024 * 1024):g} MB limit; shrink it or raise BLIP2_MAX_IMAGE_MB.",
                code="image_too_large",
            )
        data = path.read_bytes()
    except OSError:
        error = InvalidInput(f"The file {name!r} could not be read; check that it exists and is readable.", code="unreadable_file")
        return BatchItem(name, 0, str(path), None, error.with_row(0))
    except ServiceError as err:
        return BatchItem(name, 0, str(path), None, err.with_row(0))
    return BatchItem(name, 0, str(path), Row(index=0, image=base64.b64encode(data).decode("ascii"), prompt=question))


def _read_csv(path: Path, name: str) -> tuple[list[int], list[str], list[str | None]]:
    """(row numbers, image cells, text cells or None) of a CSV; InvalidInput ``invalid_csv``."""
    import pandas as pd

    def bad(why: str) -> InvalidInput:
        return InvalidInput(f"The CSV file {name!r} {why}; {_CSV_HOW}.", code="invalid_csv")

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except UnicodeDecodeError:
        raise bad("is not UTF-8 text") from None
    except pd.errors.EmptyDataError:
        raise bad("is empty") from None
    except OSError:
        raise bad("could not be opened") from None
    except (pd.errors.ParserError, ValueError) as exc:
        log.warning("CSV %s could not be parsed: %s", name, exc)
        raise bad("could not be parsed as CSV (the batch log has the parser's detail)") from None
    columns = [str(c) for c in frame.columns]
    if "image" not in columns:
        shown = ", ".join(repr(c) for c in columns[:6])
        raise bad(f"has no 'image' column (its columns: {shown})")
    if columns[0].startswith("Unnamed: 0"):  # pandas' name for the empty header of to_csv's index
        numbers = []
        for position, value in enumerate(frame.iloc[:, 0]):
            try:
                numbers.append(int(value))
            except ValueError:
                raise bad(f"has {value[:20]!r} in its first, unnamed (index) column at data line {position + 1}; "
                          "that column must hold whole row numbers") from None
        if len(set(numbers)) < len(numbers):  # pd.concat(...).to_csv() repeats index values: they name no row
            log.warning("CSV %s repeats index values; its rows are numbered by position instead", name)
            numbers = list(range(len(frame)))
    else:
        numbers = list(range(len(frame)))
    images = frame["image"].tolist()
    texts = frame["text"].tolist() if "text" in columns else [None] * len(frame)
    return numbers, images, texts


def _csv_row(number: int, image: str, text: str | None) -> Row:
    """Validate one CSV row's cells; InvalidInput with the online contract's codes."""
    if not image.strip():
        raise InvalidInput(
            f"Row {number}: the 'image' cell is empty; put a public http(s) URL or base64 image bytes in it.",
            code="invalid_image_field",
        )
    text = text or ""
    if "\x00" in text:
        raise InvalidInput(f"Row {number}: the 'text' cell contains a NUL character; remove it.", code="invalid_text")
    return Row(index=number, image=image.strip(), prompt=text.strip())
