"""Keep freed memory for reuse during training (glibc's malloc), instead of returning it to the
system after every step.

A training step allocates and frees tensors of several MB (pre-activations, gradients). glibc
serves large requests with fresh ``mmap`` pages and gives them back on free, so every step pays
thousands of page faults (the kernel zeroing each new page): ~6,000 per 1024-token step of the
reference configuration, 15% of its CPU time (docs/training.md). `retained` raises glibc's mmap
and trim thresholds while it is active, so freed blocks are reused; on exit it restores glibc's
initial thresholds and hands the unused memory back (``malloc_trim``). Elsewhere than glibc it
does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["retained", "trim"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEPT_TRIM, _KEPT_MMAP = 1 << 30, 32 << 20  # 32 MiB: glibc's largest mmap threshold on 64-bit
_DEFAULT_TRIM, _DEFAULT_MMAP = 128 << 10, 128 << 10  # glibc's initial values
_lock = threading.Lock()
_active = 0


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


@contextmanager
def retained() -> Iterator[None]:
    """While active, freed heap memory stays in the process for reuse (nested uses are fine)."""
    global _active
    if _LIBC is None:
        yield
        return
    with _lock:
        if _active == 0:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, _KEPT_MMAP)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, _KEPT_TRIM)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                _LIBC.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP)
                _LIBC.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
                _LIBC.malloc_trim(0)


def trim() -> None:
    """Hand the heap's free memory back to the system now (glibc keeps freed blocks below its mmap
    threshold, which grows after large frees, in every thread's arena; a burst of temporaries
    then stays resident). Outside `retained` only, where it would undo the point."""
    if _LIBC is not None and _active == 0:
        _LIBC.malloc_trim(0)
