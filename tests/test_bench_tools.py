"""The benchmark tools run end to end in --quick mode on a tiny model and write what they document."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
pytestmark = pytest.mark.slow


def test_bench_norm_quick(make_hf, tmp_path):
    _, model = make_hf("llama", num_key_value_heads=2, max_position_embeddings=128)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(TOOLS / "bench_norm.py"), "--quick", "--model", str(model),
                          "--norms", "rmsnorm,rmsnorm-torch,layernorm,layernorm-triton,prmsnorm", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "## Op level" in run.stdout and "## Model level" in run.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"meta", "op_level", "model_level", "families", "plots", "tiers", "verdicts"}
    op = results["op_level"][0]
    assert {"norm", "dtype", "hidden", "rows", "fwd_s", "fwd_gb_s", "fwd_pct_peak"} <= set(op)
    rows = {r["norm"]: r for r in results["model_level"]}
    assert set(rows) == {"rmsnorm", "rmsnorm-torch", "layernorm", "layernorm-triton", "prmsnorm"}
    for r in rows.values():
        assert {"prefill_tok_s", "decode_tok_s", "norm_time_share", "peak_mem_mb", "perplexity",
                "kl_from_reference", "params"} <= set(r)
        assert r["prefill_tok_s"] > 0 and 0 < r["norm_time_share"] < 1
    assert rows["rmsnorm"]["kl_from_reference"] == pytest.approx(0, abs=1e-6)  # same function as the reference
    assert rows["layernorm"]["kl_from_reference"] > 1e-6
    assert rows["layernorm"]["params"] == rows["rmsnorm"]["params"] + 5 * 64  # beta in 2 x 2 + 1 norms
    # like for like: rmsnorm and layernorm-triton are one tier (minillama's kernels), op and model level
    tiers = [r for r in results["tiers"] if r["tier"] == "minillama kernels"]
    assert {r["level"] for r in tiers} == {"op", "model"}
    for r in tiers:
        assert r["saving"] == pytest.approx(1 - r["rms_s"] / r["layer_s"]) and r["rms_s"] > 0
    assert [v for v in results["verdicts"] if "minillama kernels" in v and "Paper" in v]
    assert "## RMSNorm vs LayerNorm, like for like" in run.stdout
    for png in results["plots"]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "results.md").read_text().startswith("# bench_norm")


# A shipped public-domain text (the first 128 KB of Hamlet, from the Gutenberg corpus the tool
# fetches by default): the suite never reaches the network.
HAMLET = Path(__file__).resolve().parent / "data" / "hamlet.txt"


def test_ablate_norm_quick(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(TOOLS / "ablate_norm.py"), "--quick", "--out", str(out),
                          "--corpus", str(HAMLET)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["corpus_bytes"] == HAMLET.stat().st_size  # the file given, read whole
    rows = {r["norm"]: r for r in results["results"]}
    assert set(rows) == {"rmsnorm", "layernorm", "prmsnorm", "batchnorm"}
    for r in rows.values():
        assert {"params", "final_val_loss", "val_loss_batch_stats_bs1", "val_loss_batch_stats_bs16",
                "step_s_median", "tokens_per_s", "curve"} <= set(r)
        assert r["curve"][-1]["train_loss"] < r["curve"][0]["train_loss"]  # it learns
        assert math.isfinite(r["final_val_loss"])
    # only BatchNorm's output depends on what else is in the batch
    assert rows["rmsnorm"]["val_loss_batch_stats_bs1"] == pytest.approx(rows["rmsnorm"]["val_loss_batch_stats_bs16"])
    assert rows["batchnorm"]["val_loss_batch_stats_bs1"] != pytest.approx(
        rows["batchnorm"]["val_loss_batch_stats_bs16"], rel=1e-4)
    assert rows["layernorm"]["params"] - rows["rmsnorm"]["params"] == 5 * 64
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_kernels_runs_and_reports(tmp_path):
    out = tmp_path / "k.json"
    run = subprocess.run([sys.executable, str(TOOLS / "bench_kernels.py"), "--hidden", "64,200", "--rows", "1,9",
                          "--calls", "2", "--repeats", "2", "--no-compile", "--json", str(out),
                          "--plot", str(tmp_path / "k.png")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert {(r["norm"], r["impl"]) for r in results} >= {("rmsnorm", "minillama"), ("add+rmsnorm", "F.rms_norm"),
                                                         ("layernorm", "F.layer_norm")}
    assert all("error" not in r and r["fwd_gb_s"] > 0 and r["bwd_gb_s"] > 0 for r in results)
    assert (tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"
    run = subprocess.run([sys.executable, str(TOOLS / "bench_kernels.py"), "--overhead", "--calls", "20",
                          "--repeats", "2", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["call"]: r for r in json.loads(out.read_text())["results"]}
    assert "minillama rms_norm (public call)" in rows and "F.rms_norm" in rows


def test_make_model_loads_in_transformers_and_minillama_with_equal_logits(tmp_path, smollm2_dir):
    import torch
    import transformers

    import minillama

    out = tmp_path / "m"
    # --tiny (widths / 16) keeps it quick; the real widths of every shape are tests/test_make_model_shapes.py's
    run = subprocess.run([sys.executable, str(TOOLS / "make_model.py"), "--shape", "llama-1b", "--layers", "1",
                          "--tiny", "--dtype", "float32", "--out", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (
        128, 32, 8, 49152) and cfg["rope_scaling"]["rope_type"] == "llama3"
    tok = minillama.load_tokenizer(out)
    ids = tok("The lighthouse keeper", return_tensors="pt").input_ids
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = minillama.from_pretrained(out, prepack=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits)
    bad = subprocess.run([sys.executable, str(TOOLS / "make_model.py"), "--shape", "llama-1b", "--layers", "0",
                          "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and not (tmp_path / "bad").exists()


def test_gpu_check_runs_its_cpu_parts(tmp_path, smollm2_dir):
    import os

    run = subprocess.run(["bash", str(TOOLS / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    steps = {s["step"]: s["status"] for s in summary["steps"]}
    assert steps["env"] == steps["make_model_small"] == steps["kernel_overhead"] == "ok", steps
    if not summary["env"]["cuda"]:
        assert steps["gpu_steps"] == "skipped (no CUDA)" and "CUDA is not available" in run.stdout
    assert summary["overhead"]["results"]


def test_bench_quant_quick(tiny_chat_dir, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(TOOLS / "bench_quant.py"), "--quick", "--model", str(tiny_chat_dir),
                          "--modes", "none,int4-g32,int4-g128", "--corpus", str(TOOLS.parent / "README.md"),
                          # the compiled rows cost a compilation per mode (tested in test_quant.py)
                          "--no-compile", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    rows = {r["mode"]: r for r in results["rows"]}
    assert set(rows) == {"none", "int4-g32"}  # g128 does not divide the tiny model's 64 features
    assert "int4-g128" in results["meta"]["skipped"] and "int4-g128: not measured" in run.stdout
    for r in rows.values():
        assert r["decode_tok_s"][0] > 0 and r["prefill_tok_s"][0] > 0 and "compiled_decode_tok_s" not in r
        assert math.isfinite(r["perplexity"]) and 0 <= r["greedy_agreement"] <= 1
    assert rows["none"]["kl"] is None and rows["int4-g32"]["kl"] > 0  # (int8's rows: test_quant.py)
    assert rows["int4-g32"]["weight_bytes"] < rows["none"]["weight_bytes"]
    assert results["transformers"]["impl"] == "transformers"
    assert (out / results["plots"][0]).read_bytes()[:4] == b"\x89PNG"
    assert (out / "results.md").read_text().startswith("# bench_quant")


def test_bench_serve_runs_clients_against_a_server(tiny_chat_dir, tmp_path):
    out = tmp_path / "serve.json"
    run = subprocess.run([sys.executable, str(TOOLS / "bench_serve.py"), "--model", str(tiny_chat_dir),
                          "--clients", "1,3", "--requests", "2", "--new-tokens", "12", "--max-batch", "2",
                          "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| clients | aggregate tok/s |" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["clients"], r["requests"], r["tokens"]) for r in rows] == [(1, 2, 24), (3, 6, 72)]
    for r in rows:
        assert r["tok_s"] > 0 and 0 < r["ttft_p50_s"] <= r["ttft_p95_s"] <= r["latency_p50_s"] * 10
    assert rows[1]["roofline_tok_s"] == pytest.approx(2 * rows[0]["roofline_tok_s"])  # 2 rows, not 3


def test_bench_generate_rows_and_cuda_only_impls(tiny_chat_dir, tmp_path, monkeypatch):
    base = [sys.executable, str(TOOLS / "bench_generate.py"), "--model", str(tiny_chat_dir), "--dtypes", "float32",
            "--new-tokens", "8", "--prefill", "32", "--repeats", "1"]
    run = subprocess.run([*base, "--impls", "transformers,minillama", "--speculative", "lookup",
                          "--json", str(tmp_path / "g.json")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "g.json").read_text())
    rows = result["rows"]
    spec = result["speculative"]  # both prompts, the target eager (minillama-compiled not asked for)
    assert [(r["task"], r["method"], r["compile"]) for r in spec] == [("quote", "lookup", False), ("story", "lookup", False)]
    assert all(r["same_tokens"] and r["spec_tok_s"] > 0 for r in spec) and "| quote | lookup |" in run.stdout
    assert [r["impl"] for r in rows] == ["transformers", "minillama"] and rows[1]["same_tokens_as_hf"]
    assert rows[1]["decode_tok_s"][0] > 0 and rows[1]["prefill_tok_s"][0] > 0
    # refused before anything loads (in this process: a second start would cost more than the check)
    sys.path.insert(0, str(TOOLS))
    try:
        import bench_generate
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(sys, "argv", [*base[1:], "--impls", "transformers,minillama-cudagraph"])
    with pytest.raises(SystemExit, match="minillama-cudagraph: .*needs CUDA"):
        bench_generate.main()
