#!/usr/bin/env bash
# Compile, here and without a GPU, every Triton kernel that the GPU session's steps launch
# (bench/gpu_session.sh: throughput, graphs, profile, kernels, sparse, tests), for an H100 or H200
# (sm_90), and pack Triton's cache for the device tool's `carry` (PYTHON needs torch, triton,
# pytest and, for triton 3.6's interpreter, numpy < 2.3):
#   PYTHON=/path/to/python bash bench/prebuild_triton_cache.sh      # -> .gpu-triton-cache.tar.xz
# Such a PYTHON on the CPU machine (torch's CPU build does not pin a Triton):
#   python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install torch==2.13.0 triton==3.6.0 pytest \
#     pytest-benchmark 'numpy<2.3' && /tmp/t36/bin/pip install --no-deps -e .
# bench/compile_model.py compiles each launch through the kernel's own `warmup` (Triton's JIT
# path) and records each key's parts; gpu_session.sh unpacks the archive into its
# TRITON_CACHE_DIR with bench/triton_cache_archive.py, which renames the entries to the keys
# that the GPU machine's Triton build looks up, and the first fused calls load the kernels
# instead of compiling them (minutes of device time on a cold machine). PYTHON must have the
# GPU image's Triton release (3.6.0); a build of it for another Python version is fine (only
# its library's hash differs: the archive is rekeyed there). With another release the archive
# is not used (gpu_session.sh prints how many prebuilt kernels it could use).
# SIZES / FRAMES / DTYPES override what the model's part compiles; TESTS=0 leaves the tests'
# kernels out (bench/prebuild_test_kernels.py: they run in Triton's interpreter too, to reach
# all their launches). About 7 minutes on 2 cores for the model and benchmarks, then ~20 for
# the tests (472 specialisations): start it early.
set -euo pipefail
cd "$(dirname "$0")/.."
# the test files of gpu_session.sh's tests step (GPU_TESTS=... to compile fewer)
GPU_TESTS=${GPU_TESTS:-$(sed -n 's/^GPU_TESTS="\(.*\)"$/\1/p' bench/gpu_session.sh)}
py=${PYTHON:-python}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
# Every compile into $dir, with no TRITON_* variable that Triton counts in its cache keys (the GPU
# machine has none) and the interpreter off.
compile_env=(env -u TRITON_INTERPRET -u TRITON_DEFAULT_FP_FUSION TRITON_CACHE_DIR="$dir")
echo "triton $("$py" -c 'import triton; print(triton.__version__)') -> .gpu-triton-cache.tar.xz"
for dtype in ${DTYPES:-float32 float16}; do
  for size in ${SIZES:-512x288@1 1920x1080@0.25 3840x2160@0.125}; do
    for frames in ${FRAMES:-1 8}; do
      printf '%s %s T=%s: ' "$dtype" "$size" "$frames"
      "${compile_env[@]}" "$py" bench/compile_model.py --size "$size" --frames "$frames" --dtype "$dtype" | tail -1
    done
  done
done
printf 'tests/test_cuda_graph.py (its fused model, CUDA only): '
"${compile_env[@]}" "$py" bench/compile_model.py --size 512x288@0.5 --frames 1 --dtype float32 | tail -1
printf 'bench/kernels.py (packed-dot, masked units): '
"${compile_env[@]}" "$py" bench/compile_model.py --bench-kernels | tail -1
sparse_densities=$(sed -n 's/^SPARSE_DENSITIES="\(.*\)"$/\1/p' bench/gpu_session.sh)
[ -n "$sparse_densities" ] || { echo "no SPARSE_DENSITIES=\"...\" line in bench/gpu_session.sh" >&2; exit 1; }
printf 'bench/sparse.py --densities %s: ' "$sparse_densities"
"${compile_env[@]}" "$py" bench/compile_model.py --bench-sparse "$sparse_densities" | tail -1
if [ "${TESTS:-1}" != 0 ]; then
  printf 'GPU tests (gpu_session.sh tests): '
  "${compile_env[@]}" BIMATTING_TEST_CUDA=1 PYTHONPATH=bench "$py" -m pytest -q -p no:cacheprovider -p no:warnings -p prebuild_test_kernels $GPU_TESTS 2>&1 \
    | grep -E "^prebuild_test_kernels|passed|failed" || true
fi
"$py" bench/triton_cache_archive.py pack "$dir" .gpu-triton-cache.tar.xz  # (written whole, then renamed)
du -h .gpu-triton-cache.tar.xz
