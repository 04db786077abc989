"""The service's exceptions and the one place that maps them to HTTP.

Every error a client can cause is a ``ServiceError`` subclass carrying a stable
snake_case ``code``, a message that says what was wrong and how to fix it, and
the index of the offending row where there is one. Messages never carry
exception text from libraries, addresses or paths.
"""

from __future__ import annotations

import uuid


class ServiceError(Exception):
    """Base class. ``status`` is the HTTP status, ``code`` a stable identifier."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, row: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.row = row

    def with_row(self, row: int | None) -> "ServiceError":
        """Return this error tagged with the row it belongs to (first tag wins)."""
        if self.row is None:
            self.row = row
        return self

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "row": self.row}}


class InvalidInput(ServiceError):
    """The request is malformed or names something that cannot be used (400)."""

    status = 400
    code = "invalid_input"


class MethodNotAllowed(ServiceError):
    """The endpoint was called with the wrong HTTP method (405)."""

    status = 405
    code = "method_not_allowed"


class PayloadTooLarge(ServiceError):
    """The body, a row count, an image or a prompt is over a configured limit (413)."""

    status = 413
    code = "payload_too_large"


class NotReady(ServiceError):
    """The model is not loaded (yet), or the server is overloaded (503)."""

    status = 503
    code = "not_ready"


class DeadlineExceeded(ServiceError):
    """The request could not be answered within its deadline (504)."""

    status = 504
    code = "deadline_exceeded"


def internal_error_body(request_id: str | None = None) -> tuple[str, dict]:
    """A generic 500 body that leaks nothing; returns ``(request_id, body)``."""
    rid = request_id or uuid.uuid4().hex
    body = {
        "error": {
            "code": "internal_error",
            "message": f"The server failed to answer this request. Quote request id {rid} "
            "when reporting it; the details are in the server log.",
            "row": None,
        }
    }
    return rid, body
