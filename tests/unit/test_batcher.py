"""The micro-batcher, driven by real queues and threads."""

import queue
import threading
import time
from collections import deque

import pytest

from blip2.batcher import Batcher, Job, collect
from blip2.errors import DeadlineExceeded, InvalidInput


def job(n, params="p", deadline_s=10.0, tag=""):
    return Job(items=[f"{tag}{i}" for i in range(n)], params=params, deadline=time.monotonic() + deadline_s)


def test_collect_gathers_compatible_jobs_up_to_the_row_limit():
    q = queue.Queue()
    a, b, c, d = job(2), job(3, params="other"), job(2), job(2)
    for j in (a, b, c, d):
        q.put(j)
    pending = deque()
    batch = collect(q, pending, max_rows=4, wait_s=0.01)
    assert batch == [a, c]  # b differs; the batch is full before d is looked at
    assert list(pending) == [b] and q.qsize() == 1
    assert collect(q, pending, max_rows=4, wait_s=0.01) == [b]
    assert collect(q, pending, max_rows=4, wait_s=0.01) == [d]


def test_collect_waits_for_late_arrivals_but_not_forever():
    q = queue.Queue()
    first, late = job(1), job(1)
    q.put(first)
    threading.Timer(0.02, q.put, args=(late,)).start()
    started = time.monotonic()
    assert collect(q, deque(), max_rows=8, wait_s=0.2) == [first, late]
    assert time.monotonic() - started < 0.3
    q.put(job(1))
    started = time.monotonic()
    assert len(collect(q, deque(), max_rows=8, wait_s=0.05)) == 1
    assert time.monotonic() - started < 0.2


def test_collect_drops_expired_jobs_with_a_deadline_error():
    q = queue.Queue()
    old, fresh = job(1, deadline_s=-1), job(1)
    q.put(old)
    q.put(fresh)
    assert collect(q, deque(), max_rows=8, wait_s=0) == [fresh]
    assert isinstance(old.error, DeadlineExceeded)


def echo(items, params):
    return [f"{params}:{item}" for item in items]


def test_each_request_gets_exactly_its_own_answers_under_concurrency():
    calls = []

    def run(items, params):
        calls.append(len(items))
        time.sleep(0.01)
        return echo(items, params)

    b = Batcher(run, max_batch_size=8, wait_s=0.02)
    results = {}

    def client(k):
        items = [f"r{k}-{i}" for i in range(1 + k % 3)]
        results[k] = (items, b.submit(items, f"p{k % 2}", time.monotonic() + 10))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(24)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    b.close()
    for k, (items, answers) in results.items():
        assert answers == [f"p{k % 2}:{item}" for item in items]
    assert sum(calls) == sum(len(items) for items, _ in results.values())
    assert max(calls) <= 8 and len(calls) < 24  # rows from different requests shared batches


def test_a_failing_request_does_not_fail_its_batch_mates():
    def run(items, params):
        if any(item.startswith("bad") for item in items):
            raise InvalidInput("bad row", code="invalid_image")
        return echo(items, params)

    b = Batcher(run, max_batch_size=16, wait_s=0.05)
    out = {}

    def client(name):
        try:
            out[name] = b.submit([f"{name}-x"], "p", time.monotonic() + 10)
        except Exception as exc:  # noqa: BLE001
            out[name] = exc

    threads = [threading.Thread(target=client, args=(n,)) for n in ("good1", "bad", "good2")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    b.close()
    assert out["good1"] == ["p:good1-x"] and out["good2"] == ["p:good2-x"]
    assert isinstance(out["bad"], InvalidInput)


def test_unexpected_failure_becomes_a_generic_service_error():
    b = Batcher(lambda items, params: 1 / 0, max_batch_size=4, wait_s=0)
    with pytest.raises(Exception) as info:
        b.submit(["a"], "p", time.monotonic() + 5)
    b.close()
    assert info.value.__class__.__name__ == "ServiceError" and "division" not in str(info.value)


def test_a_request_never_waits_forever():
    gate = threading.Event()

    def slow(items, params):
        gate.wait(5)
        return echo(items, params)

    b = Batcher(slow, max_batch_size=1, wait_s=0)
    t = threading.Thread(target=lambda: b.submit(["first"], "p", time.monotonic() + 10))
    t.start()
    time.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as info:
        b.submit(["second"], "p", time.monotonic() + 0.2)
    assert time.monotonic() - started < 1.0 and info.value.status == 504
    gate.set()
    t.join()
    b.close()


def test_collect_keeps_gathering_while_announced_rows_are_on_their_way():
    q = queue.Queue()
    first, late = job(1), job(1)
    q.put(first)
    expected = [1]  # one row announced, not yet queued
    def arrive():
        q.put(late)
        expected[0] = 0
    threading.Timer(0.08, arrive).start()
    batch = collect(q, deque(), max_rows=8, wait_s=0.01, max_wait_s=1.0, arriving=lambda: expected[0])
    assert batch == [first, late]  # waited well past wait_s, because a row was announced


def test_collect_without_announcements_waits_only_the_quiet_window():
    q = queue.Queue()
    first, late = job(1), job(1)
    q.put(first)
    threading.Timer(0.15, q.put, args=(late,)).start()
    started = time.monotonic()
    assert collect(q, deque(), max_rows=8, wait_s=0.01, max_wait_s=1.0, arriving=lambda: 0) == [first]
    assert time.monotonic() - started < 0.1
    assert q.get(timeout=1) is late


def test_collect_never_waits_past_max_wait_for_announced_rows():
    q = queue.Queue()
    q.put(job(1))
    started = time.monotonic()
    batch = collect(q, deque(), max_rows=8, wait_s=0.01, max_wait_s=0.1, arriving=lambda: 3)  # never come
    elapsed = time.monotonic() - started
    assert len(batch) == 1 and 0.09 <= elapsed < 0.5


def test_announcements_are_withdrawn_on_submit_and_on_failure():
    b = Batcher(echo, max_batch_size=8, wait_s=0)
    with b.announce() as announced, b.announce():
        assert b.arriving() == 2
        assert b.submit(["a", "b"], "p", time.monotonic() + 5, announced=announced) == ["p:a", "p:b"]
        assert b.arriving() == 1
        announced.withdraw()  # idempotent
        assert b.arriving() == 1
    assert b.arriving() == 0
    with pytest.raises(RuntimeError):
        with b.announce():
            assert b.arriving() == 1
            raise RuntimeError("preparing the rows failed")
    assert b.arriving() == 0
    b.close()


def test_a_burst_of_announced_requests_shares_one_batch():
    """Requests that announce together and queue over ~60 ms still form one batch (wait_s alone is 5 ms)."""
    calls = []

    def run(items, params):
        calls.append(len(items))
        return echo(items, params)

    b = Batcher(run, max_batch_size=16, wait_s=0.005, max_wait_s=2.0)
    announcements = [b.announce() for _ in range(8)]
    out = {}

    def client(k):
        time.sleep(0.008 * k)  # each request takes a little longer to decode its image
        out[k] = b.submit([f"r{k}"], "p", time.monotonic() + 10, announced=announcements[k])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    b.close()
    assert calls == [8]
    assert all(out[k] == [f"p:r{k}"] for k in range(8))


def test_collect_asks_window_whether_the_first_job_queued_behind_a_batch():
    seen = []

    def window(queued_before):
        seen.append(queued_before)
        return 0.0

    q = queue.Queue()
    q.put(job(1))
    collect(q, deque(), max_rows=8, wait_s=1.0, window=window)  # already queued: it waited
    threading.Timer(0.05, q.put, args=(job(1),)).start()
    started = time.monotonic()
    collect(q, deque(), max_rows=8, wait_s=1.0, window=window)  # arrives while collect blocks
    assert seen == [True, False]
    assert time.monotonic() - started < 0.5  # the window's 0 replaced wait_s


class Recorder:
    """run_batch that records each batch's rows and can be slowed down."""

    def __init__(self, delay_s=0.0):
        self.batches, self.delay_s = [], delay_s

    def __call__(self, items, params):
        self.batches.append(list(items))
        time.sleep(self.delay_s)
        return echo(items, params)


def test_a_client_sending_one_request_at_a_time_is_not_held_for_the_window():
    b = Batcher(Recorder(), max_batch_size=8, wait_s=0.5)
    try:
        for k in range(4):
            started = time.monotonic()
            assert b.submit([f"r{k}"], "p", time.monotonic() + 5) == [f"p:r{k}"]
            assert time.monotonic() - started < 0.25  # not the 0.5 s window
    finally:
        b.close()


def test_after_requests_came_together_the_window_holds_the_batch_for_the_next_one():
    run = Recorder(delay_s=0.2)
    b = Batcher(run, max_batch_size=8, wait_s=0.3, company_horizon_s=5.0)
    out = {}

    def client(name, delay):
        time.sleep(delay)
        out[name] = b.submit([name], "p", time.monotonic() + 10)

    # a runs alone; b queues behind it, so its batch keeps the window open and c (sent as a's
    # answer comes back, like a second client in step with the first) joins it
    threads = [threading.Thread(target=client, args=args) for args in (("a", 0), ("b", 0.05), ("c", 0.3))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    b.close()
    assert run.batches == [["a"], ["b", "c"]]
    assert out == {"a": ["p:a"], "b": ["p:b"], "c": ["p:c"]}


def test_the_window_lapses_once_requests_stop_coming_together():
    run = Recorder()
    b = Batcher(run, max_batch_size=8, wait_s=0.5, company_horizon_s=0.2)
    try:
        with b.announce() as first, b.announce() as second:  # two requests together: one batch
            threads = [threading.Thread(target=b.submit, args=([n], "p", time.monotonic() + 5), kwargs={"announced": a})
                       for n, a in (("x", first), ("y", second))]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        assert [sorted(batch) for batch in run.batches] == [["x", "y"]]
        started = time.monotonic()
        b.submit(["soon"], "p", time.monotonic() + 5)  # within the horizon: held for company
        assert time.monotonic() - started >= 0.4
        time.sleep(0.3)
        started = time.monotonic()
        b.submit(["later"], "p", time.monotonic() + 5)  # past the horizon: runs at once
        assert time.monotonic() - started < 0.25
    finally:
        b.close()


def test_a_failed_batch_is_retried_only_for_requests_still_waiting():
    """After a batch fails, each request is retried on its own, except those whose caller gave up
    (nothing to answer) or whose deadline passed meanwhile (504 at once, no model time)."""
    runs = []

    def run(items, params):
        runs.append(list(items))
        if len(items) > 1:
            raise RuntimeError("one of these rows breaks the batch")
        return echo(items, params)

    b = Batcher(run, max_batch_size=16, wait_s=0)
    waiting, gone, late = (Job([name], "p", time.monotonic() + 10) for name in ("waiting", "gone", "late"))
    gone.abandoned = True
    late.deadline = time.monotonic() - 1
    b._run([waiting, gone, late])
    b.close()
    assert runs == [["waiting", "gone", "late"], ["waiting"]]
    assert waiting.result == ["p:waiting"] and not gone.done.is_set()
    assert isinstance(late.error, DeadlineExceeded)


def test_requests_racing_close_are_answered_or_refused_never_left_waiting():
    """A submit that passes the closed check as close() runs must not be queued behind the
    batcher's stop signal, where no one would take it and its caller would wait the whole deadline.
    The queue's put is slowed for jobs so that close() lands between the check and the put."""
    b = Batcher(echo, max_batch_size=4, wait_s=0)
    put, checking = b._queue.put, threading.Event()

    def slow_put(item, *args, **kwargs):
        if item is not None:
            checking.set()
            time.sleep(0.2)
        put(item, *args, **kwargs)

    b._queue.put = slow_put
    outcome = {}

    def client():
        began = time.monotonic()
        try:
            outcome["answer"] = b.submit(["r"], "p", time.monotonic() + 3)
        except Exception as exc:  # noqa: BLE001
            outcome["error"] = exc
        outcome["took"] = time.monotonic() - began

    th = threading.Thread(target=client)
    th.start()
    assert checking.wait(2)
    b.close()
    th.join(5)
    assert outcome.get("answer") == ["p:r"] and outcome["took"] < 1.5, outcome
    with pytest.raises(Exception) as refused:  # after close: refused at once
        b.submit(["late"], "p", time.monotonic() + 3)
    assert refused.value.code == "shutting_down"


def test_statistics_count_each_request_once_and_never_break_the_batcher():
    from blip2.stats import BatchStats

    def run(items, params):
        if len(items) > 1:
            raise RuntimeError("breaks the batch")
        return echo(items, params)

    stats = BatchStats(0)
    b = Batcher(run, max_batch_size=16, wait_s=0, stats=stats)
    jobs = [Job([name], "p", time.monotonic() + 10) for name in ("a", "b", "c")]
    b._run(jobs)
    assert [j.result for j in jobs] == [["p:a"], ["p:b"], ["p:c"]]
    assert (stats.batches, stats.failed, stats.requests, stats.rows) == (4, 1, 3, 3)

    def broken(*args, **kwargs):
        raise ValueError("statistics bug")

    stats.record = broken  # a fault in the statistics must not fail answered requests or the thread
    assert b.submit(["d"], "p", time.monotonic() + 5) == ["p:d"]
    assert b.submit(["e"], "p", time.monotonic() + 5) == ["p:e"]
    b.close()
