"""The batcher's periodic summary line (``blip2.stats``)."""

from blip2.stats import BatchStats


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_one_line_per_interval_with_the_interval_s_counts(caplog):
    clock = Clock()
    stats = BatchStats(60, extra=lambda: "cache says hi", clock=clock)
    with caplog.at_level("INFO", logger="blip2.stats"):
        for rows, requests, ms in ((16, 10, 40.0), (8, 8, 20.0), (4, 2, 10.0)):
            clock.now += 10
            assert stats.record(rows, requests, ms / 1000) is None
        clock.now += 31  # 61 s since the start: the fourth batch brings the line
        line = stats.record(2, 1, 0.030, failed=True)
    assert line is not None and caplog.messages == [line]
    assert line.startswith("last 61 s: 21 requests, 30 rows in 4 batches (7.5 rows a batch, largest 16; 1 failed)")
    assert "model busy 0%" in line and "batch p50 30.0 ms, p95 40.0 ms" in line and line.endswith("; cache says hi")
    clock.now += 30
    assert stats.record(1, 1, 0.5) is None and stats.batches == 1 and stats.rows == 1  # counting afresh
    clock.now += 30
    assert stats.record(1, 1, 0.5).startswith("last 60 s: 2 requests, 2 rows in 2 batches")


def test_an_interval_of_zero_counts_but_never_logs(caplog):
    clock = Clock()
    stats = BatchStats(0, clock=clock)
    with caplog.at_level("INFO", logger="blip2.stats"):
        for _ in range(3):
            clock.now += 1000
            assert stats.record(4, 1, 0.01) is None
    assert stats.batches == 3 and not caplog.messages
