#!/usr/bin/env bash
# What a GPU session runs first: build for the local GPU, every test against the fp32 reference on
# the GPU, then the quick benchmark suite. Each stage fits one device call (10 min):
#
#   bash benchmarks/device_check.sh tests    # build + the whole pytest suite on CUDA (GPU tests included)
#   bash benchmarks/device_check.sh bench    # build + python benchmarks/run_all.py --quick
#
# Logs and results go to $OUT (the device tool's folder) or ./device_out. Mamba2 prefill kernels
# are enabled for the run (AHN_OPS_MAMBA2_KERNELS=1) so that the tests check them on the GPU.
# Peers that are pure Python (fla-core, einops) can travel as wheels in .whl/ (device README).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stage=${1:-tests}
out=${OUT:-device_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 AHN_OPS_MAMBA2_KERNELS=1
export AHN_OPS_CUDA_ARCHS=${AHN_OPS_CUDA_ARCHS:-90a}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
if ! python3 setup.py -q build_ext --inplace >"$out/build.log" 2>&1; then
  tail -30 "$out/build.log"
  exit 1
fi
case "$stage" in
  tests)
    timeout 540 python3 -m pytest -q -rs --durations=15 tests 2>&1 | tee "$out/tests.log" | tail -40
    ;;
  bench)
    timeout 540 python3 benchmarks/run_all.py --quick --out "$out" 2>&1 | tee "$out/bench.log" | tail -60
    ;;
  *)
    echo "usage: $0 tests|bench" >&2
    exit 2
    ;;
esac
