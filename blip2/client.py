"""Call a BLIP-2 scoring endpoint from Python: local ``azmlinfsrv`` or Azure ML.

Imports only ``requests`` and the standard library (never torch or transformers), so a
laptop or a notebook can install and import it in seconds.

The wire contract (``POST /score``)::

    {"input_data": {"columns": ["image", "text"], "index": [0, 1],
                    "data": [[image, text], ...]},
     "parameters": {"max_new_tokens": 30}}
    -> 200 [{"text": ...}, ...]                       one per row, in order
    -> 4xx/5xx {"error": {"code": ..., "message": ..., "row": int | null}}

``image`` is a public http(s) URL or base64 (``base64.encodebytes`` like the Azure samples).
On Azure a non-200 from the container reaches the client as 424 with the container's status
in the header ``ms-azureml-model-error-statuscode``; ``EndpointError.status`` carries the
container's status and ``gateway_status`` the 424.

Authentication (arguments win over the environment): ``key`` / ``BLIP2_ENDPOINT_KEY`` or
``token`` / ``BLIP2_ENDPOINT_TOKEN`` (an Azure AD token), both sent as
``Authorization: Bearer ...``; ``deployment`` / ``BLIP2_ENDPOINT_DEPLOYMENT`` pins a deployment
with the ``azureml-model-deployment`` header. The URL comes from ``url`` /
``BLIP2_ENDPOINT_URL``, else ``http://127.0.0.1:5001/score``.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Iterable, Sequence, Union

import requests

DEFAULT_URL = "http://127.0.0.1:5001/score"
ALLOWED_PARAMETERS = (
    "max_new_tokens", "min_new_tokens", "num_beams", "do_sample", "temperature",
    "top_p", "top_k", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
)
AZURE_STATUS_HEADER = "ms-azureml-model-error-statuscode"
ImageLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

_DEFAULT_CODES = {
    400: "invalid_input", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    408: "timeout", 413: "payload_too_large", 424: "model_error", 429: "too_many_requests",
    500: "internal_error", 502: "bad_gateway", 503: "not_ready", 504: "deadline_exceeded",
}


class EndpointError(Exception):
    """The endpoint could not answer.

    ``status``: HTTP status of the scoring container (the original one behind Azure's 424),
    or None when no HTTP answer arrived (``code`` is then ``connection_error`` or ``timeout``).
    ``code``/``message``/``row`` come from the error body when it has one. ``gateway_status``
    is the status the client actually received when it differs (Azure's 424).
    """

    def __init__(self, status: int | None, code: str, message: str, row: int | None = None,
                 gateway_status: int | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.row = status, code, message, row
        self.gateway_status = gateway_status

    def __str__(self) -> str:
        where = f" (row {self.row})" if self.row is not None else ""
        status = "no response" if self.status is None else f"HTTP {self.status}"
        return f"{status} {self.code}: {self.message}{where}"


def error_from_response(status: int, headers: dict, body: str) -> EndpointError:
    """Build an ``EndpointError`` from a non-200 answer (status, headers, body text).

    Reads ``{"error": {"code", "message", "row"}}`` when the body has it, Azure's own
    ``{"message": ...}`` otherwise, else the start of the body text. A 424 with the
    ``ms-azureml-model-error-statuscode`` header reports the container's status.
    """
    gateway_status = None
    lowered = {k.lower(): v for k, v in headers.items()}
    original = str(lowered.get(AZURE_STATUS_HEADER, "")).strip()
    if status == 424 and original.isdigit():
        gateway_status, status = status, int(original)
    code, message, row = _DEFAULT_CODES.get(status, f"http_{status}"), "", None
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        err = parsed["error"]
        code = str(err.get("code") or code)
        message = str(err.get("message") or "")
        row = err.get("row") if isinstance(err.get("row"), int) else None
    elif isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
        message = parsed["message"]
    elif body:
        message = " ".join(body.split())[:300]
    return EndpointError(status, code, message or "the endpoint gave no reason", row, gateway_status)


def is_url(value: str) -> bool:
    """True for http:// and https:// references, which the service fetches itself."""
    return value[:8].lower().startswith(("http://", "https://"))


def encode_image(image: ImageLike) -> str:
    """Turn an image reference into the string the service accepts.

    http(s) URL: returned unchanged. bytes: MIME base64 (``base64.encodebytes``, a newline
    every 76 characters, as the Azure samples send). Path or other str: the file's bytes,
    base64-encoded. Raises FileNotFoundError for a missing file, ValueError for no bytes,
    TypeError for other types.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, str) and is_url(image):
        return image
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file {str(path)!r} not found (give a file path or an http(s) URL)")
        data = path.read_bytes()
    else:
        raise TypeError(f"an image must be a path, an http(s) URL or bytes, not {type(image).__name__}")
    if not data:
        raise ValueError("the image is empty (0 bytes)")
    return base64.encodebytes(data).decode("ascii")


def format_prompt(question: str) -> str:
    """BLIP-2's VQA prompt: ``"Question: {q} Answer:"``; a blank question gives "" (caption)."""
    q = " ".join(question.split())
    return f"Question: {q} Answer:" if q else ""


def build_payload(rows: Iterable[tuple[str, str]], parameters: dict | None = None) -> dict:
    """The request body for ``rows`` of ``(image, text)`` wire values (URL or base64, prompt).

    ``parameters`` entries that are None are left out; unknown names raise ValueError
    (the server would answer 400 anyway). Raises ValueError for no rows, TypeError for
    non-string cells.
    """
    data = []
    for image, text in rows:
        if not isinstance(image, str) or not isinstance(text, str):
            raise TypeError("each row must be (image: str, text: str); encode images with encode_image()")
        data.append([image, text])
    if not data:
        raise ValueError("a request needs at least one row")
    body: dict = {"input_data": {"columns": ["image", "text"], "index": list(range(len(data))), "data": data}}
    params = {k: v for k, v in (parameters or {}).items() if v is not None}
    unknown = sorted(set(params) - set(ALLOWED_PARAMETERS))
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r}; allowed: {', '.join(ALLOWED_PARAMETERS)}")
    if params:
        body["parameters"] = params
    return body


class Blip2Client:
    """A client for one endpoint; reuses one ``requests.Session`` (keep-alive) across calls.

    requests does not promise that a Session is thread-safe: give each thread its own client.
    """

    def __init__(self, url: str | None = None, key: str | None = None, token: str | None = None,
                 deployment: str | None = None, timeout: float = 120.0,
                 session: requests.Session | None = None):
        env = os.environ
        self.url = url or env.get("BLIP2_ENDPOINT_URL") or DEFAULT_URL
        if key is None and token is None:
            key, token = env.get("BLIP2_ENDPOINT_KEY") or None, env.get("BLIP2_ENDPOINT_TOKEN") or None
        if key and token:
            raise ValueError("give either an endpoint key or an Azure AD token, not both "
                             "(check BLIP2_ENDPOINT_KEY and BLIP2_ENDPOINT_TOKEN)")
        self._secret = key or token
        self.deployment = deployment or env.get("BLIP2_ENDPOINT_DEPLOYMENT") or None
        if not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        self.timeout = float(timeout)
        self.session = session or requests.Session()

    def headers(self) -> dict:
        """Headers sent with every request (the secret included; do not log them)."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._secret:
            headers["Authorization"] = f"Bearer {self._secret}"
        if self.deployment:
            headers["azureml-model-deployment"] = self.deployment
        return headers

    def score(self, payload: dict) -> list[dict]:
        """POST ``payload`` and return the decoded list of ``{"text": ...}``, one per row.

        Raises EndpointError for a non-200 answer, a network failure, a timeout, or a 200
        whose body is not one ``{"text": str}`` per row.
        """
        try:
            resp = self.session.post(self.url, data=json.dumps(payload), headers=self.headers(),
                                     timeout=(min(10.0, self.timeout), self.timeout))
        except requests.Timeout:
            raise EndpointError(None, "timeout", f"no answer from {self.url} within {self.timeout:g} s") from None
        except requests.RequestException as exc:
            raise EndpointError(None, "connection_error",
                                f"cannot reach {self.url} ({exc.__class__.__name__})") from None
        if resp.status_code != 200:
            raise error_from_response(resp.status_code, dict(resp.headers), resp.text)
        try:
            result = resp.json()
        except ValueError:
            result = None
        data = payload.get("input_data") if isinstance(payload, dict) else None
        data = data.get("data") if isinstance(data, dict) else data  # "split" form, or a list of records
        rows = len(data) if isinstance(data, list) else None
        if (not isinstance(result, list) or rows is None or len(result) != rows
                or not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in result)):
            expected = f"{rows} " if rows is not None else ""
            raise EndpointError(200, "bad_response", f"expected a list of {expected}{{\"text\": ...}} objects")
        return result

    def ask(self, images: ImageLike | Sequence[ImageLike], questions: str | Sequence[str],
            raw_prompt: bool = False, **parameters) -> list[str]:
        """Answer ``questions`` about ``images``; returns one answer per row, in order.

        One image with many questions, or one question for many images, is broadcast;
        otherwise the two lists must be the same length. Questions are wrapped by
        ``format_prompt`` unless ``raw_prompt``. ``parameters`` are generation settings
        (``max_new_tokens=30`` ...). Raises EndpointError, ValueError, FileNotFoundError.
        """
        image_list = [images] if isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike)) else list(images)
        question_list = [questions] if isinstance(questions, str) else list(questions)
        if len(image_list) == 1 and len(question_list) > 1:
            image_list = image_list * len(question_list)
        elif len(question_list) == 1 and len(image_list) > 1:
            question_list = question_list * len(image_list)
        if len(image_list) != len(question_list):
            raise ValueError(f"{len(image_list)} images and {len(question_list)} questions; "
                             "give one question per image, or one of either")
        encoded: dict[int, str] = {}  # a broadcast image (the same object) is read and encoded once
        for img in image_list:
            if id(img) not in encoded:
                encoded[id(img)] = encode_image(img)
        wire = [encoded[id(img)] for img in image_list]
        prompts = [q if raw_prompt else format_prompt(q) for q in question_list]
        result = self.score(build_payload(zip(wire, prompts, strict=True), parameters))
        return [r["text"] for r in result]

    def caption(self, images: ImageLike | Sequence[ImageLike], **parameters) -> list[str]:
        """Caption each image (an empty prompt); returns one caption per image."""
        return self.ask(images, "", raw_prompt=True, **parameters)

    def chat(self, image: ImageLike, conversation: "Conversation", question: str, **parameters) -> str:
        """Ask ``question`` about ``image`` with the earlier turns of ``conversation``.

        The answer is appended to ``conversation`` only when the call succeeds.
        """
        answer = self.ask(image, conversation.prompt(question), raw_prompt=True, **parameters)[0]
        conversation.add(question, answer)
        return answer


class Conversation:
    """Earlier (question, answer) turns, rendered in BLIP-2's training format::

        Question: q1 Answer: a1. Question: q2 Answer: a2. Question: q3 Answer:

    ``max_chars`` bounds the prompt length in characters; the oldest turns are dropped
    until the prompt fits (the current question is always kept, even alone over budget).
    Characters stand in for tokens: OPT's BPE averages about 4 characters per English
    token, so the default 800 is about 200 tokens, under the service's default
    BLIP2_MAX_PROMPT_TOKENS of 256 with the 32 image tokens counted separately.
    """

    def __init__(self, max_chars: int = 800):
        if max_chars < 1:
            raise ValueError("max_chars must be at least 1")
        self.max_chars = max_chars
        self.turns: list[tuple[str, str]] = []

    @staticmethod
    def _turn(question: str, answer: str) -> str:
        answer = " ".join(answer.split())
        end = "" if answer.endswith((".", "!", "?")) else "."
        return f"{format_prompt(question)} {answer}{end}"

    def prompt(self, question: str) -> str:
        """The prompt for ``question`` after the kept turns; trims ``self.turns`` to fit.

        Raises ValueError for a blank question.
        """
        current = format_prompt(question)
        if not current:
            raise ValueError("the question is empty")
        while True:
            text = " ".join([self._turn(q, a) for q, a in self.turns] + [current])
            if len(text) <= self.max_chars or not self.turns:
                return text
            self.turns.pop(0)

    def add(self, question: str, answer: str) -> None:
        """Record a finished turn."""
        self.turns.append((question, answer))

    def clear(self) -> None:
        """Forget every turn."""
        self.turns.clear()
