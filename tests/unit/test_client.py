"""blip2.client and blip2.cli: payloads, images, prompts, errors, and the CLI against a fake server.

The fake server is a real ``http.server`` on 127.0.0.1 in a thread: it records every request
(path, headers, decoded JSON body) and answers with what the test's handler returns.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from blip2 import cli
from blip2.client import (
    DEFAULT_URL,
    Blip2Client,
    Conversation,
    EndpointError,
    build_payload,
    encode_image,
    error_from_response,
    format_prompt,
)

REPO = Path(__file__).resolve().parents[2]
# Not a valid PNG past the signature; the client never decodes images, it only encodes bytes.
IMAGE_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("BLIP2_ENDPOINT_URL", "BLIP2_ENDPOINT_KEY", "BLIP2_ENDPOINT_TOKEN", "BLIP2_ENDPOINT_DEPLOYMENT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(IMAGE_BYTES)
    return path


# ---------------------------------------------------------------- payloads and images

def test_build_payload_is_split_orientation_with_parameters():
    body = build_payload([("https://e.x/a.jpg", "Question: a? Answer:"), ("QUJD\n", "")],
                         {"max_new_tokens": 7, "num_beams": None})
    assert body == {
        "input_data": {"columns": ["image", "text"], "index": [0, 1],
                       "data": [["https://e.x/a.jpg", "Question: a? Answer:"], ["QUJD\n", ""]]},
        "parameters": {"max_new_tokens": 7},
    }
    assert "parameters" not in build_payload([("u", "t")])
    json.dumps(body)  # wire-ready


def test_build_payload_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown parameter 'beams'"):
        build_payload([("u", "t")], {"beams": 2})
    with pytest.raises(ValueError, match="at least one row"):
        build_payload([])
    with pytest.raises(TypeError, match="encode_image"):
        build_payload([(b"raw", "t")])


def test_encode_image_bytes_path_and_url(image_file):
    encoded = encode_image(IMAGE_BYTES)
    assert encoded == base64.encodebytes(IMAGE_BYTES).decode("ascii")
    assert all(len(line) <= 76 for line in encoded.splitlines()) and encoded.count("\n") > 1
    assert base64.b64decode(encoded) == IMAGE_BYTES
    assert encode_image(image_file) == encoded
    assert encode_image(str(image_file)) == encoded
    assert encode_image(bytearray(IMAGE_BYTES)) == encoded
    for url in ("https://example.com/a.jpg", "HTTP://example.com/a.jpg?x=1"):
        assert encode_image(url) == url


def test_encode_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        encode_image(tmp_path / "missing.jpg")
    with pytest.raises(FileNotFoundError):
        encode_image(str(tmp_path))  # a folder is not an image file
    with pytest.raises(ValueError, match="empty"):
        encode_image(b"")
    with pytest.raises(TypeError, match="int"):
        encode_image(42)


# ---------------------------------------------------------------- prompts and conversations

def test_format_prompt():
    assert format_prompt("what is this?") == "Question: what is this? Answer:"
    assert format_prompt("  two\n words ") == "Question: two words Answer:"
    assert format_prompt("   ") == ""


def test_conversation_uses_blip2_training_format():
    conv = Conversation()
    assert conv.prompt("which city is this?") == "Question: which city is this? Answer:"
    conv.add("which city is this?", "singapore")
    conv.add("is it sunny?", "yes.")
    assert conv.prompt("why?") == (
        "Question: which city is this? Answer: singapore. "
        "Question: is it sunny? Answer: yes. Question: why? Answer:"
    )
    with pytest.raises(ValueError, match="empty"):
        conv.prompt("  ")
    conv.clear()
    assert conv.prompt("why?") == "Question: why? Answer:"


def test_conversation_drops_oldest_turns_to_fit():
    conv = Conversation(max_chars=120)
    for i in range(6):
        conv.add(f"question number {i}?", f"answer {i}")
    prompt = conv.prompt("last one?")
    assert len(prompt) <= 120
    assert prompt.endswith("Question: last one? Answer:")
    assert "question number 5?" in prompt and "question number 0?" not in prompt
    kept = [q for q, _ in conv.turns]
    assert kept == [f"question number {i}?" for i in range(6 - len(kept), 6)] and 0 < len(kept) < 6
    # The current question alone over budget is still sent (the server enforces its own limit).
    tiny = Conversation(max_chars=10)
    tiny.add("q", "a")
    assert tiny.prompt("a long question") == "Question: a long question Answer:" and tiny.turns == []


# ---------------------------------------------------------------- errors

def test_error_from_service_body():
    body = json.dumps({"error": {"code": "invalid_image", "message": "Row 1 is not an image.", "row": 1}})
    err = error_from_response(400, {"Content-Type": "application/json"}, body)
    assert (err.status, err.code, err.message, err.row, err.gateway_status) == (
        400, "invalid_image", "Row 1 is not an image.", 1, None)
    assert str(err) == "HTTP 400 invalid_image: Row 1 is not an image. (row 1)"


def test_error_from_azure_424_carries_the_container_status():
    body = json.dumps({"error": {"code": "payload_too_large", "message": "Too many rows.", "row": None}})
    err = error_from_response(424, {"MS-AzureML-Model-Error-StatusCode": "413"}, body)
    assert (err.status, err.gateway_status, err.code, err.row) == (413, 424, "payload_too_large", None)
    bare = error_from_response(424, {}, "")
    assert (bare.status, bare.code, bare.gateway_status) == (424, "model_error", None)
    assert bare.message


def test_error_from_non_service_bodies():
    azure = error_from_response(401, {}, json.dumps({"message": "Key based authentication failed."}))
    assert (azure.code, azure.message) == ("unauthorized", "Key based authentication failed.")
    html = error_from_response(502, {}, "<html>\n  Bad   gateway </html>")
    assert (html.code, html.message) == ("bad_gateway", "<html> Bad gateway </html>")
    odd = error_from_response(418, {}, "")
    assert odd.code == "http_418"


# ---------------------------------------------------------------- client configuration

def test_client_auth_and_deployment_headers(monkeypatch):
    assert Blip2Client().url == DEFAULT_URL
    assert "Authorization" not in Blip2Client().headers()
    h = Blip2Client(key="k1", deployment="blue").headers()
    assert h["Authorization"] == "Bearer k1" and h["azureml-model-deployment"] == "blue"
    assert Blip2Client(token="t1").headers()["Authorization"] == "Bearer t1"
    with pytest.raises(ValueError, match="not both"):
        Blip2Client(key="k", token="t")
    monkeypatch.setenv("BLIP2_ENDPOINT_URL", "https://ep.inference.ml.azure.com/score")
    monkeypatch.setenv("BLIP2_ENDPOINT_KEY", "envkey")
    monkeypatch.setenv("BLIP2_ENDPOINT_DEPLOYMENT", "green")
    c = Blip2Client()
    assert c.url == "https://ep.inference.ml.azure.com/score"
    assert c.headers()["Authorization"] == "Bearer envkey" and c.headers()["azureml-model-deployment"] == "green"
    assert Blip2Client(token="explicit").headers()["Authorization"] == "Bearer explicit"  # args win
    monkeypatch.setenv("BLIP2_ENDPOINT_TOKEN", "envtoken")
    with pytest.raises(ValueError, match="BLIP2_ENDPOINT_KEY"):
        Blip2Client()


# ---------------------------------------------------------------- fake server

class FakeEndpoint:
    """Records requests; ``reply(body_dict, index)`` returns (status, headers, body_bytes)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.reply = lambda body, i: (200, {}, json.dumps(
            [{"text": f"answer {i}.{k}"} for k in range(len(body["input_data"]["data"]))]).encode())
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, headers, out = fake.reply(body, len(fake.requests) - 1)
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def rows(self, i: int = -1) -> list[list[str]]:
        return self.requests[i]["body"]["input_data"]["data"]


@pytest.fixture
def endpoint():
    fake = FakeEndpoint()
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def run_cli(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_ask_sends_base64_prompt_parameters_and_auth(endpoint, image_file, capsys):
    status, out, err = run_cli(["ask", str(image_file), "-q", "what is it?", "--url", endpoint.url,
                                "--key", "secret", "--deployment", "blue", "--max-new-tokens", "5",
                                "--num-beams", "3"], capsys)
    assert (status, out, err) == (0, "answer 0.0\n", "")
    req = endpoint.requests[0]
    assert req["path"] == "/score"
    assert req["headers"]["Authorization"] == "Bearer secret"
    assert req["headers"]["azureml-model-deployment"] == "blue"
    assert req["body"]["input_data"]["columns"] == ["image", "text"]
    assert req["body"]["input_data"]["index"] == [0]
    [[image, text]] = endpoint.rows()
    assert base64.b64decode(image) == IMAGE_BYTES and "\n" in image  # encodebytes, like Azure samples
    assert text == "Question: what is it? Answer:"
    assert req["body"]["parameters"] == {"max_new_tokens": 5, "num_beams": 3}


def test_cli_ask_many_images_json_and_raw_prompt(endpoint, image_file, capsys):
    url = "https://example.com/dog.jpg"
    status, out, _ = run_cli(["ask", str(image_file), url, "-q", "Describe: ", "--raw-prompt", "--json",
                              "--do-sample", "--url", endpoint.url], capsys)
    assert status == 0
    assert json.loads(out) == [
        {"image": str(image_file), "question": "Describe: ", "text": "answer 0.0"},
        {"image": url, "question": "Describe: ", "text": "answer 0.1"},
    ]
    rows = endpoint.rows()
    assert [r[1] for r in rows] == ["Describe: ", "Describe: "] and rows[1][0] == url
    assert endpoint.requests[0]["body"]["parameters"] == {"do_sample": True}
    assert "Authorization" not in endpoint.requests[0]["headers"]


def test_cli_caption_sends_empty_prompts(endpoint, capsys):
    status, out, _ = run_cli(["caption", "https://e.x/1.jpg", "https://e.x/2.jpg", "--url", endpoint.url], capsys)
    assert status == 0 and out == "https://e.x/1.jpg\tanswer 0.0\nhttps://e.x/2.jpg\tanswer 0.1\n"
    assert [r[1] for r in endpoint.rows()] == ["", ""]
    assert "parameters" not in endpoint.requests[0]["body"]


def test_cli_chat_keeps_the_conversation(endpoint, image_file, capsys, monkeypatch):
    endpoint.reply = lambda body, i: (200, {}, json.dumps([{"text": ["paris", "because of the tower"][i]}]).encode())
    status, out, err = run_cli(["chat", str(image_file), "--url", endpoint.url],
                               capsys, "which city?\n\nwhy?\n/quit\nnever sent\n", monkeypatch)
    assert (status, out, err) == (0, "paris\nbecause of the tower\n", "")
    assert len(endpoint.requests) == 2
    assert endpoint.rows(0)[0][1] == "Question: which city? Answer:"
    assert endpoint.rows(1)[0][1] == "Question: which city? Answer: paris. Question: why? Answer:"
    assert endpoint.rows(0)[0][0] == endpoint.rows(1)[0][0] == encode_image(image_file)


def test_cli_chat_goes_on_after_a_refused_question(endpoint, capsys, monkeypatch):
    def reply(body, i):
        if i == 0:
            return 413, {}, json.dumps({"error": {"code": "payload_too_large", "message": "Prompt too long.",
                                                  "row": 0}}).encode()
        return 200, {}, json.dumps([{"text": "a cat"}]).encode()

    endpoint.reply = reply
    status, out, err = run_cli(["chat", "https://e.x/c.jpg", "--url", endpoint.url], capsys, "q1\nq2\n", monkeypatch)
    assert status == 1 and out == "a cat\n"
    assert err == "blip2: error: HTTP 413 payload_too_large: Prompt too long. (row 0)\n"
    assert endpoint.rows(1)[0][1] == "Question: q2 Answer:"  # the refused turn is not kept


def test_cli_reports_azure_424_as_one_line(endpoint, capsys):
    body = json.dumps({"error": {"code": "invalid_image", "message": "Row 0 is not a decodable image.", "row": 0}})
    endpoint.reply = lambda b, i: (424, {"ms-azureml-model-error-statuscode": "400"}, body.encode())
    status, out, err = run_cli(["ask", "https://e.x/x.jpg", "-q", "?", "--url", endpoint.url], capsys)
    assert status == 1 and out == ""
    assert err == "blip2: error: HTTP 400 invalid_image: Row 0 is not a decodable image. (row 0)\n"


def test_cli_usage_errors(endpoint, image_file, capsys):
    status, out, err = run_cli(["ask", str(image_file), str(image_file), "-q", "a", "-q", "b", "-q", "c",
                                "--url", endpoint.url], capsys)
    assert status == 1 and err.startswith("blip2: error: 2 images and 3 questions") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        cli.main(["ask", str(image_file)])  # -q is required
    assert exc.value.code == 2
    assert endpoint.requests == []


def test_client_rejects_a_short_or_malformed_answer(endpoint):
    endpoint.reply = lambda b, i: (200, {}, json.dumps([{"text": "only one"}]).encode())
    with pytest.raises(EndpointError) as exc:
        Blip2Client(endpoint.url).ask(["https://e.x/a.jpg", "https://e.x/b.jpg"], "q?")
    assert (exc.value.status, exc.value.code) == (200, "bad_response")
    endpoint.reply = lambda b, i: (200, {}, b"not json")
    with pytest.raises(EndpointError, match="bad_response"):
        Blip2Client(endpoint.url).caption("https://e.x/a.jpg")


def test_client_broadcasts_one_image_over_questions(endpoint, image_file, monkeypatch):
    import blip2.client as client_module

    calls = []
    real = client_module.encode_image
    monkeypatch.setattr(client_module, "encode_image", lambda img: calls.append(img) or real(img))
    answers = Blip2Client(endpoint.url).ask(image_file, ["a?", "b?"], max_new_tokens=3)
    assert answers == ["answer 0.0", "answer 0.1"]
    assert calls == [image_file]  # read and encoded once
    rows = endpoint.rows()
    assert rows[0][0] == rows[1][0] == encode_image(image_file)
    assert [r[1] for r in rows] == ["Question: a? Answer:", "Question: b? Answer:"]
    with pytest.raises(ValueError, match="2 images and 3 questions"):
        Blip2Client(endpoint.url).ask([image_file, image_file], ["a", "b", "c"])


def test_client_timeout_and_connection_errors(endpoint):
    def slow(body, i):
        time.sleep(1.0)
        return 200, {}, b"[]"

    endpoint.reply = slow
    with pytest.raises(EndpointError) as exc:
        Blip2Client(endpoint.url, timeout=0.2).caption("https://e.x/a.jpg")
    assert (exc.value.status, exc.value.code) == (None, "timeout")
    with pytest.raises(EndpointError) as exc:
        Blip2Client("http://127.0.0.1:9/score", timeout=2).caption("https://e.x/a.jpg")
    assert (exc.value.status, exc.value.code) == (None, "connection_error")


# ---------------------------------------------------------------- import weight

def test_client_and_cli_import_neither_torch_nor_transformers():
    code = (
        "import sys, blip2.client, blip2.cli, blip2.__main__\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'PIL', 'numpy') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"client import pulled in: {done.stdout.strip()}"
    usage = subprocess.run([sys.executable, "-m", "blip2", "--help"], capture_output=True, text=True,
                           cwd=REPO, env=env, timeout=60)
    assert usage.returncode == 0 and "ask" in usage.stdout and "chat" in usage.stdout


def test_score_takes_the_records_form_of_input_data(endpoint):
    """``input_data`` as a list of records is part of the contract: score() checks its answers too."""
    records = [{"image": "https://e.x/a.jpg", "text": "q"}, {"image": "https://e.x/b.jpg", "text": "r"}]
    endpoint.reply = lambda b, i: (200, {}, json.dumps([{"text": "one"}, {"text": "two"}]).encode())
    client = Blip2Client(endpoint.url)
    assert client.score({"input_data": records}) == [{"text": "one"}, {"text": "two"}]
    endpoint.reply = lambda b, i: (200, {}, json.dumps([{"text": "one"}]).encode())
    with pytest.raises(EndpointError, match="bad_response"):
        client.score({"input_data": records})
