"""The thread and process plumbing of the pipeline: a reader thread that decompresses ahead, and an optional
pool of worker processes that run records.process_block on blocks in input order.

Results always come back in input order whatever the number of workers, so the output does not depend on it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from protein_performer.errors import UserError
from protein_performer.prep.records import WorkerConfig, configure


def default_workers() -> int:
    """1 on up to 2 cores (measured: a worker pool's pickling and pipe traffic cost more than it wins there), else
    all cores."""
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else cores


@contextmanager
def worker_pool(workers: int, config: WorkerConfig) -> Iterator:
    """A pool of `workers` processes configured with `config`, or None (work in this process) for 1 worker."""
    if workers <= 1:
        configure(config)
        yield None
        return
    pool = mp.get_context().Pool(workers, configure, (config,))
    try:
        yield pool
    finally:
        pool.terminate()


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Run the iterator `items` in a thread, `depth` items ahead; its exceptions come out here, in order.

    Used for decompression (isal releases the GIL while inflating), which then overlaps with parsing.
    """
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((0, item)):
                    return
            put((1, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((2, e))
        finally:
            if stop.is_set() and hasattr(items, "close"):
                items.close()

    thread = threading.Thread(target=produce, name="prep-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == 0:
                yield item
            elif kind == 1:
                break
            else:
                raise item
    finally:
        stop.set()
    thread.join()


def ordered_map(pool, fn: Callable, items: Iterable, max_pending: int) -> Iterator:
    """fn over items in order, at most max_pending in flight; an error of `items` (a bad input) comes after the
    results of the blocks before it, so the message can say how far the input was read."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    error = None
    try:
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= max_pending:
                yield pending.popleft().get()
    except UserError as e:
        error = e
    while pending:
        yield pending.popleft().get()
    if error is not None:
        raise error
