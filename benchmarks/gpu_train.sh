#!/usr/bin/env bash
# The default model's next training run on a CUDA GPU, in one call of under 10 minutes: it goes
# on from the bundled model (src/mambastep/assets/default) on the Python source the machine has
# (its standard library, and torch, transformers and ray where installed; the held-out split is
# the same rule on the same relative paths), with bfloat16 autocast and `--compile`. A
# calibration run of 30 steps measures the tokens per second first, and the real run takes as
# many steps as fit in $BUDGET_S seconds (default 300). Nothing is downloaded: the package is
# read from src/. The model (float32, with the tokenizer), its log and curve are packed into
# $OUT/gpu-train.tar, cut in parts of 15 MiB (gpu-train.tar.part-aa, ...), beside the runs'
# output (calibration.log, run.log, run.json; $OUT defaults to gpu-train/). Afterwards, on the
# CPU machine:
#   cat gpu-train.tar.part-* | tar xf - -C DIR && python benchmarks/default_quality.py --model DIR/model
# then round it to bfloat16 to ship it, as docs/default-model.md does.
# DEVICE=cpu BATCH=16 BUDGET_S=30 runs the same steps on the CPU (a check of the script).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-train}"
work="$(mktemp -d)"
device="${DEVICE:-cuda}"
budget="${BUDGET_S:-300}"
batch="${BATCH:-64}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'EOF'
import importlib.util, sys
missing = [m for m in ("torch", "safetensors", "tokenizers", "numpy", "tqdm", "matplotlib", "psutil")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_train: install {', '.join(missing)} first (mambastep's own dependencies)")
EOF
stdlib="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
site="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
paths=("$stdlib")
for lib in torch transformers ray; do
  if [ -d "$site/$lib" ]; then paths+=("$site/$lib"); fi
done
common=(--include '*.py' --exclude 'site-packages/*' --exclude '*_pb2*.py' --exclude 'thirdparty_files/*'
  --skip-binary --init src/mambastep/assets/default --window-seed 9 --window-starts lines
  --batch-size "$batch" --seq-len 512 --lr 4e-4 --precision bf16 --device "$device" --compile
  --no-progress)
python3 -m mambastep.cli train "${paths[@]}" "${common[@]}" --out "$work/calibration" --steps 30 \
  --warmup-steps 10 --eval-every 0 --checkpoint-every 0 --log-every 10 --eval-tokens 4096 \
  > "$out/calibration.log" 2>&1
read -r steps warmup < <(python3 - "$work/calibration/log.json" "$budget" "$batch" <<'EOF'
import json, sys
log, budget, batch = json.load(open(sys.argv[1])), float(sys.argv[2]), int(sys.argv[3])
rate = log["train"][-1]["tokens_per_s"]  # after the compile, at the last logged step
steps = max(20, int(budget * rate / (batch * 512)))
print(steps, min(100, steps // 5))
EOF
)
echo "gpu_train: $steps steps of $batch x 512 tokens on $device, $warmup of warm-up"
python3 -m mambastep.cli train "${paths[@]}" "${common[@]}" --out "$work/run" --steps "$steps" \
  --warmup-steps "$warmup" --eval-every 0 --eval-tokens 1000000 --checkpoint-every 0 --log-every 50 --json \
  > "$out/run.json" 2> "$out/run.log"
cat "$out/run.json"
tar cf - -C "$work/run" model log.json curve.png | split -b 15M - "$out/gpu-train.tar.part-"
rm -rf "$work"
ls -l "$out"
