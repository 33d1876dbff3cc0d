#!/usr/bin/env bash
# GPU checks of the C++/CUDA extension topv._C (run on the H100 from the repo root): build,
# tests, CMake + ctest, compute-sanitizer memcheck, ncu metrics of the cost GEMM and the ptxas
# resource usage of the main kernels (timings: bench/bench_prune.py). bench/gpu.sh runs the
# sections it does not cover itself. Writes logs to $OUT when set. Sections can be skipped with
# TOPV_SKIP="build tests cmake sanitizer ncu ptxas".
set -uo pipefail
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
OUT=${OUT:-$(mktemp -d)}
SKIP=${TOPV_SKIP:-}
skip() { [[ " $SKIP " == *" $1 "* ]]; }
section() { echo; echo "=== $1 ($(date +%T))"; }

if ! skip build; then
  section build
  # `python -m pip`: a bare `pip` may belong to another interpreter (one without torch, which
  # then installs topv without the extension).
  if ! python -m pip install -v --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
    grep -E "error|Error" "$OUT/build.log" | head -30; tail -20 "$OUT/build.log"; exit 1
  fi
  grep "\[topv setup\]" "$OUT/build.log"
  python -c "import topv, torch; from topv import _ext; print('backends on cuda:', topv.available_backends('cuda'), 'torch', torch.__version__, '_C error:', _ext.load_error())"
fi

if ! skip tests; then
  section "pytest tests/test_native.py (+ the cuda/cpp cases of the op suites)"
  # -v prints each test id before running it, so a crash names its test; the rest then runs
  # again without it.
  deselect=()
  for attempt in 1 2 3; do
    python -m pytest -v -p no:cacheprovider tests/test_native.py "${deselect[@]}" >"$OUT/native_$attempt.log" 2>&1
    rc=$?
    grep -E "(FAILED|ERROR)( |$)|passed|failed" "$OUT/native_$attempt.log" | grep -v "^tests.*PASSED" | tail -12
    if [ $rc -lt 128 ] && ! grep -q "Fatal Python error" "$OUT/native_$attempt.log"; then break; fi
    crashed=$(grep -oE "^tests/test_native.py::[^ ]+" "$OUT/native_$attempt.log" | tail -1)
    echo "CRASH (rc=$rc) in $crashed:"; grep -E "Fatal Python error|File .*topv|File .*tests/" "$OUT/native_$attempt.log" | head -12
    deselect+=(--deselect "$crashed")
  done
  python -m pytest -q tests/test_prune.py tests/test_sinkhorn.py tests/test_cost_matrix.py tests/test_ops.py \
    -k "cuda-cuda or cpp-cpu" 2>&1 | tail -6
fi

if ! skip cmake; then
  section "cmake + ctest"
  TP=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
  TT=${TOPV_CMAKE_TORCH:-ON}  # OFF: kernels library + smoke test only (faster)
  if cmake -S . -B build-cmake -DCMAKE_CUDA_ARCHITECTURES=90a -DCMAKE_PREFIX_PATH="$TP" -DTOPV_BUILD_TORCH="$TT" >"$OUT/cmake.log" 2>&1 \
     || cmake -S . -B build-cmake -DCMAKE_CUDA_ARCHITECTURES=90a -DTOPV_BUILD_TORCH=OFF >>"$OUT/cmake.log" 2>&1; then
    grep "topv:" "$OUT/cmake.log"
    cmake --build build-cmake -j 16 >>"$OUT/cmake.log" 2>&1 || { tail -20 "$OUT/cmake.log"; }
    ctest --test-dir build-cmake --output-on-failure >"$OUT/ctest.log" 2>&1
    grep -E "tests passed|Failed|FAILED|\*\*\*" "$OUT/ctest.log" | head -20
  else
    tail -15 "$OUT/cmake.log"
  fi
fi

if ! skip sanitizer; then
  section "compute-sanitizer memcheck"
  if [ -x build-cmake/topv_smoke ]; then
    compute-sanitizer --tool memcheck --leak-check no build-cmake/topv_smoke 2>&1 | tail -4
  fi
  cat >"$OUT/memcheck_case.py" <<'PY'
import torch, topv
g = torch.Generator().manual_seed(0)
for dt in (torch.float32, torch.bfloat16):
    for lens, keep in (([7], [3]), ([577, 1, 40], [100, 1, 9])):
        T = sum(lens)
        s = torch.randn(T, 72, generator=g).to(dt).cuda(); t = torch.randn(T, 72, generator=g).to(dt).cuda()
        p = torch.rand(T, 2, generator=g).cuda()
        topv.prune(s, t, p, keep, seg_lens=lens, backend="cuda", tol=1e-3, n_iters=5)
        topv.prune(s[:, :37], t[:, :37], p, keep, seg_lens=lens, backend="cuda")
# B = 1 LLaVA shape: split-K GEMM + reduction, bulk-copied slabs, the on-chip kernel's selection.
s = torch.randn(1, 576, 4096, generator=g).bfloat16().cuda()
topv.prune(s, s, topv.grid_positions(24, 24, device="cuda"), 144, backend="cuda", check_finite=False)
C = torch.rand(2, 33, 45).cuda()
topv.sinkhorn(C, backend="cuda", tol=1e-3)
# Costs that send rows and columns to the exact (max-first) path of the on-chip kernel.
topv.sinkhorn(torch.rand(2, 45, 70).cuda() * 2, backend="cuda", eps=0.003, n_iters=5)
topv.sinkhorn(torch.rand(2, 45, 70).cuda() * 4 - 8, backend="cuda", eps=0.05, n_iters=5)
topv.cost_matrix(torch.randn(2, 5, 24).cuda(), torch.randn(2, 6, 24).cuda(), torch.rand(5, 2).cuda(), torch.rand(6, 2).cuda(), backend="cuda")
torch.cuda.synchronize(); print("memcheck case done")
PY
  if [ "${TOPV_SANITIZE_PYTHON:-1}" = 1 ]; then
    timeout "${TOPV_SANITIZE_TIMEOUT:-240}" compute-sanitizer --tool memcheck --leak-check no python "$OUT/memcheck_case.py" 2>&1 | tail -4
  fi
fi

if ! skip ncu; then
  section "ncu (--clock-control none): prune's kernels at B=1 and B=16, n=576, d=4096, bf16"
  cat >"$OUT/ncu_case.py" <<'PY'
import torch, topv
for B in (1, 16):
    s = torch.randn(B, 576, 4096, device="cuda", dtype=torch.bfloat16); p = topv.grid_positions(24, 24, device="cuda")
    topv.prune(s, s, p, 144, backend="cuda", check_finite=False)
torch.cuda.synchronize()
PY
  m=sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed
  m=$m,dram__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum
  m=$m,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio
  m=$m,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio
  m=$m,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,gpu__time_duration.sum
  timeout 120 ncu --clock-control none --kernel-name regex:"cost_gemm|cost_reduce|sinkhorn_cluster" --metrics "$m" python "$OUT/ncu_case.py" 2>&1 \
    | grep -E "cost_gemm|cost_reduce|sinkhorn_cluster|^\s+(sm__|dram__|l1tex__|smsp__|gpu__)" | sed -E "s/ +/ /g" | cut -c1-140 | head -60
fi

if ! skip ptxas; then
  section "ptxas resource usage (sm_90a, the wgmma kernels included)"
  nvcc -std=c++17 -O3 --use_fast_math -arch=sm_90a -DTOPV_HAS_SM90A=1 -Icsrc/include -Xptxas -v -c csrc/topv_api.cu -o /dev/null 2>&1 \
    | grep -E "Compiling entry|registers|spill" | paste - - - \
    | sed -E "s/.*entry function '([^']*)'.* ([0-9]+) bytes spill stores.*Used ([0-9]+) registers[^0-9]*([0-9]+ barriers)?(, ([0-9]+) bytes smem)?.*/\1 regs=\3 spill_stores=\2 smem=\6/" \
    | while read -r name rest; do echo "$(echo "$name" | c++filt | sed -E 's/topv::detail:://g; s/\(.*//') $rest"; done
fi
