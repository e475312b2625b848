"""Fine-tuning in one process: exact resume, export round trip into transformers, LoRA, bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file

from minillama import from_pretrained, generate
from minillama.errors import CheckpointError, ConfigError
from minillama.train import finetune, load_finetune_config
from minillama.train.checkpointing import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "configs/finetune/tiny.yaml"
FACTS = ROOT / "configs/finetune/data/facts-chat.jsonl"


@pytest.fixture
def small_data(tmp_path: Path) -> Path:
    """40 conversations: with 4 rows per step an epoch is 9 steps, so short runs cross epochs."""
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(FACTS.read_text().splitlines(keepends=True)[:40]))
    return path


# The tiny recipe, smaller still (a few seconds per run): as overrides, and as the same command-line flags.
TINY = {"model.config.hidden_size": 32, "model.config.intermediate_size": 64,
        "model.config.num_hidden_layers": 2, "model.config.num_attention_heads": 4,
        "model.config.num_key_value_heads": 2, "data.val_fraction": 0.1, "data.block_size": 384,
        "batch_size": 4, "max_steps": 14, "save_every": 4, "eval_every": 7, "optim.warmup_steps": 3}
TINY_FLAGS = [flag for key, value in TINY.items() for flag in ("--set", f"{key}={value}")]


def tiny(tmp_path: Path, data: Path, name: str, **overrides: Any):
    return load_finetune_config(TINY_RECIPE, {**TINY, "data.train": str(data), "out": str(tmp_path / name),
                                              **overrides})


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def straight_run(reference_run: Any, **overrides: Any) -> Path:
    """The tiny recipe's 14 steps (plus `overrides`) in one process, uninterrupted, on small_data's
    40 conversations: made once per session (conftest.reference_run) for every test that compares
    a stopped, killed or resumed run with it. Read only: copy it into tmp_path to write."""
    def run(out: Path) -> None:
        data = out.parent / "chat.jsonl"
        data.write_text("".join(FACTS.read_text().splitlines(keepends=True)[:40]))
        assert finetune(tiny(out.parent, data, out.name, **overrides), progress=False)["finished"]

    return reference_run("finetune-tiny" + "".join(f",{k}={v}" for k, v in sorted(overrides.items())), run)


@pytest.fixture
def straight(reference_run: Any) -> Path:
    return straight_run(reference_run)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_matches_uninterrupted_run(tmp_path: Path, small_data: Path, reference_run: Any,
                                          lora: bool) -> None:
    extra = {"lora.enabled": lora, "lora.dropout": 0.1} if lora else {}  # dropout: RNG state must resume too
    straight = straight_run(reference_run, **extra)
    # Stop after step 6 (mid-epoch: an epoch is 9 steps), then resume to 14.
    part = finetune(tiny(tmp_path, small_data, "resumed", stop_after=6, **extra), progress=False)
    assert not part["finished"] and part["export"] is None
    assert latest_checkpoint(tmp_path / "resumed/checkpoints").name == "step-000006"
    resumed = finetune(tiny(tmp_path, small_data, "resumed", resume="auto", **extra), progress=False)
    assert resumed["finished"]
    assert losses(tmp_path / "resumed") == losses(straight)  # exact floats, every step once
    assert [s for s, _ in losses(straight)] == list(range(1, 15))
    summary = json.loads((straight / "summary.json").read_text())
    assert resumed["weights_sha256_per_process"] == summary["weights_sha256_per_process"]
    a = load_file(straight / "final/model.safetensors")
    b = load_file(tmp_path / "resumed/final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight)[-1][1] < losses(straight)[0][1]


def test_export_loads_in_transformers_with_equal_logits(straight: Path) -> None:
    final = Path(json.loads((straight / "summary.json").read_text())["export"])
    assert final == straight / "final"
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(final)
    ours = from_pretrained(final)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
        out = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=-1, pad_token_id=0)
    assert torch.equal(out, generate(ours, ids, 8, eos_token_id=[]))  # the same greedy tokens
    # The exported weights are the trained ones, not the initial ones.
    ckpt = load_file(straight / "checkpoints/step-000014/model.safetensors")
    assert torch.equal(ckpt["embed.weight"], ours.embed.weight)


def test_lora_merge_equals_unmerged_model() -> None:
    from minillama import ModelConfig, Transformer
    from minillama.train.config import LoraSection
    from minillama.train.lora import apply_lora, merge_lora

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = apply_lora(Transformer(cfg).eval(), LoraSection(r=4, alpha=8, targets=["q_proj", "wo", "w_gate_up",
                                                                                     "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)  # adapters start at zero; make them matter
        ids = torch.randint(0, 100, (2, 12))
        unmerged = model(ids)
        merged = merge_lora(model)
        assert type(merged).__name__ == "Transformer" and not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(ids), unmerged, rtol=1e-5, atol=1e-5)
        assert (unmerged - Transformer(cfg).eval()(ids)).abs().max() > 1e-2


def test_lora_run_trains_only_adapters_and_exports_merged(tmp_path: Path, small_data: Path) -> None:
    cfg = tiny(tmp_path, small_data, "lora", max_steps=4, **{"lora.enabled": True, "optim.lr": 1e-2})
    summary = finetune(cfg, progress=False)
    saved = load_file(tmp_path / "lora/checkpoints/step-000004/model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    exported = load_file(Path(summary["export"]) / "model.safetensors")
    assert not any("lora" in k for k in exported)
    assert "model.layers.0.self_attn.q_proj.weight" in exported


def test_shorter_run_then_resume_with_more_steps_matches_straight_run(tmp_path: Path, small_data: Path,
                                                                     straight: Path) -> None:
    """The flow with the basic flags only: --max-steps 6, then --max-steps 14 --resume. The LR
    schedule spans the recipe's steps (optim.decay_steps), not the --max-steps override."""
    finetune(tiny(tmp_path, small_data, "two-part", max_steps=6, save_every=6), progress=False)
    summary = finetune(tiny(tmp_path, small_data, "two-part", resume="auto"), progress=False)
    assert losses(tmp_path / "two-part") == losses(straight)
    a = load_file(straight / "final/model.safetensors")
    b = load_file(Path(summary["export"]) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "two-part/checkpoints/step-000014/trainer_state.json").read_text())
    assert state["step"] == 14 and state["data_position"]["rows_seen"] == 14 * 4


def test_corrupt_newest_checkpoint_is_skipped(tmp_path: Path, small_data: Path, straight: Path) -> None:
    finetune(tiny(tmp_path, small_data, "run", stop_after=8), progress=False)
    root = tmp_path / "run/checkpoints"
    assert [p.name for p in sorted(root.iterdir())] == ["step-000004", "step-000008"]
    # A truncated file (a crash during a copy, a full disk) and a half-written temp dir.
    weights = root / "step-000008/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (root / ".step-000012.tmp").mkdir()
    with pytest.warns(UserWarning, match="step-000008.*truncated"):
        assert latest_checkpoint(root).name == "step-000004"
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        summary = finetune(tiny(tmp_path, small_data, "run", resume="auto"), progress=False)
    assert summary["finished"]
    assert [s for s, _ in losses(tmp_path / "run")] == list(range(1, 15))
    assert losses(tmp_path / "run") == losses(straight)  # resumed from step 4: steps 5-8 again, exactly


def test_resume_from_named_broken_checkpoint_is_an_error(tmp_path: Path, small_data: Path,
                                                        straight: Path) -> None:
    shutil.copytree(straight, tmp_path / "run")
    ckpt = tmp_path / "run/checkpoints/step-000014"
    (ckpt / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="step-000014: incomplete"):
        finetune(tiny(tmp_path, small_data, "run", resume=str(ckpt)), progress=False)


def test_existing_run_is_not_overwritten_without_resume(tmp_path: Path, small_data: Path,
                                                        straight: Path) -> None:
    shutil.copytree(straight, tmp_path / "run")
    with pytest.raises(ConfigError, match="pass --resume"):
        finetune(tiny(tmp_path, small_data, "run"), progress=False)
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step-000012", "step-000014"]
    assert losses(tmp_path / "run") == losses(straight)  # nothing of the run was touched


def test_text_data_gradient_accumulation_and_bf16(tmp_path: Path) -> None:
    text = tmp_path / "book.txt"
    text.write_text(" ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(300)))
    cfg = tiny(tmp_path, text, "text", max_steps=6, grad_accum=2, mixed_precision="bf16",
               gradient_checkpointing=True, **{"data.block_size": 64})
    summary = finetune(cfg, progress=False)
    rows = losses(tmp_path / "text")
    assert summary["finished"] and rows[-1][1] < rows[0][1]
    assert (tmp_path / "text/metrics.csv").read_text().startswith("step,epoch,loss")
    assert (tmp_path / "text/loss.png").stat().st_size > 1000


def test_stop_after_past_max_steps_and_keep_last(tmp_path: Path, small_data: Path) -> None:
    finetune(tiny(tmp_path, small_data, "run", max_steps=9, save_every=2, keep_last=2), progress=False)
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step-000008", "step-000009"]


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    from minillama import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)).train()
    ids = torch.randint(0, 50, (2, 10))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(ids).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_lora_on_smollm2_exports_a_checkpoint_transformers_reads(tmp_path: Path, smollm2_dir: Path,
                                                                 small_data: Path) -> None:
    cfg = load_finetune_config(ROOT / "configs/finetune/smollm2-chat.yaml", {
        "model.path": str(smollm2_dir), "data.train": str(small_data), "data.block_size": 192, "batch_size": 2,
        "grad_accum": 1, "max_steps": 2, "eval_every": 0, "eval_max_batches": 1, "out": str(tmp_path / "run")})
    summary = finetune(cfg, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(summary["export"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(summary["export"])
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(summary["export"])(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
        base = from_pretrained(smollm2_dir)(ids)
    assert (hf(ids).logits - base).abs().max() > 1e-4  # the adapters were trained and merged
    assert tok.chat_template == load_tokenizer_template(smollm2_dir)


def load_tokenizer_template(path: Path) -> str:
    from minillama import load_tokenizer

    return load_tokenizer(path).chat_template


KILL_AFTER_STEP_6 = textwrap.dedent("""
    import sys, time
    from minillama.cli import main
    from minillama.train.metrics import MetricsLog
    real = MetricsLog.log
    def log(self, row):
        real(self, row)
        if row["step"] == 6:  # past the checkpoint of step 4: steps 5 and 6 are logged, then lost
            print("HANGING", file=sys.stderr, flush=True)
            time.sleep(600)
    MetricsLog.log = log
    sys.exit(main(["finetune", *sys.argv[1:]]))
""")


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path: Path, small_data: Path, straight: Path) -> None:
    """SIGKILL a real run (a subprocess) after step 6 is logged (its last checkpoint: step 4), then
    --resume: the same losses as straight through, every step logged once, even with a
    half-written metrics line."""
    args = ["--config", str(TINY_RECIPE), "--no-progress", "--set", f"data.train={small_data}", *TINY_FLAGS,
            "--set", "export=false", "--out", str(tmp_path / "killed")]
    proc = subprocess.Popen([sys.executable, "-c", KILL_AFTER_STEP_6, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        err = []
        for line in proc.stderr:  # the run's own lines, then the marker
            err.append(line)
            if line.strip() == "HANGING":
                break
        assert err and err[-1].strip() == "HANGING", "".join(err)[-3000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    out = tmp_path / "killed"
    assert [s for s, _ in losses(out)] == list(range(1, 7))  # really cut short, past its last checkpoint...
    assert latest_checkpoint(out / "checkpoints").name == "step-000004"
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "lo')  # ...and as if killed mid-write
    done = subprocess.run([sys.executable, str(ROOT / "tools/finetune.py"), *args, "--resume"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "(step 4)" in done.stderr
    assert losses(out) == losses(straight)  # the one-process straight run, made in this process
    assert [s for s, _ in losses(out)] == list(range(1, 15))


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_and_resume_exactly(tmp_path: Path, small_data: Path,
                                                            straight: Path) -> None:
    """compile: true (regional compilation, one compiled graph for every block): the losses of the
    eager run, and a stop + resume gives the uninterrupted compiled run exactly."""
    finetune(tiny(tmp_path, small_data, "compiled", max_steps=6, compile=True), progress=False)
    # The eager run: the straight run's first 6 steps (the LR schedule follows the recipe's max_steps).
    eager, compiled = losses(straight)[:6], losses(tmp_path / "compiled")
    assert [s for s, _ in compiled] == [s for s, _ in eager] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([loss for _, loss in compiled]), torch.tensor([loss for _, loss in eager]),
                               rtol=1e-5, atol=0)
    finetune(tiny(tmp_path, small_data, "resumed", max_steps=6, compile=True, stop_after=3), progress=False)
    finetune(tiny(tmp_path, small_data, "resumed", max_steps=6, compile=True, resume="auto"), progress=False)
    assert losses(tmp_path / "resumed") == compiled

