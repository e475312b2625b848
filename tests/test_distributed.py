"""Several processes on the CPU through `accelerate launch` (DDP over gloo): training and batch generation."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

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


def port_taken(output: str) -> bool:
    """Whether a launch failed because its rendezvous port was taken meanwhile."""
    return "address already in use" in output.lower() or "EADDRINUSE" in output


def on_a_free_port(run: Callable[[int], Any], output: Callable[[Any], str], tries: int = 3) -> Any:
    """run(port) on a port that was free a moment ago; again on another if something took it in
    between (another test, or another pytest-xdist worker, launching at the same time)."""
    for _ in range(tries - 1):
        result = run(free_port())
        if not port_taken(output(result)):
            return result
    return run(free_port())


def run_on_a_free_port(make_cmd: Callable[[int], list[str]], timeout: int = 600) -> subprocess.CompletedProcess:
    return on_a_free_port(lambda port: subprocess.run(make_cmd(port), capture_output=True, text=True, timeout=timeout),
                          lambda run: run.stdout + run.stderr)


def launch(script: str, *args: str, processes: int = 2) -> str:
    """`script` under `accelerate launch` with `processes` CPU processes on this machine: its output."""
    run = run_on_a_free_port(lambda port: [
        str(ACCELERATE), "launch", "--config_file", str(ROOT / "configs/accelerate/ddp-cpu.yaml"),
        "--num_processes", str(processes), "--main_process_port", str(port), str(ROOT / script), *args])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return run.stdout + run.stderr


def launch_machines(script: str, *args: str, machines: int = 2) -> list[str]:
    """`machines` simulated machines on this host: one `accelerate launch` each with the multi-node
    config (its --machine_rank, rank 0's address and port), one CPU process per machine. Returns
    each machine's output."""
    def run(port: int) -> list[tuple[subprocess.Popen, str]]:
        cmds = [[str(ACCELERATE), "launch", "--config_file", str(ROOT / "configs/accelerate/multinode-ddp.yaml"),
                 "--num_machines", str(machines), "--num_processes", str(machines), "--mixed_precision", "no",
                 "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                 str(ROOT / script), *args] for rank in range(machines)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in cmds]
        try:
            return [(proc, proc.communicate(timeout=600)[0]) for proc in procs]
        finally:
            for proc in procs:
                proc.kill()

    done = on_a_free_port(run, lambda runs: "".join(output for _, output in runs))
    procs, outputs = [proc for proc, _ in done], [output for _, output in done]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-5000:]
    return outputs


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny recipe, 30 steps on 2 DDP processes x 8 rows."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    launch("tools/finetune.py", "--config", str(ROOT / "configs/finetune/tiny.yaml"), "--out", str(out),
           "--max-steps", "30", "--no-progress", "--set", "batch_size=8", *SMALL)
    return out


@pytest.mark.slow
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


def resume_recipe(out: Path) -> list[str]:
    """The tiny recipe for 8 steps, saved every 4, into `out`."""
    return ["--config", str(ROOT / "configs/finetune/tiny.yaml"), "--out", str(out), "--max-steps", "8",
            "--save-every", "4", "--no-progress", "--set", "batch_size=4", "--set", "export=false", *SMALL]


@pytest.fixture
def straight(reference_run: Any) -> Path:
    """resume_recipe run straight through by 2 processes on one machine (conftest.reference_run)."""
    return reference_run("ddp-resume-recipe", lambda out: launch("tools/finetune.py", *resume_recipe(out)))


def assert_equals_straight_run(run: Path, straight: Path) -> None:
    """`run` (stopped and resumed) has the losses and weights of the straight run."""
    assert [r["step"] for r in metrics(run)] == list(range(1, 9))
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(straight)]
    a = json.loads((run / "summary.json").read_text())["weights_sha256_per_process"]
    b = json.loads((straight / "summary.json").read_text())["weights_sha256_per_process"]
    assert a == b and len(a) == 2 and len(set(a)) == 1


@pytest.mark.slow
def test_two_machines_stop_and_one_machine_resumes_like_the_straight_run(tmp_path: Path, straight: Path) -> None:
    """Two `accelerate launch`es with --num_machines 2 (machine ranks 0 and 1, rank 0's address)
    are one 2-process run: stopped after step 5 there and resumed by 2 processes on one machine, it
    has the losses and weights of the straight run. Only the main process writes the checkpoint;
    each rank reads its own RNG file. (Two launches, not four: the stop and the resume each run
    once, in different layouts of the same world size.)"""
    args = resume_recipe(tmp_path / "run")
    first = launch_machines("tools/finetune.py", *args, "--stop-after", "5")
    assert "2 process(es)" in first[0] and "minillama finetune" not in first[1]  # rank 1 stays quiet
    step5 = tmp_path / "run/checkpoints/step-000005"
    assert sorted(p.name for p in step5.iterdir()) == sorted([
        "model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json",
        "rng-rank0.safetensors", "rng-rank0.json", "rng-rank1.safetensors", "rng-rank1.json"])
    assert not list((tmp_path / "run/checkpoints").glob(".*"))  # no temporary directories left
    assert "(step 5)" in launch("tools/finetune.py", *args, "--resume")
    assert_equals_straight_run(tmp_path / "run", straight)


@pytest.mark.slow
def test_tensor_parallel_shards_equal_the_whole_model(make_hf, tmp_path: Path) -> None:
    """2 processes, each holding half of every projection (and half the KV heads): the logits of
    the whole model within fp32 tolerance, the same greedy tokens, eager and compiled."""
    dirs = [make_hf("llama", num_key_value_heads=2, tie_word_embeddings=True)[1],
            make_hf("mistral", num_key_value_heads=2, sliding_window=5)[1],
            make_hf("llama", num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True)[1]]
    out = tmp_path / "tp"
    launch("tests/tp_worker.py", str(out), *map(str, dirs))
    ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(2)]
    for per_rank in zip(*ranks, strict=True):
        for r in per_rank:
            assert r["max_logit_diff"] < 1e-4, r
            assert r["same_tokens"] and r["same_tokens_compiled"], r
            assert r["shard_bytes"] * 2 == r["full_bytes"]  # every projection matrix split in half
            assert r["local_heads"][0] * 2 == 4 and r["kv_cache_heads"] == r["local_heads"][1]
        assert per_rank[0]["tokens"] == per_rank[1]["tokens"]  # every process generates the same


@pytest.mark.slow
def test_cli_generate_tensor_parallel_prints_what_one_process_prints(tiny_chat_dir: Path, capsys) -> None:
    common = ["generate", "--model", str(tiny_chat_dir), "--prompt", "Hello", "-n", "12"]
    tp = run_on_a_free_port(lambda port: [
        str(ACCELERATE), "launch", "--config_file", str(ROOT / "configs/accelerate/ddp-cpu.yaml"),
        "--main_process_port", str(port), "-m", "minillama.cli", *common, "--tp", "2"], timeout=300)
    assert tp.returncode == 0, tp.stderr[-3000:]
    # One process (this one: the CLI's main, as the console script calls it).
    assert cli_main(common) == 0
    one = capsys.readouterr().out
    assert tp.stdout == one and one.strip()  # printed once, by the first process
    assert cli_main([*common, "--tp", "2"]) == 2
    assert "--tp 2 needs 2 processes; this launch has 1" in capsys.readouterr().err


def test_tensor_parallel_needs_divisible_heads_and_a_process_group(make_hf) -> None:
    from minillama import from_pretrained
    from minillama.config import ModelConfig
    from minillama.errors import ConfigError
    from minillama.parallel import shard_config

    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=1)
    with pytest.raises(ConfigError, match="num_key_value_heads \\(1\\) divisible by 2"):
        shard_config(cfg, 2)
    with pytest.raises(ConfigError, match="intermediate_size \\(96\\) divisible by 5"):
        shard_config(ModelConfig(vocab_size=64, hidden_size=80, intermediate_size=96, num_hidden_layers=1,
                                 num_attention_heads=5, num_key_value_heads=5), 5)
    with pytest.raises(ConfigError, match="torchrun or accelerate launch"):
        from_pretrained(make_hf("llama")[1], tensor_parallel=True)


@pytest.mark.slow
def test_batch_generation_across_processes_equals_each_prompt_alone(ddp_run: Path, tmp_path: Path) -> None:
    """2 processes, batches of 2 (left-padded): every completion is what `generate()` gives for
    that prompt on its own, greedy, in this process (so a bug common to every batch path shows)."""
    from minillama import from_pretrained, generate, load_tokenizer

    prompts = tmp_path / "prompts.jsonl"
    records = [{"prompt": "What is the capital of France?"}, {"prompt": "What is 7 times 8?"},
               {"messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "How many minutes are in 3 hours?"}]},
               {"prompt": "Spell \"river\" backwards."}, {"prompt": "What is the opposite of \"hot\"?"},
               {"prompt": "Hi"}, {"prompt": "How many meters are in 12 kilometers? Answer in one sentence."}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    final = ddp_run / "final"
    launch("tools/generate_batch.py", "--model", str(final), "--prompts", str(prompts), "-n", "24",
           "--batch-size", "2", "--out", str(tmp_path / "multi.jsonl"))
    multi = [json.loads(line) for line in (tmp_path / "multi.jsonl").read_text().splitlines()]
    assert [r["index"] for r in multi] == list(range(len(records)))
    assert [{k: r[k] for k in records[i]} for i, r in enumerate(multi)] == records

    model, tok = from_pretrained(final), load_tokenizer(final)
    eos = json.loads((final / "config.json").read_text())["eos_token_id"]  # (no generation_config.json here)
    stops = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    expected = []
    for record in records:
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = list(ids["input_ids"])
        new = generate(model, [ids], 24, temperature=0.0)[0, len(ids):].tolist()
        new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
        expected.append({"completion": tok.decode(new, skip_special_tokens=True), "new_tokens": len(new)})
    assert [{"completion": r["completion"], "new_tokens": r["new_tokens"]} for r in multi] == expected
    assert all(r["completion"] and r["new_tokens"] > 0 for r in multi)


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_exactly_and_exports(tmp_path: Path) -> None:
    """FSDP2-sharded parameters and AdamW state go through the same checkpoint and export code."""
    torchrun = Path(sys.executable).parent / "torchrun"
    run = run_on_a_free_port(lambda port: [str(torchrun), "--nproc_per_node", "2", "--master_port", str(port),
                                           str(ROOT / "tests/fsdp2_worker.py"), str(tmp_path)], timeout=300)
    assert run.returncode == 0, run.stderr[-5000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result-{rank}.json").read_text())
        assert result["resume_equal"], result
        assert result["export_max_diff"] < 1e-5, result
    assert sorted(p.name for p in (tmp_path / "checkpoints/step-000003").iterdir() if p.name.startswith("rng")) == [
        "rng-rank0.json", "rng-rank0.safetensors", "rng-rank1.json", "rng-rank1.safetensors"]
