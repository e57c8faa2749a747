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

BLAS (numpy's OpenBLAS) has its own thread pool. Two pools that spin-wait on 2 cores steal each
other's time slices (ten times slower prefills were seen; BENCHMARKS.md). So each forward call
says how many BLAS threads it wants (`blas_threads`): all of them for large matrix products
(prefill), one for small ones, where Numba kernels do the parallel work. threadpoolctl finds the
BLAS library numpy loaded and sets its threads (about 1 µs a call).
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import numba
from numba.core import errors, types
from numba.extending import overload

# Reassociation + contraction: lets LLVM vectorise float reductions; keeps NaN/inf semantics.
FASTMATH_REDUCE = {"reassoc", "contract", "arcp", "nsz"}


def kernel(fastmath=False, inline=False):
    """Decorator for a serial leaf kernel. `inline`: inlined into its callers by Numba itself
    (inline="always"), for small row kernels called once per row.

    Why: a call that is not inlined updates the reference count of every array argument on entry
    and exit (two atomic operations each; a record's (namedtuple's) arrays count one by one), and
    so does slicing an array (`w[n]`). Per row that costs more than the row's arithmetic: row
    kernels address rows by offset into the whole array, are inlined, and callers put the row
    loop inside one call per range of rows. Other kernels cite this docstring."""
    return numba.njit(cache=True, nogil=True, fastmath=fastmath, inline="always" if inline else "never")


def parallel_kernel(fastmath=False):
    """Decorator for a kernel that splits independent rows across threads with `prange`."""
    return numba.njit(cache=True, nogil=True, parallel=True, fastmath=fastmath)


def compile_time_choice(*impls):
    """Decorator for a function `f(kind, *args)` with no body of its own (a signature and a docstring)
    that calls `impls[kind](*args)`, chosen when Numba types the call: only the chosen kernel is
    compiled.

    Why: Numba types (and so compiles) both sides of an `if` on an argument, and every kernel called
    there. A decode step with the activation kind as a run-time argument compiled the int8, the
    float32 and a test-only row kernel into every specialization of the step, three times the
    compile of the one that runs (BENCHMARKS.md, "The first answer under 5 minutes"). Here `kind`
    must be a compile-time constant: a module-level int or an int literal at the call site (Numba
    types it Literal[int] and passes the literal on when the caller hands its argument down). The
    step's entry points are made one per kind with the kind as a constant (decode_step.ENTRIES).
    A kind that is not a constant is a typing error, not a silent compile of every kernel.
    Caveat (as for inlined helpers, policy.kernel): a cached caller does not notice a change of
    `impls`; delete the kernels' __pycache__ after changing a choice."""
    def wrap(stub):
        signature = inspect.signature(stub)
        names = list(signature.parameters)

        @functools.wraps(stub)
        def choose(kind, *args):            # called from Python (not compiled): chosen at run time
            return impls[kind](*args)

        def typed(kind, *args):
            if not isinstance(kind, types.IntegerLiteral):
                raise errors.TypingError(f"{stub.__name__}: the kind must be a compile-time constant, got {kind}")
            return _forward(names, impls[kind.literal_value])
        typed.__signature__ = signature
        overload(choose, prefer_literal=True, inline="always")(typed)
        return choose
    return wrap


def _forward(names, impl):
    """`def call(kind, a, b, ...): return impl(a, b, ...)` with the stub's parameter names: inlined into
    the caller by Numba (so the caller calls `impl` itself: no function of its own to compile and link),
    which Numba's inliner does only for a function without *args."""
    scope = {"impl": impl}
    exec(f"def call({', '.join(names)}):\n    return impl({', '.join(names[1:])})\n", scope)
    return scope["call"]


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


@functools.lru_cache(maxsize=None)
def _blas_libraries():
    from threadpoolctl import ThreadpoolController
    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


def blas_threads(n: int) -> None:
    """Let BLAS use `n` threads for the calls that follow (no-op when already so)."""
    for lib in _blas_libraries():
        if lib.num_threads != n:
            lib.set_num_threads(n)


@contextlib.contextmanager
def blas_threads_as(n: int):
    """Run the block with BLAS at `n` threads, restoring each library's count after."""
    libs = _blas_libraries()
    old = [lib.num_threads for lib in libs]
    blas_threads(n)
    try:
        yield
    finally:
        for lib, k in zip(libs, old):
            lib.set_num_threads(k)
