"""A spin barrier for the threads of one Numba parallel region, that sleeps when the wait is long.

Why: a decode step of a 135M model is ~150 small matrix-vector products. Run as one `prange` loop
each, every product pays a fork/join of the thread team (~10 µs with the omp layer here), which is
as much as the product itself. Instead the decode step opens ONE parallel region with one
iteration per thread (`for t in prange(T)`), and the threads meet at `barrier` between phases: an
atomic add on a shared counter and a spin on it, well under a microsecond on two cores.

The counter only grows during a call: barrier number k (k = 0, 1, ...) is passed when all T threads
have added their 1 to it, i.e. when it reaches (k + 1)·T. The caller zeroes it before the region.
The atomic add is sequentially consistent and the load is an acquire, so every write a thread made
before the barrier is visible to every thread after it.

A busy PC: when another program takes a core, the sibling a thread waits for may be descheduled
for a whole time slice (milliseconds). A pure spin then burns its own slice too, and keeps its
core from running the sibling (BENCHMARKS.md, "Decode at the memory limit": 135M decode at 2
threads fell from ~100 to 40 tokens/s with one other CPU-bound process). So a thread spins (with
`pause`) for at most SPIN_CYCLES (~0.2 ms: far longer than the phases' imbalance on a quiet
machine, far shorter than a time slice), then sleeps on the counter with a futex: its core goes
idle and the kernel can run the late sibling there. The last thread to arrive wakes the sleepers
(only when some announced themselves in counter[1]: the quiet path makes no system call). The
sleeper announces itself before it re-reads the counter and the last arriver adds before it reads
the announcements, both sequentially consistent, so one of them sees the other: no lost wake-up
(and the futex wait has a 1 ms timeout besides).

Sleeping alone does not make a busy PC fast: measured (135M, 2 threads, one other CPU-bound
process) decode fell from ~55 tokens/s (pure spin) to ~31, each wake-up waiting for the other
program's slice to end. What does work is to stop asking for two cores that are not there: the
sleeps are counted (counter[2]) and the model decodes single-threaded for a while when a step
slept (runtime/model.py, `Model._busy`).

This needs the T iterations of the region to run at the same time on T threads (otherwise the first
would wait forever for the others): true of the omp and workqueue threading layers, which give each
thread one chunk of a `prange(T)` when T equals the thread count; not promised by tbb's task
scheduler, so callers use one thread there (`barrier_safe`).
"""
from __future__ import annotations

import ctypes
import platform
import sys

from llvmlite import binding as ll, ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .policy import kernel

SPIN_CYCLES = 600_000          # time-stamp counter ticks a waiting thread spins before it sleeps (~0.2 ms)
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_LINUX = sys.platform.startswith("linux")
_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98}.get(platform.machine().lower())
_FUTEX_WAIT_PRIVATE, _FUTEX_WAKE_PRIVATE = 128, 129
_SYSCALL = "minilm_edge_syscall"
FUTEX = _LINUX and _SYS_FUTEX is not None
if FUTEX:      # libc's syscall(), under a name of our own: compiled code (and Numba's cache) refers to it by name
    ll.add_symbol(_SYSCALL, ctypes.cast(ctypes.CDLL(None).syscall, ctypes.c_void_p).value)


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
def cycles(typingctx):
    """The CPU's cycle (time-stamp) counter: a cheap clock for bounding a spin."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                            "llvm.readcyclecounter")
        return builder.call(fn, [])
    return types.int64(), codegen


@intrinsic
def cpu_relax(typingctx):
    """`pause` on x86 (a spin-wait hint: saves power, frees the core's other hyperthread), else nothing."""
    def codegen(context, builder, sig, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.none(), codegen


def _futex(context, builder, arrty, arr, idxty, idx, op, val, timeout_ns):
    """syscall(SYS_futex, &low 32 bits of arr[idx], op, val, timeout or NULL, NULL, 0)."""
    i32, i64 = ir.IntType(32), ir.IntType(64)
    word = builder.bitcast(_int64_ptr(context, builder, arrty, arr, idxty, idx), i32.as_pointer())  # little endian
    ts_t = ir.LiteralStructType([i64, i64])
    if timeout_ns:
        ts = cgutils.alloca_once(builder, ts_t)
        builder.store(ir.Constant(ts_t, [timeout_ns // 10**9, timeout_ns % 10**9]), ts)
        ts = builder.bitcast(ts, ir.IntType(8).as_pointer())
    else:
        ts = ir.Constant(ir.IntType(8).as_pointer(), None)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64], var_arg=True), _SYSCALL)
    null = ir.Constant(ir.IntType(8).as_pointer(), None)
    builder.call(fn, [ir.Constant(i64, _SYS_FUTEX), word, ir.Constant(i32, op), val, ts, null, ir.Constant(i32, 0)])


@intrinsic
def futex_wait(typingctx, arr, idx, expected):
    """Sleep until woken (`futex_wake`) or 1 ms passed, unless the low 32 bits of arr[idx] already
    differ from `expected` (int64 array; Linux only, else a no-op)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        if FUTEX:
            val = builder.trunc(context.cast(builder, args[2], sig.args[2], types.int64), ir.IntType(32))
            _futex(context, builder, sig.args[0], args[0], sig.args[1], args[1], _FUTEX_WAIT_PRIVATE, val, 1_000_000)
        return context.get_dummy_value()
    return types.none(arr, idx, expected), codegen


@intrinsic
def futex_wake(typingctx, arr, idx):
    """Wake every thread sleeping in `futex_wait` on arr[idx] (Linux only, else a no-op)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        if FUTEX:
            _futex(context, builder, sig.args[0], args[0], sig.args[1], args[1], _FUTEX_WAKE_PRIVATE,
                   ir.Constant(ir.IntType(32), 2**31 - 1), 0)
        return context.get_dummy_value()
    return types.none(arr, idx), codegen


@kernel()
def barrier(counter, k, n_threads):
    """Barrier number k of a region of n_threads threads; returns k + 1 (the next barrier's number).
    counter: int64 [≥ 3], [0] and [1] zero when the region started: [0] arrivals, [1] threads
    asleep; [2] counts the sleeps (never reset here: callers read its growth)."""
    target = (k + 1) * n_threads
    if atomic_add(counter, 0, 1) + 1 == target:            # the last to arrive
        if atomic_load(counter, 1) > 0:
            futex_wake(counter, 0)
        return k + 1
    t0 = cycles()
    while atomic_load(counter, 0) < target:
        cpu_relax()
        if cycles() - t0 > SPIN_CYCLES and FUTEX:
            atomic_add(counter, 2, 1)                        # sleeps, for the caller to see a busy PC
            atomic_add(counter, 1, 1)                        # announce, then re-read (module docstring)
            c = atomic_load(counter, 0)
            while c < target:
                futex_wait(counter, 0, c)
                c = atomic_load(counter, 0)
            atomic_add(counter, 1, -1)
            break
    return k + 1


def barrier_safe() -> bool | None:
    """True when the active Numba threading layer runs the iterations of `prange(T)` concurrently;
    None while no parallel region has run yet (the layer is chosen at the first one)."""
    import numba
    try:
        return numba.threading_layer() in ("omp", "workqueue")
    except ValueError:
        return None
