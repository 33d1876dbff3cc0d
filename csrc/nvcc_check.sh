#!/usr/bin/env bash
# Compiles every framework-free CUDA source (no torch) with plain nvcc for sm_90 and for sm_90a with
# -DTOPV_HAS_SM90A (the wgmma cost GEMM): no GPU needed. Run by CI on CPU machines; exits non-zero
# on any compile error. Also compiles them with the half/bfloat16 macros that torch builds define,
# since the extension compiles the same headers so. TOPV_NVCC_ARCHS overrides the arch list.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
ARCHS=${TOPV_NVCC_ARCHS:-sm_90 sm_90a}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
torch_macros="-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__"
status=0
for arch in $ARCHS; do
  defs=""
  [ "$arch" = sm_90a ] && defs="-DTOPV_HAS_SM90A=1"
  for src in csrc/topv_api.cu csrc/tests/smoke.cu csrc/tests/gemm_check.cu; do
    for macros in "" "$torch_macros"; do
      # shellcheck disable=SC2086
      if ! "$NVCC" -std=c++17 -O2 --use_fast_math -arch="$arch" $defs -Icsrc/include $macros -c "$src" -o "$out/x.o"; then
        echo "nvcc_check: FAILED $src for $arch ${macros:+(torch macros)}" >&2
        status=1
      fi
    done
  done
  # Every header must compile on its own (no hidden include-order dependencies).
  for h in csrc/include/topv/*.cuh csrc/include/topv/*.h; do
    printf '#include "%s"\n' "${h#csrc/include/}" > "$out/one.cu"
    # shellcheck disable=SC2086
    if ! "$NVCC" -std=c++17 -arch="$arch" $defs -Icsrc/include -c "$out/one.cu" -o "$out/one.o"; then
      echo "nvcc_check: FAILED header $h for $arch" >&2
      status=1
    fi
  done
done
[ "$status" -eq 0 ] && echo "nvcc_check: all framework-free CUDA sources compile for $ARCHS"
exit "$status"
