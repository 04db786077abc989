"""The client library, its CLI and chat against a real local azmlinfsrv."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from blip2.client import Blip2Client, Conversation, EndpointError, build_payload, encode_image, format_prompt
from support import picture


@pytest.fixture()
def files(tmp_path):
    paths = []
    for i, fmt in enumerate(("PNG", "JPEG")):
        path = tmp_path / f"pic{i}.{fmt.lower()}"
        path.write_bytes(picture((40 + 90 * i, 160, 60), seed=10 + i, fmt=fmt))
        paths.append(path)
    return paths


def raw_answers(server, rows, parameters=None):
    r = server.score(build_payload(rows, parameters))
    assert r.status_code == 200, r.text
    return [a["text"] for a in r.json()]


def test_ask_and_caption_equal_the_raw_contract(server, files):
    client = Blip2Client(url=server.url + "/score")
    question = "what is in the picture?"
    got = client.ask(files, question, max_new_tokens=6)
    want = raw_answers(server, [(encode_image(f), format_prompt(question)) for f in files], {"max_new_tokens": 6})
    assert got == want and len(got) == 2
    assert client.caption(files[0]) == raw_answers(server, [(encode_image(files[0]), "")])


def test_chat_sends_earlier_turns_in_blip2_format(server, files):
    client = Blip2Client(url=server.url + "/score")
    conversation = Conversation()
    first = client.chat(files[0], conversation, "what is it?", max_new_tokens=4)
    prompt = conversation.prompt("and the colour?")
    assert prompt.startswith("Question: what is it? Answer:") and prompt.endswith("Question: and the colour? Answer:")
    second = client.chat(files[0], conversation, "and the colour?", max_new_tokens=4)
    assert second == raw_answers(server, [(encode_image(files[0]), prompt)], {"max_new_tokens": 4})[0]
    assert conversation.turns == [("what is it?", first), ("and the colour?", second)]


def test_service_errors_reach_the_caller_as_endpoint_error(server, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"definitely not a png")
    with pytest.raises(EndpointError) as info:
        Blip2Client(url=server.url + "/score").ask([junk], "q")
    assert info.value.status == 400 and info.value.code == "invalid_image" and info.value.row == 0


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "blip2", *args], input=stdin, capture_output=True, text=True, timeout=120)


def test_cli_ask_json_and_chat(server, files):
    url = server.url + "/score"
    done = run_cli("ask", str(files[0]), "-q", "what is it?", "--url", url, "--json", "--max-new-tokens", "5")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()] if not done.stdout.lstrip().startswith("[") else json.loads(done.stdout)
    want = raw_answers(server, [(encode_image(files[0]), format_prompt("what is it?"))], {"max_new_tokens": 5})
    assert [r["text"] for r in rows] == want
    chat = run_cli("chat", str(files[1]), "--url", url, "--max-new-tokens", "3", stdin="what is it?\nwhy?\n/quit\n")
    assert chat.returncode == 0, chat.stderr
    bad = run_cli("ask", str(files[0]), "-q", "q", "--url", url, "--max-new-tokens", "0")
    assert bad.returncode != 0 and "invalid_parameter" in bad.stderr
