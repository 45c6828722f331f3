"""Work done ahead in background threads, results in order, and Ctrl-C that always stops.

concurrent.futures' pool joins its threads when the `with` block ends and again at interpreter
exit, so one worker blocked for good (in open() on a FIFO, on a hung network mount) would keep
Ctrl-C from ending the run. These workers are daemon threads that nobody joins: an interrupt
ends the run at once and the process exits even while a worker is still blocked. A worker
busy in ordinary work is given a second to finish its item when the run ends: a daemon thread
still inside OpenCV's C++ code when the interpreter exits can abort the process.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections import deque
from typing import Callable, Iterable, Iterator, TypeVar

__all__ = ["prefetch"]

FINISH_SECONDS = 1.0  # how long an ended run waits for its workers' current items

Item = TypeVar("Item")
Out = TypeVar("Out")


def _work(tasks: "queue.SimpleQueue") -> None:
    while True:
        task = tasks.get()
        if task is None:
            return
        future, function, item = task
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(function(item))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, who re-raises it
            future.set_exception(e)


def prefetch(function: Callable[[Item], Out], items: Iterable[Item], workers: int = 1,
             lookahead: int = 2) -> Iterator[Out]:
    """Yield function(item) for each item, in order, computed up to `lookahead` items ahead in
    `workers` daemon threads. Closing the generator (or an exception in the consumer) cancels
    what has not started and leaves running calls to finish, or not, unwaited."""
    tasks: queue.SimpleQueue = queue.SimpleQueue()
    threads = [threading.Thread(target=_work, args=(tasks,), name=f"vgg-onnx-prep-{n}", daemon=True)
               for n in range(workers)]
    for thread in threads:
        thread.start()
    pending: deque = deque()
    source = iter(items)
    try:
        while True:
            for item in source:
                future: concurrent.futures.Future = concurrent.futures.Future()
                tasks.put((future, function, item))
                pending.append(future)
                if len(pending) >= lookahead:
                    break
            if not pending:
                return
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        for _ in threads:
            tasks.put(None)
        deadline = time.monotonic() + FINISH_SECONDS
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
