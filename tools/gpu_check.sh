#!/usr/bin/env bash
# One command for a GPU machine: the project's GPU checks and measurements, in order of value, under
# one global time budget, into OUTDIR (a log and JSON per step, summary.json, summary.md).
#
#   bash tools/gpu_check.sh [--budget SECONDS] OUTDIR    # default budget 540 s (a 9-minute command)
#   bash tools/gpu_check.sh --dry-run [--budget SECONDS] # the plan and what each step gets; runs nothing
#
# Budget: a deadline of start + budget - 15 s (kept for the last summary and a step's kill grace).
# Each step runs under min(its cap, the time left) and is skipped when less than its minimum is
# left; a step that finishes early leaves its time to the later ones. The first steps' caps add up
# to at most the budget (--dry-run shows which steps are sure to run and which only as time allows).
# summary.json and summary.md are rewritten before and after every step and by an exit trap (a
# stopped or interrupted run keeps its summary, the running step marked), and every bench writes
# its JSON as its rows finish, so a step stopped at its limit keeps the rows it measured.
#
# Runs from a plain checkout with whatever torch/triton/transformers the machine has (no pip
# install): the Python path gets a temporary directory holding only a link to minillama/ (whose
# __init__ finds kernels/ as minillama.kernels), never the checkout root, where kernels/ would be
# a top-level `kernels` package: transformers imports that name as Hugging Face's package when it
# finds one. pytest, accelerate and `-c` run as `python -P` for the same reason (no cwd on sys.path).
# Without CUDA it runs the CPU-safe parts, says what it skipped, and exits 0. docs/benchmarks.md
# ("GPU check") describes every step and how to read summary.md.
set -uo pipefail

GPU_CHECK_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESERVE=15  # seconds kept back from the budget: the final summary, a killed step's grace
GRACE=5     # a step still running GRACE s after its SIGTERM gets SIGKILL

# The plan, in order of value: "NAME CAP MIN WHERE WHAT". CAP: the most seconds the step may take;
# MIN: it is skipped when less is left; WHERE: gpu (with CUDA only), cpu (without CUDA only), any.
# The step runs the function step_NAME, its output in OUTDIR/NAME.log.
PLAN=(
  "env                    40  10 any tool versions, the GPU; minillama.kernels is ours and 'import kernels' is not"
  "kernel_tests           90  20 gpu tests/test_kernels.py on the GPU: compiled Triton against fp32 references"
  "cuda_tests            120  30 gpu tests/test_cuda.py: CUDA-graph decode, compiled prefill, hand-captured graph vs eager"
  "bench_kernels          60  20 gpu norm kernels, bf16, 8192 rows, hidden 2048/4096/8192: eager and device time, GB/s, % copy"
  "make_model_1b          45  15 gpu a random checkpoint of Llama-3.2-1B's shape (bf16) for the model-level steps"
  "bench_generate        170  60 gpu 1B decode/prefill: transformers, eager, hand-captured graph, compiled (CUDA graphs)"
  "model_triton_tests     60  20 gpu tests/test_model_triton.py on the GPU: logits and gradients with the Triton norms"
  "bench_train           180  60 gpu 1B training step bf16, batch 4 x 1024: transformers, minillama, compiled blocks"
  "bench_quant           120  50 gpu 1B int8 weight-only: decode speed (eager), perplexity, KL against bf16"
  "bench_norm            100  40 gpu norms swapped in the 1B model (--quick): speed, norm share, KL"
  "fsdp_finetune          90  30 gpu a 5-step FSDP2 fine-tune of the tiny recipe through accelerate launch"
  "bench_kernels_compile  90  30 gpu the torch.compile peers of bench_kernels' grid"
  "make_model_small      120  10 cpu a random 2-layer checkpoint of SmolLM2's shape"
  "kernel_overhead       120  10 cpu host cost of one norm call (bench_kernels --overhead)"
)

# ------------------------------------------------------------------------------------------ steps
# Each runs in its own bash under `timeout`, with OUT, PY, ROOT and MODELS exported.

step_env() {
  "$PY" -P - "$OUT/env.json" "$ROOT" <<'EOF'
import importlib.util, json, os, platform, sys

path, root = sys.argv[1], os.path.realpath(sys.argv[2])
import torch

info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
if info["cuda"]:
    info["gpu"] = torch.cuda.get_device_name(0)
    info["cuda_version"] = torch.version.cuda
json.dump(info, open(path, "w"), indent=2)  # written first: the CUDA flag decides the plan
for mod in ("triton", "transformers", "accelerate", "peft", "matplotlib", "liger_kernel"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception:
        info[mod] = None


def inside(p):
    return p is not None and os.path.realpath(p).startswith(root + os.sep)


spec = importlib.util.find_spec("kernels")
info["kernels_module"] = spec.origin if spec is not None else None
import transformers.modeling_utils  # noqa: F401  (imports Hugging Face's `kernels` when it finds one)

try:
    from transformers.utils import is_kernels_available

    info["hf_kernels_available"] = bool(is_kernels_available())
except ImportError:  # an older transformers without the hub-kernels integration
    info["hf_kernels_available"] = None
loaded = sys.modules.get("kernels")
import minillama.kernels

info["minillama_kernels"] = minillama.kernels.__file__
info["kernels_is_ours"] = inside(info["kernels_module"]) or inside(getattr(loaded, "__file__", None))
json.dump(info, open(path, "w"), indent=2)
print(json.dumps(info))
if info["kernels_is_ours"]:
    sys.exit(f"'import kernels' resolves to this checkout ({info['kernels_module']}): the path is wrong")
if not inside(info["minillama_kernels"]):
    sys.exit(f"minillama.kernels is {info['minillama_kernels']}, not this checkout's kernels/")
EOF
}

step_kernel_tests() {
  "$PY" -P -m pytest -q -p no:cacheprovider -m interpret tests/test_kernels.py
}

step_cuda_tests() {
  "$PY" -P -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
}

step_bench_kernels() {
  "$PY" tools/bench_kernels.py --dtypes bfloat16 --rows 8192 --hidden 2048,4096,8192 \
    --norms rmsnorm,add+rmsnorm,layernorm --no-compile --json "$OUT/kernels.json" --plot "$OUT/kernels.png"
}

step_make_model_1b() {
  "$PY" tools/make_model.py --shape llama-1b --dtype bfloat16 --out "$MODELS/llama-1b"
}

step_bench_generate() {
  # 64 new tokens, a 448-token prefill: on CUDA every minillama worker sets up one 512-slot cache
  # before its warm-up, so nothing is compiled (or captured) twice. The compiled row is last: it
  # costs the two compilations.
  "$PY" tools/bench_generate.py --model "$MODELS/llama-1b" --dtypes bfloat16 \
    --impls transformers,minillama,minillama-cudagraph,minillama-compiled \
    --new-tokens 64 --prefill 448 --repeats 3 --json "$OUT/generate.json"
}

step_model_triton_tests() {
  "$PY" -P -m pytest -q -p no:cacheprovider -m interpret tests/test_model_triton.py
}

step_bench_train() {
  "$PY" tools/bench_train.py --model "$MODELS/llama-1b" --precision bf16 --batch 4 --seq 1024 --steps 6 \
    --warmup 2 --compile --json "$OUT/train.json"
}

step_bench_quant() {
  "$PY" tools/bench_quant.py --model "$MODELS/llama-1b" --modes int8 --no-compile --windows 1 --seq 256 \
    --new-tokens 64 --prefill 256 --repeats 2 --corpus README.md --out "$OUT/bench_quant"
}

step_bench_norm() {
  "$PY" tools/bench_norm.py --quick --model "$MODELS/llama-1b" --norms rmsnorm,rmsnorm-torch,rmsnorm-native,layernorm \
    --out "$OUT/bench_norm"
}

step_fsdp_finetune() {
  "$PY" -P -m accelerate.commands.launch --config_file configs/accelerate/fsdp-gpu.yaml --num_processes 1 \
    tools/finetune.py --config configs/finetune/tiny.yaml --max-steps 5 --no-progress --out "$MODELS/fsdp-tiny"
}

step_bench_kernels_compile() {
  "$PY" tools/bench_kernels.py --dtypes bfloat16 --rows 8192 --hidden 2048,4096,8192 \
    --norms rmsnorm,add+rmsnorm,layernorm --impls "torch.compile(HF),torch.compile(F.layer_norm)" \
    --json "$OUT/kernels_compile.json"
}

step_make_model_small() {
  "$PY" tools/make_model.py --shape smollm2-135m --layers 2 --dtype float32 --out "$MODELS/smollm2-135m-2l"
}

step_kernel_overhead() {
  "$PY" tools/bench_kernels.py --overhead --calls 500 --json "$OUT/overhead.json"
}

# ------------------------------------------------------------------------------------------ runner

declare -A STATUS=() SECS=() LIMITS=() WHATS=()
ORDER=()
CURRENT=""

record() {  # record NAME STATUS SECONDS LIMIT WHAT
  [ -n "${STATUS[$1]+x}" ] || ORDER+=("$1")
  STATUS[$1]=$2 SECS[$1]=$3 LIMITS[$1]=$4 WHATS[$1]=$5
}

write_summary() {  # summary.json + summary.md from the step table and the JSON the steps wrote
  local complete=${1:-0} name
  {
    for name in "${ORDER[@]}"; do
      printf '%s\t%s\t%s\t%s\t%s\n' "$name" "${STATUS[$name]}" "${SECS[$name]}" "${LIMITS[$name]}" "${WHATS[$name]}"
    done
  } > "$OUT/.steps.tsv" && mv -f "$OUT/.steps.tsv" "$OUT/steps.tsv"
  "$PY" -I - "$OUT" "$BUDGET" "$((SECONDS - START))" "$complete" <<'EOF' || echo "   (summary writer failed)"
import json, os, re, sys
from pathlib import Path

out, budget, elapsed, complete = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds, limit, what = line.split("\t")
    steps.append({"step": name, "status": status, "seconds": int(seconds), "limit": int(limit), "what": what})
summary = {"budget_s": budget, "elapsed_s": elapsed, "complete": complete, "steps": steps}


def load(rel):
    f = out / rel
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        return {"unreadable": str(e)}


for key, rel in (("env", "env.json"), ("overhead", "overhead.json"), ("kernels", "kernels.json"),
                 ("kernels_compile", "kernels_compile.json"), ("generate", "generate.json"),
                 ("train", "train.json"), ("bench_quant", "bench_quant/results.json"),
                 ("bench_norm", "bench_norm/results.json")):
    value = load(rel)
    if value is not None:
        summary[key] = value
tests = {}
for s in steps:  # pytest's last counts line ("3 passed, 1 failed in 12.3s"), or how far it got
    log = out / f"{s['step']}.log"
    if s["step"].endswith("_tests") and log.is_file():
        text = log.read_text(errors="replace")
        counts = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|errors|skipped|deselected|xfailed|xpassed)"
                            r"(?:, \d+ \w+)*)(?: in [\d.]+s)?.*$", text, re.M)
        progress = re.findall(r"\[\s*(\d+)%\]", text)
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
        tests[s["step"]] = {"result": counts[-1] if counts else None,
                            "progress_pct": int(progress[-1]) if progress else None, "failed": failed}
summary["tests"] = tests


def atomic(path, text):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def med(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


md = ["# gpu_check summary", ""]
env = summary.get("env") or {}
if env:
    md.append(f"{env.get('gpu') or 'no CUDA'}; torch {env.get('torch')}, triton {env.get('triton')}, "
              f"transformers {env.get('transformers')}, python {env.get('python')}; `import kernels`: "
              f"{env.get('kernels_module') or 'none'}")
    md.append("")
md.append(f"{'Complete' if complete else 'Incomplete (still running, stopped or interrupted)'}: "
          f"{elapsed} s of a {budget} s budget.")
md += ["", "| step | status | s | limit s | what |", "|---|---|---|---|---|"]
md += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['limit']} | {s['what']} |" for s in steps]
if tests:
    md += ["", "## Tests", "", "| step | result | failed |", "|---|---|---|"]
    for name, t in tests.items():
        result = t["result"] or (f"stopped at {t['progress_pct']}%" if t["progress_pct"] is not None else "-")
        md.append(f"| {name} | {result} | {', '.join(t['failed'][:8]) or '-'} |")


def section(title, fn):
    try:
        lines = fn()
    except Exception as e:  # a partial or unexpected JSON never breaks the summary
        lines = [f"(could not read: {type(e).__name__}: {e})"]
    if lines:
        md.extend(["", f"## {title}", ""] + lines)


def kernels(key):
    def fn():
        data = summary.get(key)
        if not data:
            return []
        lines = [f"copy bandwidth {data['copy_gb_s']:.0f} GB/s; GB/s and % copy from the device time (CUDA-graph "
                 "replay; backward = forward + backward minus forward); eager = us per call from Python", "",
                 "| norm | hidden | rows | impl | fwd GB/s | fwd % copy | bwd GB/s | bwd % copy | fwd eager us "
                 "| bwd eager us |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in data["results"]:
            head = f"| {r['norm']} | {r['hidden']} | {r['rows']} | {r['impl']} |"
            if "error" in r:
                lines.append(head + f" failed: {r['error'][:100]} | | | | | |")
                continue
            lines.append(head + f" {r['fwd_gb_s']:.0f} | {r['fwd_pct_copy']:.0f}% | {r['bwd_gb_s']:.0f} "
                         f"| {r['bwd_pct_copy']:.0f}% | {med(r['fwd_eager_s']) * 1e6:.1f} "
                         f"| {med(r['bwd_eager_s']) * 1e6:.1f} |")
        return lines
    return fn


def generate():
    data = summary.get("generate")
    if not data:
        return []
    lines = ["| impl | decode tok/s | x HF | prefill tok/s | x HF | warm-up s | cache | same tokens as HF |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['impl']} | failed: {r['error'][:100]} | | | | | | |")
            continue
        ratio = (lambda k: f"{r[k]:.2f}" if k in r else "-")
        lines.append(f"| {r['impl']} | {r['decode_tok_s'][0]:.1f} | {ratio('decode_vs_hf')} | "
                     f"{r['prefill_tok_s'][0]:.0f} | {ratio('prefill_vs_hf')} | {r['warmup_s']:.1f} | "
                     f"{r.get('cache_len') or '-'} | {r.get('same_tokens_as_hf', '-')} |")
    return lines


def train():
    data = summary.get("train")
    if not data:
        return []
    lines = ["| impl | tokens/s | x HF | x HF per round | % matmul roofline | peak MB | first loss |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if "tok_s" not in r:
            lines.append(f"| {r['impl']} | (no timed step) | | | | | |")
            continue
        peak = f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-"
        lines.append(f"| {r['impl']} | {r['tok_s'][0]:.0f} | {r['vs_hf']:.2f} | {r['vs_hf_paired']:.2f} | "
                     f"{r['roofline_pct']:.0f}% | {peak} | {r['losses'][0]:.5f} |")
    return lines


def quant():
    data = summary.get("bench_quant")
    if not data:
        return []
    hf = data.get("transformers")
    lines = [f"transformers decode: {hf['decode_tok_s'][0]:.1f} tok/s" if hf else "transformers: not measured", "",
             "| mode | weights MB | decode tok/s | prefill tok/s | perplexity | KL | greedy agree |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        kl = "-" if r.get("kl") is None else f"{r['kl']:.4f}"
        lines.append(f"| {r['mode']} | {r['weight_bytes'] / 1e6:.0f} | {r['decode_tok_s'][0]:.1f} | "
                     f"{r['prefill_tok_s'][0]:.0f} | {r['perplexity']:.3f} | {kl} | "
                     f"{100 * r['greedy_agreement']:.1f}% |")
    return lines


def norm():
    data = summary.get("bench_norm")
    if not data or not data.get("model_level"):
        return []
    lines = ["| norm | prefill tok/s | decode tok/s | norm share of forward | KL from rmsnorm-torch |",
             "|---|---|---|---|---|"]
    for r in data["model_level"]:
        kl = "n/a" if r.get("kl_from_reference") is None else f"{r['kl_from_reference']:.3g}"
        lines.append(f"| {r['norm']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                     f"{100 * r['norm_time_share']:.1f}% | {kl} |")
    return lines


section("Norm kernels (bench_kernels)", kernels("kernels"))
section("1B decode (bench_generate)", generate)
section("1B training (bench_train)", train)
section("1B int8 (bench_quant)", quant)
section("Norms in the 1B model (bench_norm)", norm)
section("torch.compile peers (bench_kernels_compile)", kernels("kernels_compile"))
atomic(out / "summary.json", json.dumps(summary, indent=2))
atomic(out / "summary.md", "\n".join(md) + "\n")
EOF
}

run_step() {  # run_step NAME CAP MIN WHAT: step_NAME under min(CAP, time left), skipped below MIN
  local name=$1 cap=$2 min=$3 what=$4
  local left=$((DEADLINE - SECONDS))
  local limit=$((cap < left ? cap : left))
  if ((limit < min)); then
    record "$name" "skipped (no time: $((left > 0 ? left : 0)) s left, needs $min)" 0 "$cap" "$what"
    echo "== $name: skipped, $((left > 0 ? left : 0)) s left (needs $min)"
    write_summary
    return
  fi
  local start=$SECONDS
  CURRENT=$name CURRENT_START=$start CURRENT_LIMIT=$limit CURRENT_WHAT=$what
  record "$name" running 0 "$limit" "$what"
  write_summary
  echo "== $name (limit ${limit} s; ${left} s left)"
  timeout -k "$GRACE" "$limit" bash -c "step_$name" > "$OUT/$name.log" 2>&1 &
  STEP_PID=$!
  wait "$STEP_PID"
  local rc=$?
  STEP_PID=""
  CURRENT=""
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status="timeout (limit $limit s)"
  elif [ $rc -ne 0 ]; then
    status="failed (exit $rc)"
  fi
  record "$name" "$status" "$((SECONDS - start))" "$limit" "$what"
  echo "   $status in $((SECONDS - start)) s; log: $OUT/$name.log"
  [ "$status" = ok ] || tail -5 "$OUT/$name.log" | sed 's/^/   | /'
  write_summary
}

on_exit() {  # the exit trap: whatever stopped the run, the summary says how far it got
  local rc=$?
  trap - EXIT
  if [ -n "${STEP_PID:-}" ]; then
    kill -TERM "$STEP_PID" 2>/dev/null
    wait "$STEP_PID" 2>/dev/null
  fi
  if [ -n "${CURRENT:-}" ]; then
    record "$CURRENT" "interrupted" "$((SECONDS - CURRENT_START))" "$CURRENT_LIMIT" "$CURRENT_WHAT"
  fi
  if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ "${#ORDER[@]}" -gt 0 ]; then
    write_summary "${COMPLETE:-0}"
  fi
  [ -n "${WORK:-}" ] && rm -rf "$WORK"
  exit "$rc"
}

setup_pythonpath() {  # a directory holding only a link to minillama/, first on PYTHONPATH (never the checkout root)
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
  mkdir -p "$WORK/path"
  ln -s "$GPU_CHECK_ROOT/minillama" "$WORK/path/minillama"
  export PYTHONPATH="$WORK/path${PYTHONPATH:+:$PYTHONPATH}"
}

print_plan() {  # the plan on a GPU machine: what each step gets if every earlier one used its whole allotment
  local usable=$((BUDGET - RESERVE)) used=0 entry name cap min where what gets sure=0 later=()
  echo "# gpu_check plan: budget $BUDGET s, $RESERVE s kept back; each step runs under min(cap, time left)"
  echo
  echo "| # | step | cap s | min s | gets at worst s | starts by s | what |"
  echo "|---|---|---|---|---|---|---|"
  local i=0
  for entry in "${PLAN[@]}"; do
    read -r name cap min where what <<< "$entry"
    [ "$where" = cpu ] && continue
    i=$((i + 1))
    local left=$((usable - used))
    gets=$((cap < left ? cap : left))
    if ((gets < min)); then
      echo "| $i | $name | $cap | $min | 0 (as time allows) | - | $what |"
      later+=("$name")
    else
      echo "| $i | $name | $cap | $min | $gets | $used | $what |"
      used=$((used + gets))
      sure=$((sure + 1))
    fi
  done
  echo
  echo "guaranteed: $sure steps, $used s of $usable s usable (budget $BUDGET s)"
  echo "as time allows: ${later[*]:-none}"
  local cpu=()
  for entry in "${PLAN[@]}"; do
    read -r name cap min where what <<< "$entry"
    [ "$where" = cpu ] && cpu+=("$name")
  done
  echo "without CUDA: env, then ${cpu[*]} (the GPU steps are skipped)"
}

main() {
  BUDGET=540
  local dry=0
  OUT=""
  while [ $# -gt 0 ]; do
    case $1 in
      --budget) BUDGET=${2:?--budget needs a number of seconds}; shift 2 ;;
      --budget=*) BUDGET=${1#--budget=}; shift ;;
      --dry-run) dry=1; shift ;;
      -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; return 0 ;;
      -*) echo "gpu_check.sh: unknown option $1" >&2; return 2 ;;
      *) OUT=$1; shift ;;
    esac
  done
  if ! [[ $BUDGET =~ ^[0-9]+$ ]]; then
    echo "gpu_check.sh: --budget must be a whole number of seconds, got '$BUDGET'" >&2
    return 2
  fi
  if [ $dry = 1 ]; then
    print_plan
    return 0
  fi
  if [ -z "$OUT" ]; then
    echo "usage: tools/gpu_check.sh [--budget SECONDS] [--dry-run] OUTDIR" >&2
    return 2
  fi
  START=$SECONDS
  DEADLINE=$((START + BUDGET - RESERVE))
  PY=${PYTHON:-python3}
  ROOT=$GPU_CHECK_ROOT
  mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || return 2
  if ! "$PY" -P -c pass 2>/dev/null; then
    echo "gpu_check.sh: $PY does not take -P (Python >= 3.11 needed: no working directory on sys.path)" >&2
    return 2
  fi
  trap on_exit EXIT
  trap 'exit 143' TERM
  trap 'exit 130' INT
  trap 'exit 129' HUP
  setup_pythonpath
  MODELS=$WORK/models
  mkdir -p "$MODELS"
  export OUT PY ROOT MODELS PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  cd "$ROOT" || return 2
  local entry name cap min where what
  for entry in "${PLAN[@]}"; do
    read -r name cap min where what <<< "$entry"
    export -f "step_$name"
  done
  echo "gpu_check: budget $BUDGET s (until +$((DEADLINE - START)) s), out $OUT, python path $WORK/path"

  local has_cuda=0 skipped=()
  for entry in "${PLAN[@]}"; do
    read -r name cap min where what <<< "$entry"
    if [ "$where" = gpu ] && [ $has_cuda = 0 ]; then
      skipped+=("$name")
      continue
    fi
    if [ "$where" = cpu ] && [ $has_cuda = 1 ]; then
      continue
    fi
    if [ "$where" = cpu ] && [ ${#skipped[@]} -gt 0 ] && [ -z "${STATUS[gpu_steps]+x}" ]; then
      echo "CUDA is not available here: skipped ${skipped[*]} (they need a GPU)"
      record gpu_steps "skipped (no CUDA)" 0 0 "${skipped[*]}"
    fi
    run_step "$name" "$cap" "$min" "$what"
    if [ "$name" = env ]; then
      grep -q '"cuda": true' "$OUT/env.json" 2>/dev/null && has_cuda=1
    fi
  done
  if [ ${#skipped[@]} -gt 0 ] && [ -z "${STATUS[gpu_steps]+x}" ]; then
    echo "CUDA is not available here: skipped ${skipped[*]} (they need a GPU)"
    record gpu_steps "skipped (no CUDA)" 0 0 "${skipped[*]}"
  fi
  COMPLETE=1
  write_summary 1
  echo
  cat "$OUT/summary.md"
  echo "wrote $OUT/summary.json and $OUT/summary.md"
  return 0
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
