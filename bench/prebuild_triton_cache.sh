#!/usr/bin/env bash
# Compile, here and without a GPU, every Triton kernel the GPU session's benchmarks launch
# (bench/gpu_session.sh: throughput, graphs, profile), for an H100 (sm_90), and pack Triton's
# cache for the device tool's `carry`:
#   PYTHON=/path/to/python bash bench/prebuild_triton_cache.sh      # -> .gpu-triton-cache.tar.xz
# bench/compile_model.py compiles each launch through the kernel's own `warmup` (Triton's JIT
# path), so the entries carry the keys the GPU machine's JIT looks up: gpu_session.sh unpacks
# the archive into its TRITON_CACHE_DIR, and the first fused calls load the kernels instead of
# compiling them (minutes of device time on a cold machine). The keys depend on the Triton
# build: PYTHON must have the GPU image's Triton (3.6.0 from PyPI there); with any other
# build the archive is simply not used (gpu_session.sh reports how many kernels it compiled).
# SIZES / FRAMES / DTYPES override what is compiled; ~3 minutes on 2 cores for the default.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
dir=$(mktemp -d)
tmp=$(mktemp .gpu-triton-cache.XXXXXX)
trap 'rm -rf "$dir" "$tmp"' EXIT
echo "triton $("$py" -c 'import triton; print(triton.__version__)') -> .gpu-triton-cache.tar.xz"
for dtype in ${DTYPES:-float32 float16}; do
  for size in ${SIZES:-512x288@1 1920x1080@0.25 3840x2160@0.125}; do
    for frames in ${FRAMES:-1 8}; do
      printf '%s %s T=%s: ' "$dtype" "$size" "$frames"
      # (no TRITON_* variables that Triton counts in its cache keys: the GPU machine has none)
      env -u TRITON_INTERPRET -u TRITON_DEFAULT_FP_FUSION TRITON_CACHE_DIR="$dir" \
        "$py" bench/compile_model.py --size "$size" --frames "$frames" --dtype "$dtype" | tail -1
    done
  done
done
tar cJf "$tmp" -C "$dir" .
chmod 644 "$tmp"
mv "$tmp" .gpu-triton-cache.tar.xz  # written whole, then renamed
echo "$(ls "$dir" | wc -l) kernels, $(du -h .gpu-triton-cache.tar.xz | cut -f1)"
