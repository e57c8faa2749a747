"""Many independent jobs (models × data sets, a sweep of quantization settings) on a Dask cluster.

`--cluster ADDRESS` (eval, quantize --sweep; check's jobs are in app/check.py) sends one job per combination to the Dask
scheduler at ADDRESS with `Client.submit` and collects the results in order. The jobs are
module-level functions of this file, so a worker needs minilm_edge installed and the same paths
(model folders, data files) visible, as on a shared file system. Results come back to the machine
that asked: only it writes the check history (its own store), so the SQLite files are never
written from several machines.

Dask is an optional dependency (the `cluster` extra) and is imported only inside `connect`: nothing
of Dask is loaded by a command run without --cluster (tested).
"""
from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

from ..errors import MiniLMError, UsageError

CONNECT_TIMEOUT = "10s"


def connect(address: str):
    """A dask.distributed Client for the scheduler at `address`; one clear error if it cannot be had."""
    try:
        from dask.distributed import Client
    except ImportError:
        raise UsageError("--cluster needs Dask: pip install 'minilm_edge[cluster]'") from None
    try:
        return Client(address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as e:
        raise MiniLMError(f"cannot reach the Dask scheduler at {address}: {e}") from None


def run_jobs(address: str, fn, jobs: list[tuple], label: str) -> list:
    """fn(*job) for every job on the cluster; results in the order of `jobs`. A job that raised has its
    exception as its result (the others still finish). Progress with ETA on stderr."""
    client = connect(address)
    try:
        futures = [client.submit(fn, *job, pure=False) for job in jobs]
        index = {f.key: i for i, f in enumerate(futures)}
        results = [None] * len(jobs)
        from dask.distributed import as_completed
        t0 = time.perf_counter()
        for done, fut in enumerate(as_completed(futures), 1):
            try:
                results[index[fut.key]] = fut.result()
            except Exception as e:          # noqa: BLE001 - reported per job, the others go on
                results[index[fut.key]] = e
            eta = (time.perf_counter() - t0) / done * (len(jobs) - done)
            print(f"{label}: {done}/{len(jobs)} jobs done, ETA {eta:.0f} s", file=sys.stderr)
        return results
    finally:
        client.close()


def fail_line(job, err) -> str:
    return f"job {job}: {type(err).__name__}: {err}"


# ---- eval: models × data files


def eval_job(model_path, data_path, ctx, max_tokens, int8_activations) -> dict:
    from ..runtime.evaluate import perplexity, read_text
    from ..runtime.model import load
    res = perplexity(load(model_path, int8_activations=int8_activations), read_text(data_path), ctx=ctx,
                     max_tokens=max_tokens, progress=False)
    return {"model": str(model_path), "data": str(data_path), **res}


def eval_jobs(model_paths, data_paths, address, *, ctx, max_tokens, int8_activations=True) -> list[dict]:
    for d in data_paths:
        if not Path(d).is_file():
            raise UsageError(f"data file not found: {d}")
    jobs = [(str(m), str(Path(d).resolve()), ctx, max_tokens, int8_activations)
            for m, d in itertools.product(model_paths, data_paths)]
    out = []
    for job, res in zip(jobs, run_jobs(address, eval_job, jobs, "eval")):
        out.append({"model": job[0], "data": job[1], "error": fail_line(job[:2], res)}
                   if isinstance(res, Exception) else res)
    return out


# ---- quantize: a sweep of settings

SWEEP_KEYS = {"method": str, "bits": int, "group_size": int, "quantize_head": str, "keep_salient": float, "seed": int}


def parse_sweep(items: list[str]) -> list[dict]:
    """["bits=3,4", "method=rtn,awq"] -> every combination as quantize() keyword arguments."""
    axes = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in SWEEP_KEYS or not values.strip():
            raise UsageError(f"--sweep {item!r}: use KEY=V1,V2 with KEY one of {', '.join(SWEEP_KEYS)}")
        try:
            axes[key] = [SWEEP_KEYS[key](v.strip()) for v in values.split(",")]
        except ValueError:
            raise UsageError(f"--sweep {item!r}: {key} takes {SWEEP_KEYS[key].__name__} values") from None
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def sweep_name(settings: dict) -> str:
    """The folder of one combination: {"bits": 3, "method": "rtn"} -> "bits=3,method=rtn"."""
    return ",".join(f"{k}={v}" for k, v in settings.items())


def quantize_job(src, out_dir, base_kw, settings) -> str:
    from ..quant.quantize import quantize
    return str(quantize(src, out_dir, progress=False, **{**base_kw, **settings}))


def quantize_sweep(src, out_root, base_kw: dict, sweep: list[str], address: str | None) -> list[str]:
    """One quantized folder per combination, OUT_ROOT/<setting names>; on the cluster if `address`."""
    combos = parse_sweep(sweep)
    out_root = Path(out_root)
    if out_root.exists() and any(out_root.iterdir()):
        raise UsageError(f"{out_root} exists and is not empty; a sweep writes one folder per setting into it")
    out_root.mkdir(parents=True, exist_ok=True)
    jobs = [(str(src), str((out_root / sweep_name(c)).resolve()), base_kw, c) for c in combos]
    if address is None:
        results = []
        for i, job in enumerate(jobs, 1):
            print(f"sweep {i}/{len(jobs)}: {job[3]}", file=sys.stderr)
            results.append(quantize_job(*job))
        return results
    results = run_jobs(address, quantize_job, jobs, "quantize")
    failed = [fail_line(j[3], r) for j, r in zip(jobs, results) if isinstance(r, Exception)]
    if failed:
        raise MiniLMError(f"{len(failed)} of {len(jobs)} sweep jobs failed; first: {failed[0]}")
    return results
