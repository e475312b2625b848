"""The CPU-testable parts of the GPU run: tools/gpu_check.sh's plan, budget and summary (its steps
replaced by quick stand-ins through the script's own runner), the Python path it gives the runs, the
benches' JSON-before-plot order and captured-backward timing, the rotary frequencies' device, and
CUDAGraphStep's graph keys. What needs the GPU itself is tests/test_cuda.py, which the script runs."""

from __future__ import annotations

import json
import os
import re
import signal
import site
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import minillama

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "tools" / "gpu_check.sh"
RESERVE = 15  # the script's RESERVE


def _plan(*extra: str) -> list[dict]:
    run = subprocess.run(["bash", str(GPU_CHECK), "--dry-run", *extra], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    rows = []
    for line in run.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0].isdigit():
            rows.append({"step": cells[1], "cap": int(cells[2]), "min": int(cells[3]),
                         "gets": int(cells[4].split()[0]), "what": cells[6]})
    return rows, run.stdout


def test_dry_run_plan_fits_the_budget_in_order_of_value():
    for budget in (540, 300, 60):
        rows, text = _plan("--budget", str(budget))
        assert sum(r["gets"] for r in rows) <= budget - RESERVE, text
        assert all(r["gets"] == 0 or r["min"] <= r["gets"] <= r["cap"] for r in rows), text
        assert f"budget {budget} s" in text
    rows, text = _plan()  # the default: one command of at most 9 minutes
    assert "budget 540 s" in text
    order = [r["step"] for r in rows]
    assert order[:6] == ["env", "kernel_tests", "cuda_tests", "bench_kernels", "make_model_1b", "bench_generate"]
    sure = [r["step"] for r in rows if r["gets"] > 0]
    assert sure == order[:6], text  # the rest only as time allows
    assert {"bench_train", "bench_quant", "bench_norm", "fsdp_finetune"} <= set(order[6:])
    assert "without CUDA: env, then make_model_small kernel_overhead" in text
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    assert all(f"`{step}`" in docs for step in order), "docs/benchmarks.md describes every step"


def _run_with_plan(tmp_path: Path, plan: list[str], steps: str, budget: int, *, wait: bool = True):
    """gpu_check.sh's own runner (the script sourced, main called) on stand-in steps."""
    out = tmp_path / "out"
    entries = " ".join(f'"{entry}"' for entry in plan)
    script = f"source {GPU_CHECK}\nRESERVE=2\nPLAN=({entries})\n{steps}\nmain --budget {budget} {out}\n"
    env = {**os.environ, "PYTHON": sys.executable}
    if wait:
        return out, subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    return out, subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env)


STEPS = """
step_one() { echo '{"a": 1}' > "$OUT/one.json"; echo one done; }
step_slow() { sleep 60 & echo $! > "$OUT/slow.pid"; wait; }
step_late() { echo never; }
"""


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_a_step_past_the_deadline_is_stopped_and_the_summary_kept(tmp_path):
    t = time.monotonic()
    out, run = _run_with_plan(tmp_path, ["one 5 1 any writes one.json", "slow 60 1 any sleeps past the deadline",
                                         "late 5 3 any finds no time left"], STEPS, budget=5)
    assert run.returncode == 0, run.stderr
    assert time.monotonic() - t < 20  # the budget, not the step's 60 s cap
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert steps["one"]["status"] == "ok" and (out / "one.log").read_text() == "one done\n"
    assert steps["slow"]["status"].startswith("timeout") and steps["slow"]["limit"] <= 3
    assert steps["late"]["status"].startswith("skipped (no time")
    assert summary["complete"] and summary["budget_s"] == 5
    assert _gone(int((out / "slow.pid").read_text())), "the step's children are killed with it"
    md = (out / "summary.md").read_text()
    assert "| slow | timeout" in md and "| late | skipped (no time" in md


def test_an_interrupted_run_writes_its_summary_from_the_exit_trap(tmp_path):
    out, proc = _run_with_plan(tmp_path, ["one 5 1 any writes one.json", "slow 60 1 any sleeps"], STEPS,
                               budget=100, wait=False)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the summary is written before each step starts
            f = out / "summary.json"
            if f.is_file() and (out / "slow.pid").is_file() and '"running"' in f.read_text():
                break
            time.sleep(0.1)
        else:
            pytest.fail("the slow step never started")
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s["status"] for s in summary["steps"]}
    assert steps == {"one": "ok", "slow": "interrupted"} and not summary["complete"]
    assert _gone(int((out / "slow.pid").read_text()))
    work = re.search(r"python path (\S+)/path", stdout).group(1)
    assert not Path(work).exists()  # the temporary path directory is removed


def _runner_pythonpath() -> str:
    """The PYTHONPATH gpu_check.sh gives its runs (its own setup_pythonpath)."""
    run = subprocess.run(["bash", "-c", f'source {GPU_CHECK}; setup_pythonpath; echo "$PYTHONPATH"'],
                         capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


@pytest.mark.slow
def test_the_runners_path_hides_the_checkout_root_from_transformers():
    """Run as the GPU run does, from the checkout root with `python -P` and no installed minillama
    (-S: no site-packages .pth files, so no editable install): minillama and minillama.kernels come
    from the checkout, `import kernels` never does, and transformers imports cleanly."""
    path = _runner_pythonpath()
    link = Path(path.split(":")[0])
    assert link.name == "path" and (link / "minillama").is_symlink() and sorted(os.listdir(link)) == ["minillama"]
    code = ("import importlib.util, transformers, transformers.modeling_utils, minillama.kernels, sys; "
            "spec = importlib.util.find_spec('kernels'); "
            "print(minillama.__file__, minillama.kernels.__file__, spec and spec.origin, "
            "getattr(sys.modules.get('kernels'), '__file__', None), importlib.util.find_spec('minillama.tools'))")
    site_dirs = ":".join(site.getsitepackages())
    env = {**os.environ, "PYTHONPATH": f"{path}:{site_dirs}", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        run = subprocess.run([sys.executable, "-P", "-S", "-c", code], cwd=ROOT, capture_output=True, text=True,
                             env=env, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
    finally:
        subprocess.run(["rm", "-rf", str(link.parent)], check=False)
    init, kernels_init, kernels_origin, loaded, tools = run.stdout.split()
    assert Path(init) == link / "minillama" / "__init__.py" and tools == "None"
    assert Path(kernels_init) == ROOT / "kernels" / "__init__.py"
    for found in (kernels_origin, loaded):  # none, or Hugging Face's own package
        assert found == "None" or not Path(found).resolve().is_relative_to(ROOT), found
    # What the check guards against: the checkout root on the path makes kernels/ a top-level package.
    old = subprocess.run([sys.executable, "-P", "-S", "-c", "import importlib.util; "
                          "print(importlib.util.find_spec('kernels').origin)"], cwd=ROOT, capture_output=True,
                         text=True, env={**env, "PYTHONPATH": f"{ROOT}:{site_dirs}"}, timeout=60)
    assert Path(old.stdout.strip()) == ROOT / "kernels" / "__init__.py", old.stderr


@pytest.mark.slow
def test_test_cuda_collects_under_the_runners_path():
    path = _runner_pythonpath()
    try:
        env = {**os.environ, "PYTHONPATH": f"{path}:{':'.join(site.getsitepackages())}"}
        run = subprocess.run([sys.executable, "-P", "-S", "-m", "pytest", "--collect-only", "-q", "-p",
                              "no:cacheprovider", "tests/test_cuda.py"], cwd=ROOT, capture_output=True, text=True,
                             env=env, timeout=120)
        assert "error" not in run.stdout.lower(), run.stdout[-2000:]
        if not torch.cuda.is_available():
            assert re.search(r"\d+ deselected", run.stdout), run.stdout[-2000:]
    finally:
        subprocess.run(["rm", "-rf", str(Path(path.split(":")[0]).parent)], check=False)


# ---------------------------------------------------------------- the benches

NO_MATPLOTLIB = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.path.insert(0, {tools!r}); "
                 "sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__')")


def _without_matplotlib(script: str, *args: str) -> subprocess.CompletedProcess:
    argv = [str(ROOT / "tools" / script), *args]
    code = NO_MATPLOTLIB.format(tools=str(ROOT / "tools"), argv=argv)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bench_kernels_writes_its_json_without_matplotlib(tmp_path):
    run = _without_matplotlib("bench_kernels.py", "--hidden", "64", "--rows", "3", "--norms", "rmsnorm,layernorm",
                              "--calls", "2", "--repeats", "2", "--no-compile", "--json", str(tmp_path / "k.json"),
                              "--plot", str(tmp_path / "k.png"))
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads((tmp_path / "k.json").read_text())["results"]
    assert {r["norm"] for r in rows} == {"rmsnorm", "layernorm"} and all("error" not in r for r in rows)
    assert not (tmp_path / "k.png").exists() and "matplotlib is not installed" in run.stderr


def test_bench_norm_writes_its_json_without_matplotlib(tmp_path):
    # op level only: the plots are skipped in one place whatever was measured (the model-level
    # rows are tests/test_bench_tools.py's)
    out = tmp_path / "norm"
    run = _without_matplotlib("bench_norm.py", "--no-model", "--hidden", "64", "--rows", "3", "--repeats", "2",
                              "--norms", "rmsnorm,layernorm", "--dtypes", "float32", "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["plots"] == [] and len(results["op_level"]) == 2 and results["model_level"] == []
    assert (out / "results.md").read_text().startswith("# bench_norm") and not list(out.glob("*.png"))
    assert "matplotlib is not installed" in run.stderr


def _bench_kernels():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import bench_kernels
    finally:
        sys.path.pop(0)
    return bench_kernels


def test_backward_device_time_is_captured_forward_and_backward_minus_forward():
    """bench_kernels' device-time logic on a CPU, through an injected capture: backward = (forward +
    backward captured together) - forward, and a capture that does not compute the gradient, or
    whose backward costs nothing, fails its row instead of reporting a number."""
    import argparse

    bk = _bench_kernels()
    args = argparse.Namespace(calls=3, repeats=3, no_compile=True, impls="minillama,F.rms_norm")
    cpu = torch.device("cpu")
    durations = iter([])

    def capture(record, warmup):  # a "graph" replayed by running the calls again; its time scripted
        warmup()
        out = record()
        return out, lambda: next(durations)

    def run(times, capture=capture):
        nonlocal durations
        durations = iter(times)
        return {r["impl"]: r for r in bk.bench_case("rmsnorm", torch.float32, 64, 4, cpu, args, 100.0,
                                                    capture=capture)}

    # per impl: 3 forward replays of 3 calls (3 us a call), then 3 forward + backward ones (12 us a call)
    rows = run([9e-6, 9e-6, 9e-6, 36e-6, 36e-6, 36e-6] * 2)
    for r in rows.values():
        assert "error" not in r, r
        assert r["fwd_device_s"] == pytest.approx([3e-6] * 3) and r["fwd_bwd_device_s"] == pytest.approx([12e-6] * 3)
        assert r["bwd_device_s"] == pytest.approx([9e-6] * 3)
        assert r["bwd_gb_s"] == pytest.approx(r["bwd_bytes"] / 9e-6 / 1e9)
    rows = run([9e-6] * 12)  # the backward adds nothing: no figure
    assert all(r["error"].startswith("bwd: RuntimeError: forward + backward") and "bwd_gb_s" not in r
               for r in rows.values())

    captured = iter(range(100))

    def no_gradient(record, warmup):  # every second capture (the forward + backward one) loses its output
        out, replay = capture(record, warmup)
        return (None if next(captured) % 2 else out), replay

    rows = run([9e-6, 9e-6, 9e-6, 36e-6, 36e-6, 36e-6] * 2, no_gradient)
    assert all(r["error"] == "bwd: RuntimeError: the captured forward + backward returned no gradient"
               for r in rows.values()), rows


def test_write_json_replaces_the_file_whole(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from benchutil import write_json
    finally:
        sys.path.pop(0)
    target = tmp_path / "r.json"
    write_json(target, {"rows": [1]})
    write_json(target, {"rows": [1, 2]})
    assert json.loads(target.read_text()) == {"rows": [1, 2]} and os.listdir(tmp_path) == ["r.json"]


# ---------------------------------------------------------------- device placement and graph keys

def _cfg() -> minillama.ModelConfig:
    return minillama.ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def test_rope_frequencies_live_on_the_model_device():
    """From the load (empty_model: built on meta, then to_empty on the device), through .to() and
    setup_cache: the frequencies are on the model's device before any forward, and stay exact fp32."""
    from minillama.checkpoint import empty_model
    from minillama.rope import rope_parameters

    cfg = _cfg()
    exact = rope_parameters(cfg)[0]
    model = empty_model(cfg, torch.bfloat16, "meta")
    assert model.rope.inv_freq.device.type == "meta"
    model.to_empty(device="cpu")
    assert model.rope.inv_freq.device.type == "cpu" and torch.equal(model.rope.inv_freq, exact)
    model.to(torch.float16)
    assert model.rope.inv_freq.dtype == torch.float32 and torch.equal(model.rope.inv_freq, exact)
    model.to("meta")
    assert model.rope.inv_freq.device.type == "meta"
    model.setup_cache(1, 16, device="cpu")  # placed with the cache, from the exact values
    assert model.rope.inv_freq.device.type == "cpu" and torch.equal(model.rope.inv_freq, exact)
    with torch.device("meta"):
        built = minillama.Transformer(cfg)
    assert built.rope.inv_freq.device.type == "cpu"  # real numbers on meta: to_empty moves them


def test_loaded_model_has_its_rope_on_its_device_and_one_compiled_graph(make_hf):
    _, path = make_hf("llama", num_key_value_heads=2)
    model = minillama.from_pretrained(path, prepack=False)
    assert model.rope.inv_freq.device == model.embed.weight.device
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)  # Dynamo's guards alone
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        first = compiled(ids)
        graphs = counters["stats"]["unique_graphs"]
        torch.testing.assert_close(compiled(ids), first)
    assert counters["stats"]["unique_graphs"] == graphs  # the second call compiled nothing


def test_cuda_graph_step_recaptures_when_any_layers_cache_is_rebuilt(make_hf):
    from minillama.cudagraph import CUDAGraphStep
    from minillama.errors import GenerationError
    from minillama.generate import generate
    from minillama.kv_cache import KVCache

    captures = []

    def capture(run):  # as test_generate's: replaying runs the step again into the same output
        out = run()
        captures.append(out)
        return out, lambda: out.copy_(run())

    _, path = make_hf("llama", num_key_value_heads=2)
    model = minillama.from_pretrained(path, prepack=False)
    step = CUDAGraphStep(model, capture=capture)
    prompts = [[5, 17, 3], [9, 8, 7, 6]]
    eager = generate(model, prompts, 6, eos_token_id=[], pad_token_id=0)
    assert torch.equal(generate(model, prompts, 6, eos_token_id=[], pad_token_id=0, step_fn=step), eager)
    assert len(captures) == 1 and len(step.graphs) == 1
    generate(model, prompts, 6, eos_token_id=[], pad_token_id=0, step_fn=step)
    assert len(captures) == 1  # same cache: replayed
    model.setup_cache(*model.kv_cache.k.shape[:1], model.cache_len)  # rebuilt, same shape
    assert torch.equal(generate(model, prompts, 6, eos_token_id=[], pad_token_id=0, step_fn=step), eager)
    assert len(captures) == 2 and len(step.graphs) == 1  # the old cache's graph is dropped
    old = model.layers[1].attn.kv_cache  # only a later layer's cache replaced: layer 0's is unchanged
    model.layers[1].attn.kv_cache = KVCache(old.k.shape[0], old.k.shape[1], old.k.shape[2], old.k.shape[3],
                                            old.k.dtype, old.k.device)
    assert torch.equal(generate(model, prompts, 6, eos_token_id=[], pad_token_id=0, step_fn=step), eager)
    assert len(captures) == 3 and len(step.graphs) == 1
    model.clear_cache()
    with pytest.raises(GenerationError, match="no KV cache"):
        step(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
             position_ids=torch.zeros(1, 1, dtype=torch.long), padding_mask=torch.ones(1, 8, dtype=torch.long))
