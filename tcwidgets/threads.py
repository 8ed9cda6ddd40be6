"""One thread for the memory-bound kernels of a training step on a CPU.

With two threads, a sparse training step's gathers and scatters (embedding bags, sampled products),
sorts, bincounts and Adam cost more CPU time, summed over the threads, than on one thread: they
wait on memory, and each parallel region pays to wake and join the other thread. The dense encoder
product and the TopK choice do use a second thread well (docs/training.md has the measurements).
So a sparse (TopK, BatchTopK) training step runs inside `serial` (one thread), and the transcoder
gives its dense product and choice back the caller's threads with `parallel`. Outside `serial`,
`parallel` does nothing.
Thread counts are per calling thread (OpenMP's), so other threads are unaffected. (The state is a
plain dict, not a ``threading.local``: nnsight's remote mode pickles this module with the transcoder.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["parallel", "serial"]

_replaced: dict[int, int | None] = {}  # per thread (id): the count `serial` replaced, while it is active


@contextmanager
def serial(enabled: bool = True) -> Iterator[None]:
    """Run the enclosed kernels on one thread (nested uses are fine; ``enabled=False``: as is)."""
    threads = torch.get_num_threads()
    if not enabled or threads == 1:
        yield
        return
    me = threading.get_ident()
    outer = _replaced.get(me)
    _replaced[me] = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _set(me, outer)


@contextmanager
def parallel() -> Iterator[None]:
    """Inside `serial`, run the enclosed kernels on the threads it replaced; elsewhere as is."""
    me = threading.get_ident()
    threads = _replaced.get(me)
    if threads is None:
        yield
        return
    _replaced[me] = None
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(1)
        _replaced[me] = threads


def _set(me: int, threads: int | None) -> None:
    if threads is None:
        _replaced.pop(me, None)
    else:
        _replaced[me] = threads
