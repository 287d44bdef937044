#!/usr/bin/env bash
# The GPU check in one run, on a machine with a CUDA GPU and PyTorch, Triton and transformers
# installed (nothing is downloaded; the package is read from src/): the Triton kernels compiled
# for the GPU against the references (tests/ops/test_triton.py), the GPU tests (pytest -m gpu:
# transformers on the same GPU, prefill + steps == forward, a GPU state continued on the CPU),
# then benchmarks/gpu_bench.py. Results and logs go to $OUT (default: gpu-check/).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
python3 -c 'import json, torch, triton, transformers; print(json.dumps({"gpu": torch.cuda.get_device_name(),
  "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__}))' \
  | tee "$out/environment.json"
timeout 240 python3 -m pytest -q -p no:cacheprovider -x tests/ops/test_triton.py tests/test_gpu.py \
  2>&1 | tee "$out/gpu_tests.log"
tests=$?
timeout 300 python3 benchmarks/gpu_bench.py > "$out/gpu_bench.json" 2> "$out/gpu_bench.log"
bench=$?
tail -n 20 "$out/gpu_bench.log"
echo "gpu_check: tests exit $tests, benchmark exit $bench"
exit $(( tests != 0 || bench != 0 ))
