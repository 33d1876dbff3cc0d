#!/usr/bin/env bash
# Compiles every framework-free CUDA source (no torch) with plain nvcc for sm_90: no GPU needed.
# Run by CI on CPU machines; exits non-zero on any compile error. Also compiles them once with the
# half/bfloat16 macros that torch builds define, since the extension compiles the same headers so.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
ARCH=${TOPV_NVCC_ARCH:-sm_90}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
torch_macros="-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__"
status=0
for src in csrc/topv_api.cu csrc/tests/smoke.cu; do
  for macros in "" "$torch_macros"; do
    # shellcheck disable=SC2086
    if ! "$NVCC" -std=c++17 -O2 --use_fast_math -arch="$ARCH" -Icsrc/include $macros -c "$src" -o "$out/x.o"; then
      echo "nvcc_check: FAILED $src ${macros:+(torch macros)}" >&2
      status=1
    fi
  done
done
# Every header must compile on its own (no hidden include-order dependencies).
for h in csrc/include/topv/*.cuh csrc/include/topv/*.h; do
  printf '#include "%s"\n' "${h#csrc/include/}" > "$out/one.cu"
  if ! "$NVCC" -std=c++17 -arch="$ARCH" -Icsrc/include -c "$out/one.cu" -o "$out/one.o"; then
    echo "nvcc_check: FAILED header $h" >&2
    status=1
  fi
done
[ "$status" -eq 0 ] && echo "nvcc_check: all framework-free CUDA sources compile for $ARCH"
exit "$status"
