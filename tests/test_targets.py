"""The int8 dot of every instruction set gives the same bits (kernels/int8_dot.py).

Each int8-activation kernel and a tiny model's logits (prefill, fused decode, batched step; int4,
int8 and q6 rows, a q6 head) are computed in two subprocesses (tests/target_probe.py): one compiled
for this machine (AVX512-VNNI here) and one for .ci/run's AVX2 target (Haswell: `vpmaddubsw` +
`vpmaddwd`, no AVX-512), each with its own Numba cache. Their results must be equal bit for bit.

AVX-VNNI (256-bit `vpdpbusd`, Alder Lake on) is compiled for but not run: this machine (Zen 4) lacks
it. Its test reads the assembly of the decode row kernel: `vpdpbusd` on ymm registers, no zmm.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numba.core.codegen import get_host_cpu_features

PROBE = Path(__file__).parent / "target_probe.py"
# .ci/run's AVX2 target (and tools/bench_vs_llamacpp.AVX2_NUMBA_ENV): keep the three in step
HASWELL = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fsgsbase,+lzcnt,+mmx,+movbe,+popcnt,+sse,+sse2,"
           "+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,-avx512f,-avx512vnni,-avx512bw,-avx512dq,-avx512vl,-avx512cd,-avxvnni")
ALDERLAKE_AVXVNNI = HASWELL.replace("-avxvnni", "+avxvnni")
TARGETS = {"host": None, "haswell": ("haswell", HASWELL), "alderlake": ("alderlake", ALDERLAKE_AVXVNNI)}
HOST_FEATURES = get_host_cpu_features().split(",")
NEEDS_AVX2 = pytest.mark.skipif("+avx2" not in HOST_FEATURES,
                                reason="not an x86-64 CPU with AVX2: no AVX2 target to run or compile for")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """Numba caches per target: under the session's NUMBA_CACHE_DIR when set (reused between runs),
    else fresh."""
    base = os.environ.get("NUMBA_CACHE_DIR")
    return Path(base) / "targets" if base else tmp_path_factory.mktemp("numba-targets")


def probe(target, out, scratch, cache_root, mode="run"):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU_")}
    if TARGETS[target]:
        env["NUMBA_CPU_NAME"], env["NUMBA_CPU_FEATURES"] = TARGETS[target]
    env.update(NUMBA_CACHE_DIR=str(cache_root / target), NUMBA_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join(sys.path))
    scratch.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, str(PROBE), str(out), str(scratch), mode], env=env,
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]


@NEEDS_AVX2
def test_avx2_target_gives_the_hosts_bits(tmp_path, cache_root):
    got = {}
    for target in ("host", "haswell"):
        probe(target, tmp_path / f"{target}.npz", tmp_path / target, cache_root)
        got[target] = dict(np.load(tmp_path / f"{target}.npz"))
    host, hsw = got["host"], got["haswell"]
    assert str(hsw.pop("isa")) == "avx2"
    assert str(host.pop("isa")) in ("avx512vnni", "avxvnni", "avx2")
    assert sorted(host) == sorted(hsw) and len(host) == 21
    for name in host:
        assert host[name].dtype == np.float32 and np.isfinite(host[name]).all(), name
        assert np.array_equal(host[name], hsw[name]), (name, float(np.abs(host[name] - hsw[name]).max()))
    assert np.abs(host["model/decode"]).max() > 0


@NEEDS_AVX2
def test_avxvnni_target_uses_256_bit_vpdpbusd(tmp_path, cache_root):
    """Compiled only: the instructions are read, not executed."""
    probe("alderlake", tmp_path / "avxvnni.s", tmp_path / "alderlake", cache_root, "asm")
    text = (tmp_path / "avxvnni.s").read_text()
    dots = [line for line in text.splitlines() if "vpdpbusd" in line]
    assert dots and all("ymm" in line for line in dots)
    assert "zmm" not in text and "vpmaddubsw" not in text


@NEEDS_AVX2
def test_avx2_target_uses_vpmaddubsw(tmp_path, cache_root):
    probe("haswell", tmp_path / "avx2.s", tmp_path / "haswell", cache_root, "asm")
    text = (tmp_path / "avx2.s").read_text()
    assert "vpmaddubsw" in text and "vpmaddwd" in text
    assert "vpdpbusd" not in text and "zmm" not in text
