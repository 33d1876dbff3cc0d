#!/usr/bin/env bash
# One GPU session in one command: build the extension against the machine's torch, run the whole
# test suite (CUDA tests included), the CUDA sanitizer, and the benchmarks; logs and results go
# to $OUT (or bench/results/gpu-latest when OUT is unset).
#
#   bash bench/gpu.sh [tests] [native] [kernels] [cpu] [e2e]   (no argument: all of them; all of them
#   take well over 10 minutes, so split them across calls when a call is capped at 10)
#
# POT is not installed on the GPU machine: carry its wheel in .whl/ (see README) for the Sinkhorn
# benchmark's POT column.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
steps=${*:-tests native kernels cpu e2e}
status=0

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
# On the H100 machine the environment's compiler (CXX=/opt/gcc/bin/g++, a wrapper) builds an
# extension in which a failing TORCH_CHECK kills the process (SIGSEGV) instead of raising; the
# system g++ of the same version builds one that raises. Use it where it exists (TOPV_CXX overrides).
if [ -n "${TOPV_CXX:-}" ]; then export CXX=$TOPV_CXX; elif [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
    # Keep the Python and Triton paths testable even when the extension does not build.
    echo "EXTENSION BUILD FAILED (log: build.log); installing without topv._C"; grep -m5 -E "error" "$OUT/build.log"
    status=1
    TOPV_BUILD_EXT=0 python3 -m pip install --no-build-isolation --no-deps -e . >>"$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
fi
echo "build: $(( $(date +%s) - start )) s; backends on cuda: $(python3 -c 'import topv; print(topv.available_backends("cuda"))')"

for step in $steps; do
    t0=$(date +%s)
    case $step in
    tests)
        python3 -m pytest -q -p no:cacheprovider ${TOPV_TESTS:-tests} >"$OUT/tests.log" 2>&1 || status=1
        grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20; tail -2 "$OUT/tests.log" ;;
    native)
        # CMake library + ctest smoke test, compute-sanitizer memcheck, ptxas resource usage.
        TOPV_CMAKE_TORCH=OFF TOPV_SKIP="build tests ncu" OUT="$OUT" bash bench/gpu_native.sh 2>&1 | tee "$OUT/native.log" | tail -25 ;;
    kernels)
        # Rows are appended under $OUT/results/<device>/ (copy them into bench/results).
        python3 bench/bench_prune.py --out "$OUT/results" >"$OUT/bench_prune.log" 2>&1 || status=1
        python3 bench/bench_sinkhorn.py --out "$OUT/results" >"$OUT/bench_sinkhorn.log" 2>&1 || status=1
        grep -v "^#" "$OUT/bench_prune.log" | tail -60 ;;
    cpu)
        # The C++ CPU kernels against the eager reference on this machine's host CPU.
        python3 bench/bench_cpu.py --rounds 20 --out "$OUT/results" >"$OUT/bench_cpu.log" 2>&1 || status=1
        tail -n 24 "$OUT/bench_cpu.log" ;;
    e2e)
        python3 bench/bench_e2e.py --out "$OUT/results" >"$OUT/e2e.log" 2>&1 || status=1
        tail -40 "$OUT/e2e.log" ;;
    *) echo "unknown step $step"; status=1 ;;
    esac
    echo "== $step: $(( $(date +%s) - t0 )) s"
done
exit $status
