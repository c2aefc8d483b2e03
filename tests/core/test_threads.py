"""Work shared out to threads piece by piece (merge.threads)."""

import threading
import time

import numpy as np
import pytest

from patch_viewer import PatchGrid, merge_patches
from patch_viewer.core.merge.threads import each, pieces, share


@pytest.mark.parametrize("n, workers", [(0, 2), (1, 2), (7, 1), (7, 2), (100, 3), (5, 8)])
def test_pieces_cover_the_range_once_in_order(n, workers):
    got = pieces(3, 3 + n, workers)
    assert [a for a, _ in got] == sorted(a for a, _ in got)
    flat = [i for a, z in got for i in range(a, z)]
    assert flat == list(range(3, 3 + n))
    assert all(z > a for a, z in got)
    if workers > 1 and n >= workers:
        assert len(got) >= workers  # every thread can take one


def test_a_stalled_thread_holds_no_work_up():
    """One thread sleeps on its first item; the other takes the rest, each item once."""
    taken: list[tuple[str, int]] = []
    lock = threading.Lock()
    first = threading.Event()

    def work(it):
        for item in it:
            with lock:
                taken.append((threading.current_thread().name, item))
            if not first.is_set():
                first.set()
                time.sleep(0.3)

    share(list(range(40)), 2, work)
    assert sorted(i for _, i in taken) == list(range(40))
    counts = {}
    for name, _ in taken:
        counts[name] = counts.get(name, 0) + 1
    assert max(counts.values()) >= 35  # the free thread took over the stalled one's share


def test_each_runs_on_the_calling_thread_for_one_worker():
    names = []
    each([1, 2, 3], 1, lambda _: names.append(threading.current_thread().name))
    assert set(names) == {threading.current_thread().name}


def test_merge_with_a_slow_thread_gives_the_same_bits(monkeypatch):
    """Whichever thread takes a band, the bits are those of one thread."""
    from patch_viewer.core.merge import accumulate

    rng = np.random.default_rng(0)
    grid = PatchGrid((300, 200), 16, stride=5)
    p = rng.standard_normal(grid.patches_shape).astype(np.float32)
    one = merge_patches(p, grid, workers=1)
    original = accumulate._add
    calls = []

    def slow_first(*args, **kwargs):
        if not calls:
            calls.append(1)
            time.sleep(0.05)
        return original(*args, **kwargs)

    monkeypatch.setattr(accumulate, "_add", slow_first)
    np.testing.assert_array_equal(merge_patches(p, grid, workers=2), one)
