"""Cross-request micro-batching.

Requests (each a list of rows with one set of generation parameters) are put on
a queue. A single batcher thread takes the oldest, gathers more until the batch
holds ``max_batch_size`` rows or ``wait_s`` has passed, keeps together those
whose parameters match the first, runs them as one model call, and hands each
request exactly its own answers. ``collect`` is the pure gathering step.
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


def collect(source: "queue.Queue[Job]", pending: deque, max_rows: int, wait_s: float) -> list[Job]:
    """Gather one batch: the oldest job plus later ones with equal params, up to ``max_rows`` rows.

    ``pending`` holds jobs taken off the queue earlier but not yet run (their params
    differed); it is consulted first and keeps its order. Blocks until a first job
    arrives; then waits at most ``wait_s`` for more. Jobs past their deadline or
    abandoned by their caller are dropped.
    """
    def usable(job: Job) -> bool:
        if job.abandoned:
            return False
        if time.monotonic() > job.deadline:
            job.finish(error=_deadline_error())
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
    until = time.monotonic() + wait_s
    while not full():
        remaining = until - time.monotonic()
        try:
            job = source.get(timeout=max(remaining, 0)) if remaining > 0 else source.get_nowait()
        except queue.Empty:
            break
        if job is None:
            source.put(None)  # let the loop see the sentinel after this batch
            break
        if usable(job) and not take(job):
            pending.append(job)
    return batch


class Batcher:
    def __init__(self, run_batch: RunBatch, max_batch_size: int = 16, wait_s: float = 0.005):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._pending: deque = deque()
        self._closed = False
        self.batches_run = 0
        self._thread = threading.Thread(target=self._loop, name="blip2-batcher", daemon=True)
        self._thread.start()

    def submit(self, items: Sequence, params, deadline: float) -> list:
        """Block until ``items`` are answered; raises the batch's error or DeadlineExceeded (504)."""
        if self._closed:
            raise NotReady("The server is shutting down; retry on another instance.", code="shutting_down")
        job = Job(items=list(items), params=params, deadline=deadline)
        self._queue.put(job)
        if not job.done.wait(timeout=max(deadline - time.monotonic(), 0)):
            job.abandoned = True
            raise _deadline_error()
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            batch = collect(self._queue, self._pending, self.max_batch_size, self.wait_s)
            if not batch:
                break
            self._run(batch)
        for job in list(self._pending):
            job.finish(error=NotReady("The server is shutting down; retry.", code="shutting_down"))

    def _run(self, batch: list[Job]) -> None:
        items = [item for job in batch for item in job.items]
        try:
            answers = self.run_batch(items, batch[0].params)
            self.batches_run += 1
        except BaseException as exc:  # noqa: BLE001 - isolate: retry each request on its own
            if len(batch) == 1:
                batch[0].finish(error=_as_service_error(exc))
                return
            log.warning("A batch of %d requests failed; retrying each on its own", len(batch))
            for job in batch:
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


def _deadline_error() -> DeadlineExceeded:
    return DeadlineExceeded(
        "The request was not answered in time (the server is busy). Retry later, send fewer rows, "
        "or raise BLIP2_REQUEST_TIMEOUT_S.",
        code="deadline_exceeded",
    )
