"""A spin barrier for the threads of one Numba parallel region.

Why: a decode step of a 135M model is ~150 small matrix-vector products. Run as one `prange` loop
each, every product pays a fork/join of the thread team (~10 µs with the omp layer here), which is
as much as the product itself. Instead the decode step opens ONE parallel region with one
iteration per thread (`for t in prange(T)`), and the threads meet at `barrier` between phases: an
atomic add on a shared counter and a spin on it, well under a microsecond on two cores.

The counter only grows during a call: barrier number k (k = 0, 1, ...) is passed when all T threads
have added their 1 to it, i.e. when it reaches (k + 1)·T. The caller zeroes it before the region.
The atomic add is sequentially consistent and the load is an acquire, so every write a thread made
before the barrier is visible to every thread after it.

A waiting thread spins with `pause` for about SPIN_PAUSES rounds (tens of microseconds: the usual
wait between two phases of a step), then gives its core away with sched_yield at every round. A
pure spin is fastest on an idle machine but collapses on a busy one: when the other thread of the
region has been descheduled, the spinner burns whole time slices waiting for it (BENCHMARKS.md:
decode at 2 threads fell from ~145 to 42–49 tok/s next to one other CPU-bound process, and the
batched step of calibration to 15 tok/s among ten jobs; with the yield: 58–61). On an idle
machine sched_yield returns at once, so it only adds a system call's latency to waits that are
long anyway.

This needs the T iterations of the region to run at the same time on T threads (otherwise the first
would wait forever for the others): true of the omp and workqueue threading layers, which give each
thread one chunk of a `prange(T)` when T equals the thread count; not promised by tbb's task
scheduler, so callers use one thread there (`barrier_safe`).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .policy import kernel


def _int64_ptr(context, builder, arrty, arr, idxty, idx):
    a = context.make_array(arrty)(context, builder, arr)
    return builder.gep(a.data, [context.cast(builder, idx, idxty, types.intp)])


@intrinsic
def atomic_add(typingctx, arr, idx, val):
    """arr[idx] += val atomically (int64 array, sequentially consistent); returns the old value."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        p = _int64_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", p, v, "seq_cst")
    return types.int64(arr, idx, val), codegen


@intrinsic
def atomic_load(typingctx, arr, idx):
    """arr[idx] read atomically with acquire order (int64 array)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        p = _int64_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        return builder.load_atomic(p, "acquire", 8)
    return types.int64(arr, idx), codegen


@intrinsic
def spin_pause(typingctx):
    """x86 `pause`: a spin-wait hint (the core spends less power and lets its sibling hyperthread run)."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                            "llvm.x86.sse2.pause")
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def sched_yield(typingctx):
    """The C library's sched_yield(): let another runnable thread have this core. Called by symbol
    name (resolved when the code is linked), so kernels that use it still go to Numba's disk cache."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        return builder.call(fn, [])
    return types.int32(), codegen


SPIN_PAUSES = 1024      # pause rounds before a waiting thread starts yielding (~10–50 µs)


@kernel()
def barrier(counter, k, n_threads):
    """Barrier number k of a region of n_threads threads; returns k + 1 (the next barrier's number).
    counter: int64 [≥ 1], zero when the region started."""
    atomic_add(counter, 0, 1)
    target = (k + 1) * n_threads
    spins = 0
    while atomic_load(counter, 0) < target:
        if spins < SPIN_PAUSES:
            spin_pause()
            spins += 1
        else:
            sched_yield()
    return k + 1


def barrier_safe() -> bool | None:
    """True when the active Numba threading layer runs the iterations of `prange(T)` concurrently;
    None while no parallel region has run yet (the layer is chosen at the first one)."""
    import numba
    try:
        return numba.threading_layer() in ("omp", "workqueue")
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------
# Work shared by claims: threads that run at different speeds (on this project's VMs one core of
# two was ~12% slower in every phase of the batched step, and a static split made the faster one
# wait at the barrier for the difference) take chunks of a range of n items from a shared counter
# until none is left, so a slower thread simply takes fewer.


@kernel(inline=True)
def chunk_bounds(k, n, T, c):
    """Items [a, e) of chunk k of n items shared by T threads, smallest chunk c (a >= n: no chunk k).
    Guided: the first T chunks split half of the items, the next T half of the rest, and so on while
    such a chunk holds at least c items; then chunks of c. So a few claims (about T log2(n / (2 T c))
    + 2 T) cover the range and the last ones are small, which evens the threads' ends."""
    s = 0
    while True:
        size = (n - s) // (2 * T)
        if size < c:
            a = s + k * c
            return min(a, n), min(a + c, n)
        if k < T:
            return s + k * size, s + (k + 1) * size
        s += T * size
        k -= T


@kernel(inline=True)
def claim(counter, i, n, T, c):
    """The next chunk [a, e) of n items for the calling thread (`chunk_bounds`), from the claim
    counter counter[i] (int64, zero before the first claim; every thread claims until a >= e)."""
    return chunk_bounds(atomic_add(counter, i, 1), n, T, c)
