"""``blip2-batch``: answer a folder of CSV files or images on this machine, resumably.

    blip2-batch INPUT... --out OUT.csv|OUT.jsonl [--question Q [--raw-prompt]] [--parameters JSON]
                [--model DIR|demo|HUB_ID] [--chunk N] [--quiet]

INPUT: CSV files as the Azure batch samples write them, image files, or folders of either
(searched recursively; hidden files and other types are left out). Each row is answered by
the same ``Service`` (engine, batching, image checks) as the endpoints; see ``blip2.batch``.

OUT gets one record per row, fields ``file, row, image, text, error``:
``file`` is the input path as found, ``row`` the row number within it (CSV index value, or the
row's position when the index repeats values; 0 for an image file; -1 for a file that could not be read), ``image`` the URL, the image file's path
or ``<base64 N chars>``, ``text`` the answer, ``error`` ``ERROR[<code>]: <message>``. In CSV
the missing one of text/error is empty; in JSONL it is null.

Resuming: OUT is read first and every ``(file, row)`` already in it is skipped, so an
interrupted run continues where it stopped when run again with the same inputs (however their
paths are spelled: files are compared by their real paths). Rows answered with an error count as
done; delete their lines from OUT to try them again. Records are
appended and flushed after each chunk: Ctrl-C loses at most the chunk in flight. Exit status:
0 done (row errors are in OUT), 1 stopped by a failure of a whole chunk (deadline, model
error; rerun to resume), 2 bad arguments or a model that cannot load, 130 interrupted (rerun
to resume). OUT is never read as an input, even inside an input folder.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from dataclasses import replace
from itertools import chain
from pathlib import Path
from typing import Iterable, Sequence

from .batch import DEFAULT_CHUNK, BatchResult, chunk_size_from_text, error_marker, file_kind, parameters_from_json
from .batch import answer_items, question_prompt, read_items, row_numbers
from .errors import ServiceError

FIELDS = ("file", "row", "image", "text", "error")


class UsageError(Exception):
    """A bad argument or input; the message says what to change. Exit status 2."""


class Output:
    """The output file: which (file, row) pairs it holds, and appending records to it."""

    def __init__(self, path: Path):
        suffix = path.suffix.lower()
        if suffix not in (".csv", ".jsonl"):
            raise UsageError(f"--out {path} must end in .csv or .jsonl")
        self.path, self.kind = path, suffix[1:]
        self._handle = None

    def done(self) -> set[tuple[str, int]]:
        """Keys already in the file. A last line cut off by an interruption is removed, but only
        once the rest has been read as this command's output: any other file is left untouched."""
        if not self.path.exists():
            return set()
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1 if data and not data.endswith(b"\n") else len(data)
        try:
            text = data[:keep].decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{self.path} exists but is not a blip2-batch output (not UTF-8 text); "
                             "choose another --out or delete it") from None
        keys = self._csv_keys(text) if self.kind == "csv" else self._jsonl_keys(text)  # raises for other files
        if keep < len(data):
            tail = data[keep:]
            # the complete lines were read as ours (else raised above), or the file holds only the cut-off
            # start of our header or first record
            ours = bool(text.strip()) or (self.kind == "csv" and ",".join(FIELDS).encode().startswith(tail)) \
                or (self.kind == "jsonl" and tail.startswith(b'{"file": '))
            if not ours:
                raise UsageError(f"{self.path} exists but is not a blip2-batch output; choose another --out or delete it")
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)
        return keys

    def _csv_keys(self, text: str) -> set[tuple[str, int]]:
        records = list(csv.reader(io.StringIO(text, newline="")))
        if not records:
            return set()
        if tuple(records[0]) != FIELDS:
            raise UsageError(f"{self.path} exists but is not a blip2-batch output (its header is not "
                             f"{','.join(FIELDS)}); choose another --out or delete it")
        keys = set()
        for n, record in enumerate(records[1:], start=2):
            if len(record) != len(FIELDS):
                self._bad(n)
            keys.add(self._key(record[0], record[1], n))
        return keys

    def _jsonl_keys(self, text: str) -> set[tuple[str, int]]:
        keys = set()
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                keys.add(self._key(record["file"], record["row"], n))
            except (ValueError, KeyError, TypeError):
                self._bad(n)
        return keys

    def _key(self, file: object, row: object, line: int) -> tuple[str, int]:
        try:
            return (str(file), int(row))
        except (TypeError, ValueError):
            self._bad(line)

    def _bad(self, line: int):
        raise UsageError(f"{self.path} line {line} is not a blip2-batch record; fix or delete that line, or choose another --out")

    def append(self, results: Iterable[BatchResult]) -> None:
        """Write ``results`` and flush them to disk."""
        if self._handle is None:
            new = not self.path.exists() or self.path.stat().st_size == 0
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8", newline="")
            self._csv = csv.writer(self._handle, lineterminator="\n")
            if new and self.kind == "csv":
                self._csv.writerow(FIELDS)
        for r in results:
            error = error_marker(r.error) if r.error is not None else None
            if self.kind == "csv":
                self._csv.writerow([r.file, r.row, r.source, r.text or "", error or ""])
            else:
                record = dict(zip(FIELDS, (r.file, r.row, r.source, r.text, error)))
                self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def find_inputs(args: Sequence[str], leave_out: Path | None = None) -> list[Path]:
    """Input files in argument order, folders expanded (sorted, recursive), each file once;
    ``leave_out`` (the output file, which may sit in an input folder) is never an input."""
    found, seen = [], {leave_out.resolve()} if leave_out is not None else set()
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and file_kind(p) is not None
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            files = [path]
        else:
            raise UsageError(f"input {arg} does not exist")
        for file in files:
            if file.resolve() not in seen:
                seen.add(file.resolve())
                found.append(file)
    if not found:
        raise UsageError("no .csv or image files found in the inputs")
    return found


def _load_service(settings):
    """Load the model (a seam for tests, which share one Service across runs)."""
    from .service import Service

    return Service.from_settings(settings)


DESCRIPTION = "Answer questions about images in CSV files or image folders, resumably."


def configure(p: argparse.ArgumentParser) -> None:
    """Add the batch arguments to ``p`` (also used by ``blip2 batch``)."""
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="CSV files, image files, or folders of them")
    p.add_argument("--out", required=True, help="output file, .csv or .jsonl; an existing one is resumed")
    p.add_argument("--question", default="", help='question asked of every image file, sent as "Question: Q Answer:" '
                   '(default: a caption); text ending in "Answer:" is sent as it is')
    p.add_argument("--raw-prompt", action="store_true", help="send --question as it is, as the model's whole prompt")
    p.add_argument("--parameters", default="", help='generation parameters as JSON, e.g. \'{"max_new_tokens": 30}\'')
    p.add_argument("--model", help="demo, a local model folder, or a hub id (default: BLIP2_MODEL, else the hub model)")
    p.add_argument("--chunk", default=str(DEFAULT_CHUNK), help=f"rows per model call (default {DEFAULT_CHUNK})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip2-batch", description=DESCRIPTION)
    configure(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    return run(_parser().parse_args(argv))


def _missing_engine() -> list[str]:
    """The engine's modules this install lacks (``pip install .`` alone installs only the client)."""
    import importlib.util

    return [name for name in ("torch", "transformers", "pandas", "PIL") if importlib.util.find_spec(name) is None]


def run(args: argparse.Namespace) -> int:
    """Answer the inputs named by parsed ``args``; returns the exit status."""
    missing = _missing_engine()
    if missing:
        print(f"blip2-batch: error: this command runs the model here, and this install lacks {', '.join(missing)}; "
              "install torch, then `pip install '.[engine]'` (or `make install`)", file=sys.stderr)
        return 2
    try:
        env = dict(os.environ)
        if args.model:
            env["BLIP2_MODEL"] = args.model
        env.setdefault("BLIP2_WARMUP", "0")  # the first chunk shows the memory cost anyway
        settings = _settings(env)
        params = parameters_from_json(args.parameters, settings.caps, "--parameters")
        chunk = chunk_size_from_text(args.chunk, "--chunk")
        out = Output(Path(args.out))
        inputs = find_inputs(args.inputs, leave_out=Path(args.out))
        done = out.done()
    except (UsageError, ValueError) as err:
        print(f"blip2-batch: error: {err}", file=sys.stderr)
        return 2
    # the same file may be named differently from the run that wrote OUT: compare real paths
    answered_before = {(os.path.realpath(file), n) for file, n in done}
    numbers = {p: row_numbers(p) for p in inputs}
    skip = {(str(p), n) for p in inputs for n in numbers[p] if (os.path.realpath(p), n) in answered_before}
    pending = sum(len(numbers[p]) for p in inputs) - len(skip)
    if pending == 0:
        print(f"blip2-batch: nothing to do, every row of the inputs is already in {out.path}", file=sys.stderr)
        return 0
    print(f"blip2-batch: {pending} rows to answer ({len(done)} already in {out.path})", file=sys.stderr)
    try:
        service = _load_service(settings)
    except (RuntimeError, ValueError, OSError) as err:  # ModelNotFound and friends say what to fix
        print(f"blip2-batch: error: could not load the model: {err}", file=sys.stderr)
        return 2
    items = chain.from_iterable(
        read_items(p, question=question, name=str(p), skip=skip, max_image_bytes=settings.images.max_bytes)
        for p in inputs
    )
    question = args.question.strip() if args.raw_prompt else question_prompt(args.question)
    answered = failed = 0
    bar = _progress(pending, disable=args.quiet)
    try:
        for results in answer_items(service, items, params, chunk):
            out.append(results)
            answered += len(results)
            failed += sum(1 for r in results if r.error is not None)
            bar.update(len(results))
    except KeyboardInterrupt:
        print(f"\nblip2-batch: interrupted; {answered} rows saved in {out.path}. Run the same command to resume.", file=sys.stderr)
        return 130
    except ServiceError as err:  # a whole chunk failed (deadline, model failure): resumable
        print(f"\nblip2-batch: stopped: {err.message}\n{answered} rows saved in {out.path}. "
              "Run the same command to resume.", file=sys.stderr)
        return 1
    finally:
        bar.close()
        out.close()
        service.close()
    print(f"blip2-batch: {answered} rows answered ({failed} errors) -> {out.path}", file=sys.stderr)
    return 0


def _settings(env: dict):
    from .config import Settings

    settings = Settings.from_env(env)
    if "BLIP2_REQUEST_TIMEOUT_S" not in env:  # a chunk on a CPU can take minutes
        settings = replace(settings, request_timeout_s=3600.0)
    return settings


def _progress(total: int, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="row", file=sys.stderr, disable=disable, dynamic_ncols=True)


if __name__ == "__main__":
    sys.exit(main())
