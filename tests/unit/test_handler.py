"""Error mapping: every failure becomes a JSON body with the right status, never a crash."""


from blip2.config import Settings
from blip2.errors import InvalidInput, NotReady
from blip2.handler import handle


class FakeRequest:
    def __init__(self, data=b"{}", method="POST", content_length=None, headers=None):
        self.data, self.method = data, method
        self.content_length = len(data) if content_length is None else content_length
        self.headers = headers or {}
        self.reads = 0

    def get_data(self, cache=True):
        self.reads += 1
        return self.data


class FakeService:
    def __init__(self, behaviour, max_body_bytes=1000):
        self.behaviour = behaviour
        self.settings = Settings(max_body_bytes=max_body_bytes)

    def score_body(self, raw):
        if isinstance(self.behaviour, BaseException):
            raise self.behaviour
        return self.behaviour(raw)


def test_success_is_200_with_the_answers():
    status, body = handle(FakeService(lambda raw: [{"text": raw.decode()}]), FakeRequest(b"hi"))
    assert (status, body) == (200, [{"text": "hi"}])


def test_client_error_maps_to_its_status_and_body():
    err = InvalidInput("Row 2: bad image; send a PNG.", code="invalid_image", row=2)
    status, body = handle(FakeService(err), FakeRequest())
    assert status == 400 and body == {"error": {"code": "invalid_image", "message": "Row 2: bad image; send a PNG.", "row": 2}}


def test_declared_oversize_body_is_refused_before_reading():
    request = FakeRequest(b"x", content_length=10_000)
    status, body = handle(FakeService(lambda raw: []), request)
    assert status == 413 and body["error"]["code"] == "body_too_large" and request.reads == 0


def test_unexpected_exception_is_a_generic_500_with_request_id(caplog):
    secret = RuntimeError("/srv/secret/path 10.0.0.7 exploded")
    status, body = handle(FakeService(secret), FakeRequest(headers={"x-ms-request-id": "req-42"}))
    assert status == 500 and body["error"]["code"] == "internal_error"
    assert "req-42" in body["error"]["message"]
    assert "secret" not in str(body) and "10.0.0.7" not in str(body)
    assert "exploded" in caplog.text  # the details go to the log


def test_not_loaded_and_wrong_method():
    status, body = handle(None, FakeRequest())
    assert status == 503 and body["error"]["code"] == "not_ready"
    status, body = handle(FakeService(lambda raw: []), FakeRequest(method="GET"))
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    status, _ = handle(FakeService(NotReady("busy")), FakeRequest())
    assert status == 503


class EndlessStream:
    """A chunked body with no declared length that never ends: counts what the handler reads."""

    def __init__(self):
        self.read_bytes = 0

    def read(self, n=-1):
        n = 1 << 16 if n is None or n < 0 else n
        self.read_bytes += n
        return b" " * n


def test_chunked_body_is_read_only_up_to_the_limit():
    request = FakeRequest(b"", content_length=0)
    request.content_length, request.stream = None, EndlessStream()
    status, body = handle(FakeService(lambda raw: []), request)
    assert status == 413 and body["error"]["code"] == "body_too_large"
    assert request.stream.read_bytes == 1001 and request.reads == 0  # limit + 1, never get_data


def test_chunked_body_within_the_limit_is_answered():
    import io

    request = FakeRequest(b"", content_length=0)
    request.content_length, request.stream = None, io.BytesIO(b"x" * 1000)
    status, body = handle(FakeService(lambda raw: [{"text": str(len(raw))}]), request)
    assert (status, body) == (200, [{"text": "1000"}])


def test_a_body_that_breaks_off_is_a_400_not_a_500():
    class Broken:
        def read(self, n=-1):
            raise OSError("connection reset by peer")

    request = FakeRequest(b"", content_length=0)
    request.content_length, request.stream = None, Broken()
    status, body = handle(FakeService(lambda raw: []), request)
    assert status == 400 and body["error"]["code"] == "invalid_input" and "read" in body["error"]["message"]
