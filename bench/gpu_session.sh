#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one call (see the device tool):
#   bash bench/gpu_session.sh            # writes its outputs under $OUT (or ./gpu-results)
# The GPU image has torch + triton but no PyAV, so the package is installed without its
# dependencies and only the GPU-relevant tests run. Record the figures in bench/RESULTS.md
# with the device name and date.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
{ nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$out/device.txt" 2>&1
pip install -q --no-deps -e . > "$out/install.log" 2>&1

# The same tests as on CPU, with the kernels compiled for the GPU.
BIMATTING_TEST_CUDA=1 python -m pytest -q -p no:cacheprovider \
  tests/kernels tests/test_fuse.py tests/test_fuse_decoder.py tests/test_golden.py tests/test_model.py \
  tests/test_packed.py > "$out/tests.log" 2>&1
echo "tests: $(tail -1 "$out/tests.log")"

python bench/throughput.py --json > "$out/throughput.json" 2> "$out/throughput.err"
python bench/throughput.py --sizes 1920x1080@0.25 --profile > "$out/throughput_profile.txt" 2>&1
python bench/sparse.py > "$out/sparse.txt" 2>&1
python bench/kernels.py -- --benchmark-json "$out/kernels.json" > "$out/kernels.txt" 2>&1
echo "done: $(ls "$out")"
