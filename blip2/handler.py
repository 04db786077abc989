"""HTTP glue for ``score.run``: a Flask-like request in, ``(status, JSON body)`` out.

This is the one place where service errors become HTTP statuses. It never lets
an exception escape (the server would answer a bare 500 and log nothing useful)
and never puts internals in a response.
"""

from __future__ import annotations

import logging

from .errors import InvalidInput, MethodNotAllowed, NotReady, PayloadTooLarge, ServiceError, internal_error_body

log = logging.getLogger("blip2.handler")


def handle(service, request) -> tuple[int, object]:
    """Answer one ``/score`` request. ``service`` may be None while the model loads (503)."""
    request_id = _request_id(request)
    try:
        if request.method != "POST":
            raise MethodNotAllowed(f"/score takes POST with a JSON body, not {request.method}.")
        if service is None:
            raise NotReady("The model is not loaded yet; retry in a few seconds.", code="not_ready")
        return 200, service.score_body(_read_body(request, service.settings.max_body_bytes))
    except ServiceError as err:
        if err.status >= 500:
            log.warning("Request %s failed with %s: %s", request_id, err.code, err.message)
        else:
            log.info("Request %s refused with %s (row %s)", request_id, err.code, err.row)
        return err.status, err.body()
    except Exception:  # noqa: BLE001 - the generic 500: details only in the log
        rid, body = internal_error_body(request_id)
        log.exception("Request %s failed unexpectedly", rid)
        return 500, body


def _too_large(size: str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is {size} bytes, over the limit of {limit}. Send fewer or smaller images per request.",
        code="body_too_large",
    )


def _read_body(request, limit: int) -> bytes:
    """The body, never holding more than ``limit`` + 1 bytes of it: a declared length over the limit
    is refused unread, and a chunked body (no length declared) is read in pieces up to the limit."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(str(declared), limit)
    try:
        if declared is not None:
            return request.get_data(cache=False)
        pieces, size = [], 0
        while True:
            piece = request.stream.read(min(1 << 20, limit + 1 - size))
            if not piece:
                return b"".join(pieces)
            pieces.append(piece)
            size += len(piece)
            if size > limit:
                raise _too_large("more than " + str(limit), limit)
    except ServiceError:
        raise
    except Exception:  # noqa: BLE001 - the client broke off or sent a malformed chunked body
        log.info("Could not read a request body", exc_info=True)
        raise InvalidInput(
            "The request body could not be read to its end (the connection broke, or the chunked "
            "encoding is malformed); send it again.",
        ) from None


def _request_id(request) -> str | None:
    """The id azmlinfsrv gave this request (returned to the client as x-ms-request-id), if any."""
    headers = getattr(request, "headers", None)
    found = headers.get("x-ms-request-id") or headers.get("x-request-id") if headers is not None else None
    if found:
        return found
    try:
        from flask import g, has_request_context

        return g.get("request_id") if has_request_context() else None
    except ImportError:  # the handler is also driven without Flask (tests, other servers)
        return None
