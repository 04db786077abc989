"""What the micro-batcher did lately, as one log line every so often.

In production the questions are whether batching happens (rows per batch), how busy
the model is (its share of the wall clock), how long batches take and whether the
image cache hits. ``BatchStats.record`` is called by the batcher after every model
batch; once ``interval_s`` has passed since the last line it logs one INFO line on
``blip2.stats`` and starts counting afresh. Nothing is logged while no batch runs.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger("blip2.stats")


class BatchStats:
    def __init__(self, interval_s: float, extra: Callable[[], str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """``interval_s`` <= 0: count, never log. ``extra()``: text appended to each line (the cache's)."""
        self.interval_s = interval_s
        self.extra = extra
        self.clock = clock
        self._lock = threading.Lock()
        self._reset(clock())

    def _reset(self, now: float) -> None:
        self.since = now
        self.batches = self.requests = self.rows = self.failed = self.largest = 0
        self.model_s = 0.0
        self.batch_ms: list[float] = []

    def record(self, rows: int, requests: int, seconds: float, failed: bool = False) -> str | None:
        """Count one model batch; returns the line if one was logged."""
        with self._lock:
            self.batches += 1
            self.requests += requests
            self.rows += rows
            self.failed += failed
            self.largest = max(self.largest, rows)
            self.model_s += seconds
            self.batch_ms.append(seconds * 1000)
            now = self.clock()
            if self.interval_s <= 0 or now - self.since < self.interval_s:
                return None
            line = self._line(now - self.since)
            self._reset(now)
        log.info("%s", line)
        return line

    def _line(self, wall_s: float) -> str:
        ms = sorted(self.batch_ms)
        p50, p95 = ms[len(ms) // 2], ms[min(len(ms) - 1, int(len(ms) * 0.95))]
        text = (f"last {wall_s:.0f} s: {self.requests} requests, {self.rows} rows in {self.batches} batches "
                f"({self.rows / self.batches:.1f} rows a batch, largest {self.largest}; {self.failed} failed); "
                f"model busy {self.model_s / wall_s:.0%}, batch p50 {p50:.1f} ms, p95 {p95:.1f} ms")
        if self.extra is not None:
            text += "; " + self.extra()
        return text
