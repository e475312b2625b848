#!/usr/bin/env bash
# One command for a GPU machine: every GPU measurement of the project, each step under its own time
# limit, into OUTDIR (JSON per step, summary.json, summary.md). Runs from a plain checkout with
# whatever torch/triton/transformers the machine has (no pip install needed: PYTHONPATH=checkout).
# On a machine without CUDA it runs the CPU-safe parts, says what it skipped, and exits 0.
#
#   bash tools/gpu_check.sh OUTDIR          # ~6 minutes on an H200
set -uo pipefail
OUT=${1:?usage: tools/gpu_check.sh OUTDIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$ROOT"
: > "$OUT/steps.tsv"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, record the outcome
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -eq 124 ] && status=timeout
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="failed (exit $rc)"
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$OUT/steps.tsv"
  echo "   $status in $((SECONDS - start)) s; log: $OUT/$name.log"
  [ "$status" = ok ] || tail -5 "$OUT/$name.log" | sed 's/^/   | /'
}

step env 60 "$PY" -c "
import json, platform, torch
info = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.cuda.is_available()}
for mod in ('triton', 'transformers', 'accelerate', 'peft'):
    try:
        info[mod] = __import__(mod).__version__
    except ImportError:
        info[mod] = None
if info['cuda']:
    info['gpu'] = torch.cuda.get_device_name(0)
json.dump(info, open('$OUT/env.json', 'w'), indent=2)
print(info)"
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

# CPU-safe parts (CI runs these): a random model of a real shape, the host cost of a norm call.
step make_model_small 120 "$PY" tools/make_model.py --shape smollm2-135m --layers 2 --dtype float32 \
    --out "$OUT/models/smollm2-135m-2l"
step kernel_overhead 120 "$PY" tools/bench_kernels.py --overhead --calls 500 --json "$OUT/overhead.json"

if [ "$HAS_CUDA" = 1 ]; then
  step kernel_tests 240 "$PY" -m pytest -q -p no:cacheprovider -m interpret tests/test_kernels.py
  step cuda_tests 300 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
  step bench_kernels 300 "$PY" tools/bench_kernels.py --rows 1,2048,8192 --dtypes bfloat16,float16 \
      --json "$OUT/kernels.json" --plot "$OUT/kernels.png"
  step make_model_1b 180 "$PY" tools/make_model.py --shape llama-1b --dtype bfloat16 --out "$OUT/models/llama-1b"
  step bench_norm 240 "$PY" tools/bench_norm.py --quick --model "$OUT/models/llama-1b" --out "$OUT/bench_norm"
  step bench_generate 420 "$PY" tools/bench_generate.py --model "$OUT/models/llama-1b" --dtypes bfloat16 \
      --impls transformers,minillama,minillama-compiled,minillama-cudagraph,minillama-compiled-cudagraph \
      --json "$OUT/generate.json"
  step bench_quant 300 "$PY" tools/bench_quant.py --model "$OUT/models/llama-1b" --modes none,int8,int4-g64 \
      --windows 1 --seq 256 --repeats 2 --corpus README.md --out "$OUT/bench_quant"
  step bench_train 300 "$PY" tools/bench_train.py --model "$OUT/models/llama-1b" --precision bf16 --batch 4 --compile \
      --seq 1024 --json "$OUT/train.json"
  step fsdp_finetune 240 "$PY" -m accelerate.commands.launch --config_file configs/accelerate/fsdp-gpu.yaml \
      --num_processes 1 tools/finetune.py --config configs/finetune/tiny.yaml --max-steps 20 --no-progress \
      --out "$OUT/fsdp-tiny"
else
  echo "CUDA is not available here: skipped kernel_tests, cuda_tests, bench_kernels, make_model_1b, bench_norm," \
       "bench_generate, bench_quant, bench_train, fsdp_finetune (they need a GPU)"
  printf 'gpu_steps\tskipped (no CUDA)\t0\n' >> "$OUT/steps.tsv"
fi

# One JSON with every figure, one markdown summary.
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {"steps": [dict(zip(("step", "status", "seconds"), line.split("\t")))
                     for line in (out / "steps.tsv").read_text().splitlines()]}
for name in ("env", "overhead", "kernels", "generate", "train"):
    f = out / f"{name}.json"
    if f.is_file():
        summary[name] = json.loads(f.read_text())
norm = out / "bench_norm" / "results.json"
if norm.is_file():
    summary["bench_norm"] = json.loads(norm.read_text())
(out / "summary.json").write_text(json.dumps(summary, indent=2))
lines = ["| step | status | s |", "|---|---|---|"] + [f"| {s['step']} | {s['status']} | {s['seconds']} |"
                                                     for s in summary["steps"]]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "wrote $OUT/summary.json and $OUT/summary.md"
exit 0
