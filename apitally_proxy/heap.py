"""Hand the C allocator's free memory back to the OS, once per sync, off the request path.

Under hostile cardinality every sync builds (and then frees) payloads of thousands of
rows; glibc keeps the freed memory in its heaps, so RSS stays at the high-water mark of
those transient peaks. `malloc_trim(0)` returns free pages to the OS, at the top of
each heap and (glibc 2.8+) inside it. Where there is no glibc (musl, macOS) `trim` is a
no-op: `available` is False and nothing is called.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger("apitally_proxy")


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None when the process does not run on glibc."""
    try:
        # "glibc 2.36"; raises (or is None) on musl and non-Linux platforms.
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
        fn = ctypes.CDLL(None).malloc_trim  # the process's own libc
    except (AttributeError, OSError, ValueError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


class HeapTrimmer:
    """`trim()` after each sync; counts the calls and the time they took."""

    def __init__(self, malloc_trim: Callable[[int], int] | None = None) -> None:
        self._malloc_trim = malloc_trim if malloc_trim is not None else _glibc_malloc_trim()
        self.trims = 0
        self.seconds = 0.0  # total time spent in malloc_trim
        self.last_seconds: float | None = None

    @property
    def available(self) -> bool:
        return self._malloc_trim is not None

    def trim(self) -> bool:
        """Release free heap memory; True if any was released."""
        fn = self._malloc_trim
        if fn is None:
            return False
        started = time.perf_counter()
        released = bool(fn(0))
        took = time.perf_counter() - started
        self.trims += 1
        self.seconds += took
        self.last_seconds = took
        log.debug("malloc_trim: %s in %.2f ms", "released" if released else "nothing", took * 1e3)
        return released
