"""Numba policy, chosen in one place.

Every kernel module imports its decorators from here, so that caching, threading and fastmath are
decided once and explained once:

- `cache=True`: compiled machine code is stored next to the module (or in NUMBA_CACHE_DIR), so the
  second start of the program does not pay the JIT again; time to first token matters to users.
- `fastmath`: off by default. Kernels whose reductions gain from reassociation (dot products, sums
  of squares) opt in with `FASTMATH_REDUCE`, which allows reassociation and contraction (FMA) but not
  `nnan`/`ninf`: a NaN or inf in the input must still come out as NaN or inf, not be optimised away.
- `parallel=True` only for kernels that split independent output rows with `prange`.

The thread count is set at the API edge with `threads(n)` and restored afterwards; model code never
touches environment variables.
"""
from __future__ import annotations

import contextlib

import numba

# Reassociation + contraction: lets LLVM vectorise float reductions; keeps NaN/inf semantics.
FASTMATH_REDUCE = {"reassoc", "contract", "arcp", "nsz"}


def kernel(fastmath=False):
    """Decorator for a serial leaf kernel."""
    return numba.njit(cache=True, nogil=True, fastmath=fastmath)


def parallel_kernel(fastmath=False):
    """Decorator for a kernel that splits independent rows across threads with `prange`."""
    return numba.njit(cache=True, nogil=True, parallel=True, fastmath=fastmath)


@contextlib.contextmanager
def threads(n: int | None):
    """Run the block with `n` Numba threads (None: leave as is), restoring the old count after."""
    if n is None:
        yield
        return
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(old)
