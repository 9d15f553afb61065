#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one call (see the device tool):
#   bash bench/gpu_session.sh [STEP ...]   # outputs under $OUT (or ./gpu-results)
# STEPs (default: all, most wanted first): throughput graphs kernels tests throughput_all profile
# sparse host.
# A session's device time (15 minutes, the machine's start included) allows one call of at
# most 10 minutes: every step has its own time limit and the whole script keeps inside BUDGET_S
# seconds (default 540), skipping what no longer fits, so the call always returns what was
# measured (each step's log under $OUT). With the kernels prebuilt (prebuild_triton_cache.sh,
# carried as .gpu-triton-cache.tar.xz) the fused steps start at once; without, their first
# calls compile for minutes and the later steps are skipped.
# The GPU image has torch + triton but no PyAV, so the package is installed without its
# dependencies and only the GPU-relevant tests run. Record the figures in bench/RESULTS.md
# with the device name and date.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}  # the GPU image's python3 holds torch and triton
# The golden data: ../shared does not travel to the device machine; carry a copy as
# .gpu-shared/reference (cp -r ../shared/reference .gpu-shared/, carry=[".gpu-shared"]).
[ -d .gpu-shared/reference ] && export BIMATTING_REFERENCE_DIR="$PWD/.gpu-shared/reference"
# Compiled kernels are shared by the steps' processes (the first fused step compiles them),
# and prebuilt ones are used where they match (bench/prebuild_triton_cache.sh; carry the archive).
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache}"
mkdir -p "$TRITON_CACHE_DIR"
# (renamed to this Triton build's keys, with the file lists pointed at this cache directory)
[ -f .gpu-triton-cache.tar.xz ] && "$py" bench/triton_cache_archive.py unpack .gpu-triton-cache.tar.xz \
  "$TRITON_CACHE_DIR" > "$out/prebuilt.log" 2>&1
cached() { ls "$TRITON_CACHE_DIR" | wc -l; }
# (prebuild_triton_cache.sh compiles what these launch beforehand)
GPU_TESTS="tests/kernels tests/test_fuse.py tests/test_fuse_decoder.py tests/test_golden.py tests/test_packed.py tests/test_cuda_graph.py"
# The sparse step's mask densities (%; prebuild_triton_cache.sh compiles what they launch)
SPARSE_DENSITIES="0,10,50,100"
deadline=$(( $(date +%s) + ${BUDGET_S:-540} ))
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(throughput graphs kernels tests throughput_all profile sparse host)

# run STEP_LIMIT_S LOG CMD...: run with the smaller of its own limit and what is left.
run() {
  local limit=$1 log=$2; shift 2
  local left=$(( deadline - $(date +%s) ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then echo "skipped (time budget spent): $*" | tee -a "$out/$log"; return; fi
  local t0=$(date +%s)
  # SIGINT first: pytest then still prints its summary of failures.
  timeout -s INT -k 20 "$limit" "$@" >> "$out/$log" 2>&1
  local rc=$?
  echo "[$(( $(date +%s) - t0 )) s, rc=$rc, Triton cache $(cached) entries] $*"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$out/setup.log" 2>&1
echo "Triton cache: $(cached) entries before the first step (prebuilt ones included)" >> "$out/setup.log"
[ -f "$out/prebuilt.log" ] && cat "$out/prebuilt.log" >> "$out/setup.log"
cat "$out/setup.log"
"$py" -m pip install -q --no-deps --no-build-isolation -e . >> "$out/setup.log" 2>&1 \
  && (cd /tmp && "$py" -c "import bimatting_triton.kernels") >> "$out/setup.log" 2>&1 \
  || { cat "$out/setup.log"; exit 1; }

for step in "${steps[@]}"; do
  case $step in
    host)  # this machine's CPU: launches and host time per fused call (no GPU work; compare with RESULTS.md)
      run 60 host.txt "$py" bench/host_overhead.py
      cat "$out/host.txt" ;;
    tests)  # the CPU suite's kernel tests, compiled for the GPU (pytest-xdist and -timeout are in the image)
      run 110 tests.log env BIMATTING_TEST_CUDA=1 "$py" -m pytest -q -p no:cacheprovider -n 8 --timeout 100 \
        --tb=short -rfE \
        $GPU_TESTS
      grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | cut -c1-200 | tail -25 ;;
    kernels)  # packed conv (default tile) and masked units against cuDNN fp16; the autotuned and
      # popcount variants (not prebuilt: minutes of compiling) with KERNELS_K=...
      run 80 kernels.txt "$py" bench/kernels.py -- -k "${KERNELS_K:-not autotuned and not popcount}" --benchmark-json "$out/kernels.json"
      grep -A60 "^median µs per call" "$out/kernels.txt" | cut -c1-160 ;;
    throughput)  # SPEC §4's comparison first, in one run (the ratios need that): fused vs
      # float-simulated vs RVM fp16 at HD and 4K, T = 1 and 8 (throughput.py runs variant by variant)
      # With the golden weights when carried: on random frames their mask is nearly full (~0.95-1 of
      # the tiles active: the sparse units' worst case), where random weights' is nearly empty.
      weights=(); [ -f .gpu-shared/reference/bimatting_golden.pt ] && weights=(--checkpoint .gpu-shared/reference/bimatting_golden.pt)
      run 150 throughput.txt "$py" bench/throughput.py --sizes 1920x1080@0.25,3840x2160@0.125 \
        --variants bimatting-fused,bimatting-plain,rvm-fp16 "${weights[@]}"
      grep -v " ms/frame$" "$out/throughput.txt" | tail -30 ;;
    throughput_all)  # the default run: every variant and size; progress lines ("  variant
      # setting: ms/frame") reach the log as each measurement ends, even on a timeout
      run 240 throughput_all.txt "$py" bench/throughput.py
      grep -v " ms/frame$" "$out/throughput_all.txt" | tail -45 ;;
    graphs)  # T=1 streaming is launch-bound: CUDA-graph replays (CudaGraphStep), fused vs RVM fp16
      run 100 throughput_graphs.txt "$py" bench/throughput.py --cuda-graph --frames 1,8 \
        --variants bimatting-fused,bimatting-fused-fp16,rvm-fp16 --sizes 512x288@1,1920x1080@0.25
      grep -v " ms/frame$" "$out/throughput_graphs.txt" | tail -30 ;;
    profile)
      run 70 profile.txt "$py" bench/throughput.py --sizes 512x288@1 --frames 1 --variants bimatting-fused --profile
      grep -B2 -A40 "^\[bimatting-fused\] stage" "$out/profile.txt" | cut -c1-160 | head -45 ;;
    sparse)  # masked decoder units against their dense launches (rows reach the log as measured)
      run 90 sparse.txt "$py" bench/sparse.py --densities "$SPARSE_DENSITIES"
      grep -v "^  " "$out/sparse.txt" | tail -20 | cut -c1-160 ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "outputs: $(ls "$out")"
