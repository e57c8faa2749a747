"""Python threads for the quantizer's independent pieces of work (AWQ's α trials, the chunks of
its calibration pass, the final clip of each linear), with results in the serial order."""
from __future__ import annotations

MAX_WORKERS = 4                    # threads of parallel_map at most (each holds a trial's activations)


def parallel_map(fn, items):
    """fn(i) for i in items, in order, computed on as many Python threads as Numba may use
    (NUMBA_NUM_THREADS, default all cores) with BLAS at one thread each: the same results as a
    serial loop. A generator: consume it as it goes, and only a few results wait at a time.

    Why threads: the trials of the scale search and the chunks of the calibration pass are
    independent and spend their time in BLAS products and NumPy ufuncs, which release the GIL;
    BLAS's own threads gain little on these mid-sized products, and the ufuncs (softmax, SiLU,
    rounding) run on one core. Measured on blocks 0-3 of SmolLM2-135M, 2 cores: BENCHMARKS.md.
    At most MAX_WORKERS threads: each holds a trial's or a chunk's activations (~0.1 GB for
    SmolLM2-135M), and the peak memory should not grow with the core count."""
    from concurrent.futures import ThreadPoolExecutor

    import numba

    from ..kernels.policy import blas_threads_as
    items = list(items)
    workers = min(len(items), numba.get_num_threads(), MAX_WORKERS)
    if workers <= 1:
        yield from map(fn, items)
        return
    with blas_threads_as(1), ThreadPoolExecutor(workers) as pool:
        pending = [pool.submit(fn, i) for i in items[:workers]]
        for i in items[workers:] + [None] * workers:
            done = pending.pop(0).result()
            if i is not None:
                pending.append(pool.submit(fn, i))
            yield done
