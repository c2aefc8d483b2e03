"""Peak resident memory over a process and all its children (worker processes included)."""

from __future__ import annotations

import contextlib
import os
import threading


def tree_peak(pid: int | None = None, every: float = 0.05):
    """Start sampling the summed resident memory of ``pid`` (default: this process) and its
    children every ``every`` seconds; returns ``stop()``, which gives the peak in bytes."""
    import psutil

    root = psutil.Process(pid or os.getpid())
    peak = [0]
    done = threading.Event()

    def loop():
        while not done.is_set():
            total = 0
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            peak[0] = max(peak[0], total)
            done.wait(every)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()

    def stop() -> int:
        done.set()
        thread.join()
        return peak[0]

    return stop
