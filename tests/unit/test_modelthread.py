"""All model work runs on one thread, whichever thread asks for it."""

import threading

import pytest

from blip2 import modelthread


def test_calls_from_many_threads_run_on_one_model_thread():
    seen = []

    def work(k):
        seen.append(threading.get_ident())
        return k * 2

    results = {}
    threads = [threading.Thread(target=lambda k=k: results.update({k: modelthread.run(work, k)})) for k in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == {k: 2 * k for k in range(6)}
    assert len(set(seen)) == 1 and seen[0] != threading.get_ident()
    assert modelthread.run(threading.current_thread).name.startswith("blip2-model")


def test_errors_come_back_to_the_caller_and_nested_calls_run_inline():
    def fail():
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        modelthread.run(fail)
    # a call made from the model thread itself must not queue behind itself (it would deadlock)
    inner = modelthread.run(lambda: (modelthread.on_model_thread(), modelthread.run(threading.get_ident)))
    assert inner[0] is True and inner[1] == modelthread.run(threading.get_ident)
    assert not modelthread.on_model_thread()
