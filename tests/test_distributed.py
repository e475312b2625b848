"""Several processes on the CPU through `accelerate launch` (DDP over gloo): training and batch generation."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillama.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
SMALL = ["--set", "model.config.hidden_size=64", "--set", "model.config.intermediate_size=128",
         "--set", "data.block_size=384", "--set", "eval_every=10", "--set", "optim.warmup_steps=5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, *args: str, processes: int = 2) -> None:
    cmd = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "configs/accelerate/ddp-cpu.yaml"),
           "--num_processes", str(processes), "--main_process_port", str(free_port()), str(ROOT / script), *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny recipe, 30 steps on 2 DDP processes x 8 rows."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    launch("tools/finetune.py", "--config", str(ROOT / "configs/finetune/tiny.yaml"), "--out", str(out),
           "--max-steps", "30", "--no-progress", "--set", "batch_size=8", *SMALL)
    return out


def test_ddp_two_processes_train_in_sync(ddp_run: Path, tmp_path: Path) -> None:
    summary = json.loads((ddp_run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["rows_per_step"] == 16 and summary["finished"]
    digests = summary["weights_sha256_per_process"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks hold equal weights
    rows = metrics(ddp_run)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert rows[-1]["val_loss"] < rows[9]["val_loss"]
    assert (ddp_run / "final/model.safetensors").is_file()

    # One process with the whole 16-row batch computes the same steps (up to summation order).
    cli_main(["finetune", "--config", str(ROOT / "configs/finetune/tiny.yaml"), "--out", str(tmp_path / "one"),
              "--max-steps", "30", "--stop-after", "10", "--no-progress", "--set", "batch_size=16", *SMALL])
    single = [r["loss"] for r in metrics(tmp_path / "one")]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in rows[:10]]), torch.tensor(single),
                               rtol=1e-5, atol=0)


def test_ddp_resume_after_stop(tmp_path: Path) -> None:
    args = ["--config", str(ROOT / "configs/finetune/tiny.yaml"), "--out", str(tmp_path / "run"), "--max-steps", "8",
            "--save-every", "4", "--no-progress", "--set", "batch_size=4", "--set", "export=false", *SMALL]
    launch("tools/finetune.py", *args, "--stop-after", "5")
    launch("tools/finetune.py", *args, "--resume")
    straight = tmp_path / "straight"
    launch("tools/finetune.py", *[a if a != str(tmp_path / "run") else str(straight) for a in args])
    assert [r["loss"] for r in metrics(tmp_path / "run")] == [r["loss"] for r in metrics(straight)]
    a = json.loads((tmp_path / "run/summary.json").read_text())["weights_sha256_per_process"]
    b = json.loads((straight / "summary.json").read_text())["weights_sha256_per_process"]
    assert a == b and len(set(a)) == 1


def test_batch_generation_across_processes_equals_one_process(ddp_run: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    records = [{"prompt": "What is the capital of France?"}, {"prompt": "What is 7 times 8?"},
               {"messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "How many minutes are in 3 hours?"}]},
               {"prompt": "Spell \"river\" backwards."}, {"prompt": "What is the opposite of \"hot\"?"},
               {"prompt": "Hi"}, {"prompt": "How many meters are in 12 kilometers? Answer in one sentence."}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = ["--model", str(ddp_run / "final"), "--prompts", str(prompts), "-n", "24", "--batch-size", "2"]
    launch("tools/generate_batch.py", *common, "--out", str(tmp_path / "multi.jsonl"))
    assert cli_main(["generate-batch", *common, "--out", str(tmp_path / "single.jsonl")]) == 0
    multi = [json.loads(line) for line in (tmp_path / "multi.jsonl").read_text().splitlines()]
    single = [json.loads(line) for line in (tmp_path / "single.jsonl").read_text().splitlines()]
    assert multi == single
    assert [r["index"] for r in multi] == list(range(len(records)))
    assert [{k: r[k] for k in records[i]} for i, r in enumerate(multi)] == records
    assert all(r["completion"] and r["new_tokens"] > 0 for r in multi)


def test_fsdp2_checkpoint_resumes_exactly_and_exports(tmp_path: Path) -> None:
    """FSDP2-sharded parameters and AdamW state go through the same checkpoint and export code."""
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests/fsdp2_worker.py"), str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-5000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result-{rank}.json").read_text())
        assert result["resume_equal"], result
        assert result["export_max_diff"] < 1e-5, result
    assert sorted(p.name for p in (tmp_path / "checkpoints/step-000003").iterdir() if p.name.startswith("rng")) == [
        "rng-rank0.json", "rng-rank0.safetensors", "rng-rank1.json", "rng-rank1.safetensors"]
