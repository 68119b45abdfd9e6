"""Running a small model's sampling as two Python threads, each on part of the images.

On 2 CPU cores, torch's intra-op threads leave much of the second core idle on the tiny world's small
operations: sampling its evaluation images took 20-27% less time as two threads on half the images each,
with one intra-op thread apiece (``docs/benchmarks/eval_threads.py``; docs/benchmarks.md). The
images come out bit-identical.
"""

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import torch

WORKERS = 2


def split_rows(rows: int, parts: int) -> list[slice]:
    """``rows`` rows as at most ``parts`` contiguous slices of near-equal size, none empty."""
    size = -(-rows // parts)
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def map_in_threads(fn: Callable, parts: list, stop: threading.Event | None = None) -> list:
    """``fn`` over ``parts``, ``WORKERS`` at a time in their own threads, each thread with its share of torch's
    intra-op threads (new threads take torch's setting of the moment); the results in order. If the caller is
    interrupted (Ctrl-C) or a part fails, ``stop`` is set before the threads are waited for, so that ``fn`` can
    end early rather than run its part to the end."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // WORKERS))
    try:
        with ThreadPoolExecutor(WORKERS) as pool:
            futures = [pool.submit(fn, part) for part in parts]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                for future in done:
                    future.result()  # a failed part raises here, before the parts still running are waited for
                return [future.result() for future in futures]
            except BaseException:
                if stop is not None:
                    stop.set()
                for future in futures:
                    future.cancel()
                raise
    finally:
        torch.set_num_threads(threads)
