"""Threads for the compiled kernels (which release the GIL): one pool, and work shared out
piece by piece.

Work is never split into one fixed share per thread: on a shared machine one core can stall
for tens of milliseconds, and a fixed share then holds the whole call up (measured on W3,
2048² RGB at 256/192: two threads took 80-100 ms in streaks where one thread took 17 ms). Each
thread instead takes the next piece when it is free. Every piece is computed whole by one
thread, so the bits do not depend on which thread took it, or on how many there are.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["PIECES_PER_THREAD", "SharedIter", "each", "merge_pool", "pieces", "share"]

T = TypeVar("T")

#: Pieces a range is cut into per thread (:func:`pieces`): enough for a stalled thread's share
#: to be taken over, few enough that each piece stays long.
PIECES_PER_THREAD = 4

_POOL: list = []


def merge_pool() -> ThreadPoolExecutor:
    """One thread pool for every merge (threads are started once, on first use)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(64, thread_name_prefix="patch_viewer-merge"))
    return _POOL[0]


class SharedIter(Iterator[T]):
    """An iterator over ``items`` that several threads draw from, each item once."""

    def __init__(self, items: Iterable[T]):
        self._lock, self._it = threading.Lock(), iter(items)

    def __next__(self) -> T:
        with self._lock:
            return next(self._it)


def share(items: list[T], workers: int, work: Callable[[Iterator[T]], None]) -> None:
    """Run ``work(iterator)`` on up to ``workers`` threads that draw ``items`` from one
    shared iterator (on the calling thread alone when one worker or one item). ``work``
    holds a thread's own state (a canvas) across the items it takes."""
    workers = max(1, min(workers, len(items)))
    if workers == 1:
        work(iter(items))
        return
    shared = SharedIter(items)
    list(merge_pool().map(lambda _: work(shared), range(workers)))


def each(items: list[T], workers: int, func: Callable[[T], None]) -> None:
    """``func(item)`` for every item, on up to ``workers`` threads sharing them out."""

    def work(it: Iterator[T]) -> None:
        for item in it:
            func(item)

    share(items, workers, work)


def pieces(a: int, z: int, workers: int, minimum: int = 1) -> list[tuple[int, int]]:
    """``[a, z)`` cut into about :data:`PIECES_PER_THREAD` pieces per worker, each at least
    ``minimum`` long (one piece for one worker)."""
    n = z - a
    if workers <= 1 or n <= minimum:
        return [(a, z)] if n > 0 else []
    k = max(1, min(workers * PIECES_PER_THREAD, n // max(minimum, 1)))
    edges = [a + (n * i) // k for i in range(k + 1)]
    return [(edges[i], edges[i + 1]) for i in range(k) if edges[i + 1] > edges[i]]
