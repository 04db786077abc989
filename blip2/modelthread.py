"""One thread for the process's model work: loading, warm-up and every batch.

On the CPU, torch runs its kernels on an OpenMP thread team that belongs to the
Python thread that called it. Once two Python threads have called into torch (say
``init()`` loaded and warmed the model on the main thread, and the batcher thread
ran the batches), there are two teams and more OpenMP threads than cores. GNU
OpenMP then stops letting idle threads spin between kernels. On the 2-core
development machine that made the vision tower about 25% slower (33-36 ms against
28 ms for one image). Funnelling all model work through one thread keeps one team.
The hand-off costs well under a millisecond per batch.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_local = threading.local()
_executor: ThreadPoolExecutor | None = None
_pid: int | None = None


def _mark() -> None:
    _local.is_model_thread = True


def _get() -> ThreadPoolExecutor:
    global _executor, _pid
    with _lock:
        if _executor is None or _pid != os.getpid():  # a forked worker gets its own thread
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blip2-model", initializer=_mark)
            _pid = os.getpid()
        return _executor


def on_model_thread() -> bool:
    return getattr(_local, "is_model_thread", False)


def run(fn: Callable[..., T], /, *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on the model thread; returns its result or raises its exception."""
    if on_model_thread():
        return fn(*args, **kwargs)
    return _get().submit(fn, *args, **kwargs).result()
