"""Cross-request micro-batching.

Requests (each a list of rows with one set of generation parameters) are put on
a queue. A single batcher thread takes the oldest, gathers more, keeps together
those whose parameters match the first, runs them as one model call, and hands
each request exactly its own answers. ``collect`` is the pure gathering step.

How long to gather: requests announce themselves as soon as their body is read,
before it is parsed and its images decoded (``Batcher.announce``); a request whose
images are URLs is not counted while they are fetched, which can take seconds. The batcher
keeps gathering while announced requests are still being prepared, or until
``wait_s`` passes with no new arrival, and never longer than ``max_wait_s`` after
it took the first job. A
fixed short window alone splits a burst of concurrent requests into a tiny batch
and a big one (the first request is ready while the others are still decoding),
which costs a whole extra model pass; a lone request waits only ``wait_s``, and
not even that while requests come one at a time: the quiet window applies only
while requests have lately come in together (``Batcher._window``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .errors import DeadlineExceeded, NotReady, ServiceError
from .stats import BatchStats

log = logging.getLogger("blip2.batcher")

RunBatch = Callable[[list, object], list]  # (items, params) -> one answer per item


@dataclass(eq=False)
class Job:
    items: list
    params: object
    deadline: float  # time.monotonic() seconds
    done: threading.Event = field(default_factory=threading.Event)
    result: list | None = None
    error: BaseException | None = None
    abandoned: bool = False

    def finish(self, result: list | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


def collect(
    source: "queue.Queue[Job]", pending: deque, max_rows: int, wait_s: float,
    max_wait_s: float | None = None, arriving: Callable[[], int] = lambda: 0,
    window: Callable[[bool], float] | None = None,
) -> list[Job]:
    """Gather one batch: the oldest job plus later ones with equal params, up to ``max_rows`` rows.

    ``pending`` holds jobs taken off the queue earlier but not yet run (their params
    differed); it is consulted first and keeps its order. Blocks until a first job
    arrives; then gathers more until ``wait_s`` passes without a new job while
    ``arriving()`` (requests announced but not yet queued) is 0, or until ``max_wait_s``
    (default ``wait_s``) has passed since the first job was taken. ``window``, if
    given, replaces ``wait_s`` once the first job is in hand: it is called with whether
    that job was already waiting when ``collect`` began (it queued behind an earlier
    batch). Jobs past their deadline or abandoned by their caller are dropped.
    """
    queued_before = bool(pending) or not source.empty()

    def usable(job: Job) -> bool:
        if job.abandoned:
            return False
        if time.monotonic() > job.deadline:
            job.finish(error=deadline_error())
            return False
        return True

    first = None
    while first is None:
        first = pending.popleft() if pending else source.get()
        if first is None or not usable(first):
            if first is None:  # the close() sentinel
                return []
            first = None
    batch = [first]

    def take(job: Job) -> bool:
        """Add ``job`` to the batch if its params match and its rows fit."""
        rows = sum(len(j.items) for j in batch)
        if job.params == first.params and rows + len(job.items) <= max_rows:
            batch.append(job)
            return True
        return False

    def full() -> bool:
        return sum(len(j.items) for j in batch) >= max_rows

    kept = deque()
    while pending and not full():  # earlier arrivals first
        job = pending.popleft()
        if usable(job) and not take(job):
            kept.append(job)
    pending.extendleft(reversed(kept))
    if window is not None:
        wait_s = window(queued_before)
    started = time.monotonic()
    hard_stop = started + max(wait_s, max_wait_s if max_wait_s is not None else wait_s)
    quiet_until = started + wait_s
    poll = max(wait_s, 0.001)  # how often to look at arriving() while announced requests are expected
    while not full():
        now = time.monotonic()
        expected = arriving()
        if now >= hard_stop or (now >= quiet_until and expected <= 0):
            try:  # whatever is queued already still joins
                job = source.get_nowait()
            except queue.Empty:
                break
        else:
            until = hard_stop if expected > 0 else quiet_until
            try:
                job = source.get(timeout=max(min(until - now, poll), 0.0001))
            except queue.Empty:
                continue
            quiet_until = time.monotonic() + wait_s
        if job is None:
            source.put(None)  # let the loop see the sentinel after this batch
            break
        if usable(job) and not take(job):
            pending.append(job)
    return batch


class Announcement:
    """A request on its way to ``submit``: counted as arriving until it is queued or withdrawn."""

    def __init__(self, counter: "_Counter"):
        self._counter, self._open = counter, True
        counter.add(1)

    def withdraw(self) -> None:
        """Stop counting this request (idempotent)."""
        if self._open:
            self._open = False
            self._counter.add(-1)

    def __enter__(self) -> "Announcement":
        return self

    def __exit__(self, *exc) -> None:
        self.withdraw()


class _Counter:
    def __init__(self):
        self._value = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self._value += n

    def __call__(self) -> int:
        return self._value


class Batcher:
    def __init__(
        self, run_batch: RunBatch, max_batch_size: int = 16, wait_s: float = 0.005, max_wait_s: float | None = None,
        company_horizon_s: float = 1.0, stats: BatchStats | None = None,
    ):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.max_wait_s = wait_s if max_wait_s is None else max(max_wait_s, wait_s)
        self.arriving = _Counter()  # requests announced but not yet queued (parsing, decoding images)
        # the quiet window is kept only while requests have lately come in together (see _window)
        self.company_horizon_s = company_horizon_s
        self._company_at = float("-inf")
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._pending: deque = deque()
        self._closed = False
        self._closing = threading.Lock()  # no job can be queued after close()'s sentinel
        self.batches_run = 0
        self.stats = stats  # counts every model batch; logs a summary now and then
        self._thread = threading.Thread(target=self._loop, name="blip2-batcher", daemon=True)
        self._thread.start()

    def announce(self) -> Announcement:
        """Tell the batcher a request is on its way (a context manager around its parsing and decoding)."""
        return Announcement(self.arriving)

    def submit(self, items: Sequence, params, deadline: float, announced: Announcement | None = None) -> list:
        """Block until ``items`` are answered; raises the batch's error or DeadlineExceeded (504).

        ``announced``, if given, is withdrawn once the job is queued.
        """
        job = Job(items=list(items), params=params, deadline=deadline)
        if announced is not None:  # first: a batcher that saw it as arriving must not wait on it once queued
            announced.withdraw()
        with self._closing:
            if self._closed:
                raise NotReady("The server is shutting down; retry on another instance.", code="shutting_down")
            self._queue.put(job)
        if not job.done.wait(timeout=max(deadline - time.monotonic(), 0)):
            job.abandoned = True
            raise deadline_error()
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        with self._closing:
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            batch = collect(
                self._queue, self._pending, self.max_batch_size, self.wait_s, self.max_wait_s, self.arriving,
                window=self._window,
            )
            if not batch:
                break
            if len(batch) > 1:
                self._company_at = time.monotonic()
            self._run(batch)
        for job in list(self._pending):
            job.finish(error=NotReady("The server is shutting down; retry.", code="shutting_down"))

    def _window(self, queued_behind_a_batch: bool) -> float:
        """The quiet window for the batch being gathered: ``wait_s``, or 0 for a lone client.

        Requests have company when a batch held several of them, or when one had to
        queue while an earlier batch ran, within the last ``company_horizon_s``. Then
        waiting a few ms lets the next one join. A client that sends one request at a
        time would only lose those ms on every request, so then the batch starts at
        once (announced requests are still waited for).
        """
        now = time.monotonic()
        if queued_behind_a_batch:
            self._company_at = now
        return self.wait_s if now - self._company_at <= self.company_horizon_s else 0.0

    def _count(self, rows: int, requests: int, seconds: float, failed: bool = False) -> None:
        """Tell the stats; a fault there must never touch the batch or the batcher thread."""
        if self.stats is None:
            return
        try:
            self.stats.record(rows, requests, seconds, failed)
        except Exception:  # noqa: BLE001
            log.exception("Batch statistics failed")

    def _run(self, batch: list[Job]) -> None:
        items = [item for job in batch for item in job.items]
        started = time.perf_counter()
        try:
            answers = self.run_batch(items, batch[0].params)
            self.batches_run += 1
            self._count(len(items), len(batch), time.perf_counter() - started)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("Batch of %d rows from %d requests took %.1f ms (queue %d)", len(items), len(batch),
                          1000 * (time.perf_counter() - started), self._queue.qsize())
        except BaseException as exc:  # noqa: BLE001 - isolate: retry each request on its own
            # the failed try counts as a batch; its requests and rows are counted where they are answered
            self._count(0, 0, time.perf_counter() - started, failed=True)
            if len(batch) == 1:
                batch[0].finish(error=_as_service_error(exc))
                return
            log.warning("A batch of %d requests failed; retrying each on its own", len(batch))
            for job in batch:
                if job.abandoned:  # its caller has given up: no one to answer
                    continue
                if time.monotonic() > job.deadline:
                    job.finish(error=deadline_error())
                    continue
                self._run([job])
            return
        if len(answers) != len(items):
            error = ServiceError("The model returned the wrong number of answers; retry the request.")
            log.error("run_batch returned %d answers for %d rows", len(answers), len(items))
            for job in batch:
                job.finish(error=error)
            return
        start = 0
        for job in batch:
            job.finish(result=answers[start : start + len(job.items)])
            start += len(job.items)


def _as_service_error(exc: BaseException) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    log.error("Model batch failed", exc_info=exc)
    return ServiceError("The model failed on this request; retry it. The details are in the server log.")


def deadline_error() -> DeadlineExceeded:
    """The 504 of a request not answered within its deadline."""
    return DeadlineExceeded(
        "The request was not answered in time (the server is busy, or its image URLs are slow). Retry later, "
        "send fewer rows, or raise BLIP2_REQUEST_TIMEOUT_S.",
        code="deadline_exceeded",
    )
