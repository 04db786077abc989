"""``blip2-batch``: folders of CSV files and images on disk -> CSV or JSONL, resumable.

One Service is built per module and shared by the runs through the CLI's ``_load_service``
seam, wrapped so that the test counts the rows each run sends to it; one run goes through
the real loading path (``--model DIR``). Interruptions are simulated twice: Ctrl-C after the
first chunk (the CLI's own KeyboardInterrupt path), and an output file cut mid-line as a
kill during a write leaves it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

import blip2.batch_cli as batch_cli
from blip2.batch import error_marker
from blip2.batch_cli import FIELDS, main
from blip2.config import Settings
from blip2.params import GenerationParams
from blip2.payload import Row
from blip2.service import Service
from support import b64, picture

QUESTION = "Question: what is in the picture? Answer:"
PARAMS = '{"max_new_tokens": 4}'
CHUNK = 3


class CountingService:
    """The shared Service, counting what each run sends; close() leaves it running."""

    def __init__(self, service: Service):
        self.service = service
        self.settings = service.settings
        self.sent: list[Row] = []
        self.loads = 0

    def score_rows(self, rows, params):
        assert params == GenerationParams(max_new_tokens=4)
        self.sent.extend(rows)
        return self.service.score_rows(rows, params)

    def close(self):
        pass


@pytest.fixture(scope="module")
def shared(tiny_model_dir):
    service = Service.from_settings(Settings.from_env({
        "BLIP2_MODEL": str(tiny_model_dir), "BLIP2_WARMUP": "0", "BLIP2_MAX_BATCH_SIZE": "4", "BLIP2_DTYPE": "float32",
        "BLIP2_ALLOW_PRIVATE_URLS": "1",
    }))
    yield service
    service.close()


@pytest.fixture
def counting(shared, monkeypatch):
    wrapper = CountingService(shared)

    def load(settings):
        wrapper.loads += 1
        return wrapper

    monkeypatch.setattr(batch_cli, "_load_service", load)
    return wrapper


@pytest.fixture(scope="module")
def data(tmp_path_factory, image_host, shared):
    """A folder of 2 CSV files and 2 images (plus files the folder scan must skip), and the
    expected outcome per (file, row): the answer text, or the error marker."""
    root = tmp_path_factory.mktemp("cli-input")
    folder = root / "in"
    (folder / "pictures").mkdir(parents=True)
    pngs = [picture(color=(50 * i, 180 - 40 * i, 60), seed=i) for i in range(4)]
    url = image_host.add("/cli/shape.png", picture(color=(200, 200, 0), seed=3))
    a_images = [b64(pngs[0]), url, b64(b"not an image"), b64(pngs[1]), b64(pngs[2])]
    a_texts = ["Question: what color is the shape? Answer:", "", "Question: what? Answer:", "x", " Question: why? Answer: "]
    pd.DataFrame({"image": a_images, "text": a_texts}).to_csv(folder / "a.csv")
    pd.DataFrame({"image": [b64(pngs[3]), b64(pngs[0]), url], "text": ["", "Question: how many? Answer:", "q"]},
                 index=[7, 8, 9]).to_csv(folder / "b.csv")
    (folder / "pictures" / "c.png").write_bytes(pngs[1])
    (folder / "pictures" / "d.jpg").write_bytes(picture(color=(0, 0, 200), fmt="JPEG", seed=9))
    (folder / "notes.txt").write_text("skipped by the folder scan", encoding="utf-8")
    (folder / ".hidden.csv").write_text("image,text\n", encoding="utf-8")

    rows = {
        folder / "a.csv": [Row(i, img.strip(), t.strip()) for i, (img, t) in enumerate(zip(a_images, a_texts))],
        folder / "b.csv": [Row(7, b64(pngs[3]).strip(), ""), Row(8, b64(pngs[0]).strip(), "Question: how many? Answer:"),
                           Row(9, url, "q")],
        folder / "pictures" / "c.png": [Row(0, _plain_b64(folder / "pictures" / "c.png"), QUESTION)],
        folder / "pictures" / "d.jpg": [Row(0, _plain_b64(folder / "pictures" / "d.jpg"), QUESTION)],
    }
    expected = {}
    for path, file_rows in rows.items():
        for row, answer in zip(file_rows, shared.score_rows(file_rows, GenerationParams(max_new_tokens=4))):
            expected[(str(path), row.index)] = answer if isinstance(answer, str) else error_marker(answer)
    assert sum(v.startswith("ERROR[invalid_image]") for v in expected.values()) == 1
    return folder, expected


def _plain_b64(path: Path) -> str:
    import base64

    return base64.b64encode(path.read_bytes()).decode()


def _args(folder: Path, out: Path, *extra: str) -> list[str]:
    return [str(folder), "--out", str(out), "--question", QUESTION, "--parameters", PARAMS,
            "--chunk", str(CHUNK), "--quiet", *extra]


def read_output(out: Path) -> list[dict]:
    """The records, with text/error normalised to str-or-None for both formats."""
    if out.suffix == ".jsonl":
        records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    else:
        with open(out, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            assert tuple(reader.fieldnames) == FIELDS
            records = [{**r, "row": int(r["row"]), "text": r["text"], "error": r["error"] or None} for r in reader]
    for record in records:
        assert tuple(record) == FIELDS
    return records


def outcome(record: dict) -> str:
    return record["error"] if record["error"] is not None else record["text"]


def assert_complete(out: Path, expected: dict) -> list[dict]:
    records = read_output(out)
    keys = [(r["file"], r["row"]) for r in records]
    assert sorted(keys) == sorted(expected), "every row exactly once"
    for record in records:
        assert outcome(record) == expected[(record["file"], record["row"])]
    return records


def test_a_run_with_the_real_model_loading_answers_every_row(data, tiny_model_dir, tmp_path, monkeypatch, capsys):
    folder, expected = data
    monkeypatch.setenv("BLIP2_ALLOW_PRIVATE_URLS", "1")  # the image host is on loopback
    out = tmp_path / "answers.csv"
    args = _args(folder, out, "--model", str(tiny_model_dir))
    args.remove("--quiet")  # the progress bar too
    assert main(args) == 0
    records = assert_complete(out, expected)
    by_key = {(r["file"], r["row"]): r for r in records}
    bad = by_key[(str(folder / "a.csv"), 2)]
    assert bad["text"] == "" and bad["error"].startswith("ERROR[invalid_image]: ")
    assert by_key[(str(folder / "a.csv"), 0)]["image"].startswith("<base64 ")
    assert by_key[(str(folder / "a.csv"), 1)]["image"].startswith("http://127.0.0.1:")
    assert by_key[(str(folder / "pictures" / "c.png"), 0)]["image"] == str(folder / "pictures" / "c.png")
    assert sum(r["error"] is None for r in records) == len(records) - 1
    assert "10 rows answered (1 errors)" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_ctrl_c_after_a_chunk_then_rerun_answers_only_the_rest(data, counting, tmp_path, monkeypatch, suffix):
    folder, expected = data
    out = tmp_path / f"answers{suffix}"
    real_answer_items = batch_cli.answer_items

    def interrupted(*args, **kwargs):
        chunks = real_answer_items(*args, **kwargs)
        yield next(chunks)
        raise KeyboardInterrupt

    monkeypatch.setattr(batch_cli, "answer_items", interrupted)
    assert main(_args(folder, out)) == 130
    assert len(read_output(out)) == CHUNK and len(counting.sent) == CHUNK
    first = list(counting.sent)

    monkeypatch.setattr(batch_cli, "answer_items", real_answer_items)
    assert main(_args(folder, out)) == 0
    assert len(counting.sent) - len(first) == len(expected) - CHUNK  # only the missing rows were sent
    assert_complete(out, expected)
    questions = [r.prompt for r in counting.sent].count(QUESTION)
    assert questions == 2  # the image files, each asked once

    assert main(_args(folder, out)) == 0  # nothing left: the model is not even loaded
    assert counting.loads == 2 and len(counting.sent) == len(expected)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_an_output_cut_mid_line_is_repaired_and_completed(data, counting, tmp_path, suffix):
    folder, expected = data
    out = tmp_path / f"answers{suffix}"
    assert main(_args(folder, out)) == 0
    lines = out.read_bytes().splitlines(keepends=True)
    kept = lines[:-3] + [lines[-3][: len(lines[-3]) // 2]]  # two lines lost, a third cut off
    out.write_bytes(b"".join(kept))
    sent = len(counting.sent)
    assert main(_args(folder, out)) == 0
    assert len(counting.sent) - sent == 3
    assert_complete(out, expected)


def test_inputs_given_twice_and_single_files_are_read_once(data, counting, tmp_path):
    folder, expected = data
    out = folder / "pictures" / "answers.csv"  # inside an input folder: never read as an input
    image = folder / "pictures" / "c.png"
    assert main([str(image), str(folder), "--out", str(out), "--question", QUESTION, "--parameters", PARAMS,
                 "--quiet"]) == 0
    try:
        assert_complete(out, expected)
        assert len(counting.sent) == len(expected)
        assert main([str(folder), "--out", str(out), "--quiet"]) == 0  # a rerun finds nothing new
        assert counting.loads == 1
    finally:
        out.unlink()


@pytest.mark.parametrize("args, message", [
    (["--out", "x.txt"], "must end in .csv or .jsonl"),
    (["--out", "{tmp}/o.csv", "--parameters", '{"num_beams": 99}'], "--parameters: 'num_beams'"),
    (["--out", "{tmp}/o.csv", "--parameters", "{oops"], "--parameters is not valid JSON"),
    (["--out", "{tmp}/o.csv", "--chunk", "0"], "--chunk"),
    (["--out", "{tmp}/foreign.csv"], "is not a blip2-batch output"),
    (["--out", "{tmp}/broken.jsonl"], "line 2 is not a blip2-batch record"),
])
def test_bad_arguments_stop_before_the_model_loads(data, counting, tmp_path, capsys, args, message):
    folder, _ = data
    (tmp_path / "foreign.csv").write_text("id,answer\n1,yes\n", encoding="utf-8")
    (tmp_path / "broken.jsonl").write_text('{"file": "a", "row": 0}\nnot json\n', encoding="utf-8")
    assert main([str(folder), *[a.replace("{tmp}", str(tmp_path)) for a in args]]) == 2
    assert message in capsys.readouterr().err
    assert counting.loads == 0


def test_a_missing_input_is_an_error(counting, tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "o.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "o.csv")]) == 2
    assert "no .csv or image files" in capsys.readouterr().err


def test_a_model_that_cannot_load_is_a_clear_error(data, tmp_path, capsys):
    folder, _ = data
    (tmp_path / "empty-model").mkdir()
    out = tmp_path / "o.csv"
    assert main([str(folder), "--out", str(out), "--model", str(tmp_path / "empty-model"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "could not load the model" in err and "model_type 'blip-2'" in err
    assert not out.exists()


def test_blip2_batch_subcommand_is_the_same_command(data, counting, tmp_path):
    from blip2 import cli

    folder, expected = data
    out = tmp_path / "answers.jsonl"
    assert cli.main(["batch", *_args(folder, out)]) == 0
    assert_complete(out, expected)


@pytest.mark.parametrize("content", [b"name,score\nalice,1\nbob,2", b"just one line, no newline", b'{"a": 1}\n{"b": 2}'])
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_an_existing_file_of_another_kind_is_refused_untouched(data, counting, tmp_path, capsys, content, suffix):
    """An --out that is not this command's output (here without a final newline, as Excel writes)
    is refused before anything is cut from it."""
    folder, _ = data
    out = tmp_path / f"mine{suffix}"
    out.write_bytes(content)
    assert main(_args(folder, out)) == 2
    assert out.read_bytes() == content and counting.loads == 0
    err = capsys.readouterr().err
    assert "not a blip2-batch output" in err or "is not a blip2-batch record" in err


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_an_output_cut_inside_its_first_line_is_resumed(data, counting, tmp_path, suffix):
    folder, expected = data
    out = tmp_path / f"answers{suffix}"
    assert main(_args(folder, out)) == 0
    first = out.read_bytes().splitlines(keepends=True)[0]
    out.write_bytes(first[: len(first) // 2])  # killed while the first chunk was being written
    assert main(_args(folder, out)) == 0
    assert_complete(out, expected)


def test_the_same_inputs_spelled_another_way_are_not_answered_again(data, counting, tmp_path, monkeypatch):
    folder, expected = data
    out = tmp_path / "answers.csv"
    monkeypatch.chdir(folder.parent)
    assert main(_args(Path(folder.name), out)) == 0  # relative: "in"
    sent = len(counting.sent)
    assert main(_args(folder.resolve(), out)) == 0  # absolute, same files
    assert len(counting.sent) == sent and len(read_output(out)) == len(expected)


def test_a_csv_whose_index_repeats_is_numbered_by_position_and_resumes(counting, tmp_path, monkeypatch):
    """pd.concat([a, b]).to_csv() repeats index values (0, 1, 0, 1): they cannot name rows, so
    the rows are numbered by position, and an interrupted run resumes without losing any."""
    folder = tmp_path / "in"
    folder.mkdir()
    images = [b64(picture(seed=60 + i)) for i in range(4)]
    part = lambda i: pd.DataFrame({"image": images[i : i + 2], "text": ["q", "r"]})  # noqa: E731
    pd.concat([part(0), part(2)]).to_csv(folder / "dup.csv")
    out = tmp_path / "answers.jsonl"
    real = batch_cli.answer_items

    def one_chunk_then_ctrl_c(*args, **kwargs):
        for i, results in enumerate(real(*args, **kwargs)):
            if i == 1:
                raise KeyboardInterrupt
            yield results

    monkeypatch.setattr(batch_cli, "answer_items", one_chunk_then_ctrl_c)
    args = [str(folder), "--out", str(out), "--chunk", "2", "--quiet", "--parameters", PARAMS]
    assert main(args) == 130
    monkeypatch.setattr(batch_cli, "answer_items", real)
    assert main(args) == 0
    records = read_output(out)
    assert sorted(r["row"] for r in records) == [0, 1, 2, 3] and all(r["error"] is None for r in records)


@pytest.mark.parametrize("extra, prompt", [
    (["--question", "what color is it?"], "Question: what color is it? Answer:"),  # as `blip2 ask` sends it
    (["--question", " Question: what color is it?  Answer: "], "Question: what color is it?  Answer:"),  # a prompt
    (["--question", "Describe:", "--raw-prompt"], "Describe:"),
    ([], ""),  # a caption
])
def test_the_question_asked_of_image_files_is_a_vqa_prompt(counting, tmp_path, extra, prompt):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "red.png").write_bytes(picture(seed=70))
    args = [str(folder), "--out", str(tmp_path / "out.csv"), "--quiet", "--parameters", PARAMS, *extra]
    assert main(args) == 0
    assert [row.prompt for row in counting.sent] == [prompt]


def test_a_light_install_gets_one_line_saying_what_to_install(tmp_path, capsys, monkeypatch):
    """``pip install .`` alone has the client but not the engine: say so instead of a traceback."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    (tmp_path / "a.png").write_bytes(picture(seed=90))
    assert main([str(tmp_path / "a.png"), "--out", str(tmp_path / "out.csv"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "lacks torch" in err and "[engine]" in err and "Traceback" not in err
