"""Pipelined batch prediction: read the next cases and write the previous ones while the network works.

:func:`run_pipeline` runs three stages over a list of items, in order:

* ``read(item) -> job`` in reader threads (loading, checks, preprocessing into plan space),
* ``infer(job) -> job`` on the calling thread (the network; it keeps torch's intra-op threads),
* ``write(job) -> result`` in writer threads (restoring onto the input grid, post-processing, atomic writes).

The reads ahead and the writes behind are bounded (``queue_size`` waiting in each direction beyond those being
worked on), so at most ``workers + 2 * queue_size + 1`` items are in memory at once whatever the number of items.
Results come back, and ``on_done`` is called, in the order of the items, on the calling thread.

The stages catch their own per-item failures (:func:`medseg.inference.batch.predict_cases` turns them into a
``failed`` result); anything that escapes a stage (KeyboardInterrupt, a bug) stops the run: reads and writes not
started are cancelled, those running are allowed to finish (a write is atomic, so nothing is left half-written)
and the exception is raised on the calling thread.

Helper threads run torch's own operations (resampling) with one intra-op thread each, so that they do not compete
with the network's thread pool; numpy, scipy, zlib and torch release the GIL in their inner loops.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from medseg.errors import ConfigError

__all__ = ["run_pipeline", "split_workers", "max_in_flight"]

log = logging.getLogger(__name__)

T = TypeVar("T")
J = TypeVar("J")
R = TypeVar("R")


def split_workers(workers: int) -> tuple[int, int]:
    """``workers`` helper threads -> ``(readers, writers)``: half read, the rest write (the write side, with
    resampling onto the input grid and compression, is the heavier one).

    Raises:
        ConfigError: ``workers`` < 2 (one worker is the sequential loop, without helper threads).
    """
    if workers < 2:
        raise ConfigError("--workers", workers, "2 or more for a pipeline (1 runs the cases one after the other)")
    readers = max(1, workers // 2)
    return readers, max(1, workers - readers)


def max_in_flight(workers: int, queue_size: int = 1) -> int:
    """The most items a pipeline of ``workers`` holds at once (read, waiting, in the network, waiting, writing)."""
    if workers <= 1:
        return 1
    return workers + 2 * queue_size + 1


def _helper_thread() -> None:
    """Thread initializer: torch operations of this thread use one intra-op thread (the network keeps its own)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def run_pipeline(items: Iterable[T], read: Callable[[T], J], infer: Callable[[J], J], write: Callable[[J], R], *,
                 workers: int = 2, queue_size: int = 1, on_done: Callable[[R], None] | None = None) -> list[R]:
    """Run ``write(infer(read(item)))`` for every item, overlapping the stages of consecutive items.

    Args:
        items: the items, in order.
        read: the read stage (runs in a reader thread when ``workers`` > 1).
        infer: the network stage (always on the calling thread).
        write: the write stage (runs in a writer thread when ``workers`` > 1).
        workers: helper threads (:func:`split_workers`); 1 runs the three stages one item after the other on the
            calling thread, exactly as a plain loop.
        queue_size: items that may wait between stages beyond those being worked on (>= 1).
        on_done: called with each result, in order, on the calling thread, as soon as it and every result before
            it are known.

    Returns:
        One result per item, in order.

    Raises:
        ConfigError: ``workers`` < 1 or ``queue_size`` < 1.
        BaseException: whatever escaped a stage (after the other stages stopped).
    """
    if workers < 1:
        raise ConfigError("--workers", workers, "1 (sequential) or more (pipelined)")
    if queue_size < 1:
        raise ConfigError("queue_size", queue_size, "1 or more")
    results: list[R] = []

    def emit(res: R) -> None:
        results.append(res)
        if on_done is not None:
            on_done(res)

    if workers == 1:
        for item in items:
            emit(write(infer(read(item))))
        return results
    n_read, n_write = split_workers(workers)
    max_reads, max_writes = n_read + queue_size, n_write + queue_size
    pending = iter(items)
    reads: deque[Future] = deque()
    writes: deque[Future] = deque()
    readers = ThreadPoolExecutor(n_read, thread_name_prefix="medseg-read", initializer=_helper_thread)
    writers = ThreadPoolExecutor(n_write, thread_name_prefix="medseg-write", initializer=_helper_thread)

    def top_up() -> None:
        while len(reads) < max_reads:
            item = next(pending, _END)
            if item is _END:
                return
            reads.append(readers.submit(read, item))

    def collect(keep: int) -> None:
        """Emit finished writes in order; wait for the oldest while more than ``keep`` are pending."""
        while writes and (len(writes) > keep or writes[0].done()):
            emit(writes.popleft().result())

    try:
        top_up()
        while reads:
            job = reads.popleft().result()
            top_up()
            job = infer(job)
            collect(max_writes - 1)
            writes.append(writers.submit(write, job))
            collect(max_writes)
        collect(0)
    except BaseException:
        for f in (*reads, *writes):
            f.cancel()
        log.debug("pipeline stopped; waiting for the reads and writes under way")
        raise
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True, cancel_futures=True)
    return results


_END: Any = object()
