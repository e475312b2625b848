"""Fine-tuning data and recipes: assistant-only targets, packing, the step sampler, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minillama.errors import ConfigError
from minillama.tokenizer import byte_tokenizer, load_tokenizer
from minillama.train.config import load_finetune_config, parse_override
from minillama.train.data import StepSampler, build_datasets, chat_example, collate, load_examples, pack_text

ROOT = Path(__file__).resolve().parents[1]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "2 plus 2 is 4."},
    {"role": "user", "content": "And the capital of Peru?"},
    {"role": "assistant", "content": "The capital of Peru is Lima."},
]


def target_text(tokenizer, messages) -> str:
    ex = chat_example(tokenizer, messages)
    assert len(ex.ids) == len(ex.targets)
    return tokenizer.decode([t for t, keep in zip(ex.ids, ex.targets, strict=True) if keep])


def test_chat_targets_are_the_assistant_turns_byte_tokenizer() -> None:
    tok = byte_tokenizer()
    assert target_text(tok, CONVERSATION) == "2 plus 2 is 4.<|im_end|>\nThe capital of Peru is Lima.<|im_end|>\n"
    ex = chat_example(tok, CONVERSATION)
    full = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(ex.ids) == full


@pytest.mark.slow
def test_chat_targets_are_the_assistant_turns_smollm2(smollm2_dir: Path) -> None:
    tok = load_tokenizer(smollm2_dir)
    # SmolLM2's template inserts its own system prompt when there is none: never a target.
    text = target_text(tok, CONVERSATION[1:])
    assert text == "2 plus 2 is 4.<|im_end|>\nThe capital of Peru is Lima.<|im_end|>\n"


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_jsonl_line_is_named(tmp_path: Path) -> None:
    good = json.dumps({"messages": CONVERSATION})
    path = write(tmp_path / "d.jsonl", [good, good, '{"messages": [', good])
    with pytest.raises(ConfigError, match=r"d\.jsonl:3: not valid JSON"):
        load_examples(path, byte_tokenizer(), "auto", 256)
    path = write(tmp_path / "e.jsonl", [good, json.dumps({"messages": [{"role": "robot", "content": "x"}]})])
    with pytest.raises(ConfigError, match=r"e\.jsonl:2: messages\[0\] has role 'robot'"):
        load_examples(path, byte_tokenizer(), "auto", 256)
    path = write(tmp_path / "f.jsonl", [good, json.dumps({"text": "hello"})])
    with pytest.raises(ConfigError, match=r"f\.jsonl:2: missing key 'messages'"):
        load_examples(path, byte_tokenizer(), "auto", 256)


def test_empty_dataset_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="empty dataset"):
        load_examples(write(tmp_path / "empty.jsonl", [""]), byte_tokenizer(), "auto", 256)
    with pytest.raises(ConfigError, match="empty dataset"):
        load_examples(write(tmp_path / "empty.txt", ["  "]), byte_tokenizer(), "auto", 256)
    with pytest.raises(ConfigError, match="no such data file"):
        load_examples(tmp_path / "nope.jsonl", byte_tokenizer(), "auto", 256)
    only_users = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(ConfigError, match="no conversation has an assistant turn"):
        with pytest.warns(UserWarning, match="no assistant tokens"):
            load_examples(write(tmp_path / "u.jsonl", [only_users]), byte_tokenizer(), "auto", 256)


def test_long_conversations_are_truncated_with_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [json.dumps({"messages": CONVERSATION})] * 3)
    with pytest.warns(UserWarning, match="3 of 3 conversations are longer than block_size 100"):
        examples = load_examples(path, byte_tokenizer(), "chat", 100)
    assert all(len(ex.ids) == 100 and ex.n_targets > 0 for ex in examples)


def test_text_is_packed_into_blocks_with_eos_between_documents(tmp_path: Path) -> None:
    tok = byte_tokenizer()
    blocks = pack_text(tok, ["abcdef", "ghij"], 4)
    assert [len(b.ids) for b in blocks] == [4, 4, 4]  # 6 + eos + 4 + eos = 12 tokens
    assert blocks[1].ids[2] == tok.eos_token_id and all(all(b.targets) for b in blocks)
    path = write(tmp_path / "t.jsonl", [json.dumps({"text": "abcdef"}), json.dumps({"text": "ghij"})])
    assert [b.ids for b in load_examples(path, tok, "auto", 4)] == [b.ids for b in blocks]


def test_validation_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    from minillama.train.config import DataSection

    path = write(tmp_path / "d.jsonl", [json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                                  {"role": "assistant", "content": f"a{i}"}]})
                                        for i in range(50)])
    data = DataSection(train=str(path), val_fraction=0.1, block_size=64)
    train, val = build_datasets(data, byte_tokenizer(), seed=0)
    assert len(train) == 45 and len(val) == 5
    assert not {tuple(e.ids) for e in train} & {tuple(e.ids) for e in val}
    again, val2 = build_datasets(data, byte_tokenizer(), seed=0)
    assert [e.ids for e in val2] == [e.ids for e in val]


def test_step_sampler_is_a_function_of_seed_and_step() -> None:
    sampler = StepSampler(10, 4, seed=3)
    stream = [i for step in range(5) for i in sampler.rows(step)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))  # epochs
    fresh = StepSampler(10, 4, seed=3)
    assert fresh.rows(3) == sampler.rows(3)  # a resumed run jumps straight to step 3
    assert StepSampler(10, 4, seed=4).rows(0) != sampler.rows(0)


def test_collate_pads_right_and_never_targets_padding() -> None:
    from minillama.train.data import Example

    ids, targets = collate([Example([1, 2, 3], [False, True, True]), Example([4], [True])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert targets.tolist() == [[False, True, True], [True, False, False]]


def test_recipe_unknown_key_and_bad_values_are_named(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  path: default\ndata:\n  train: d.jsonl\noptim:\n  lrr: 1e-4\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: unknown key 'optim\.lrr' \(did you mean optim\.lr\?\)"):
        load_finetune_config(recipe)
    recipe.write_text("model:\n  path: default\ndata:\n  train: d.jsonl\nbatch_size: many\n")
    with pytest.raises(ConfigError, match=r"batch_size: expected int, got 'many'"):
        load_finetune_config(recipe)
    recipe.write_text("model:\n  path: default\ndata:\n  train: d.jsonl\nmixed_precision: fp8\n")
    with pytest.raises(ConfigError, match="mixed_precision must be one of"):
        load_finetune_config(recipe)
    with pytest.raises(ConfigError, match="unknown key 'max_stepz'"):
        load_finetune_config(ROOT / "configs/finetune/tiny.yaml", {"max_stepz": 3})
    with pytest.raises(ConfigError, match="no such config file"):
        load_finetune_config(tmp_path / "missing.yaml")


def test_recipe_paths_are_relative_to_the_file_and_overrides_merge() -> None:
    cfg = load_finetune_config(ROOT / "configs/finetune/tiny.yaml",
                               dict([parse_override("optim.lr=1e-4"), parse_override("model.config.hidden_size=32")]))
    assert Path(cfg.data.train) == ROOT / "configs/finetune/data/facts-chat.jsonl"
    assert cfg.optim.lr == 1e-4  # YAML reads "1e-4" as a string; still a float here
    assert cfg.model.config["hidden_size"] == 32 and cfg.model.config["num_hidden_layers"] == 2
    assert load_finetune_config(ROOT / "configs/finetune/smollm2-chat.yaml").lora.enabled


@pytest.mark.parametrize("args, message", [
    (["--set", "optim.lrr=1"], "unknown key 'optim.lrr' (did you mean optim.lr?)"),
    (["--set", "data.train={bad}"], "d.jsonl:2: not valid JSON"),
    (["--max-steps", "0"], "max_steps must be >= 1, got 0"),
    (["--resume", "{out}/nope"], "nope: no such checkpoint directory"),
])
def test_finetune_cli_errors_are_one_line(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    from minillama.cli import main

    bad = tmp_path / "d.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{oops\n')
    args = [a.format(bad=bad, out=tmp_path) for a in args]
    code = main(["finetune", "--config", str(ROOT / "configs/finetune/tiny.yaml"), "--out", str(tmp_path / "o"),
                 "--no-progress", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("minillama: error: ") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_generate_batch_bad_prompt_file_is_one_line(tmp_path: Path, capsys) -> None:
    from minillama.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"question": "no prompt key"}\n')
    model = tmp_path / "m"
    from minillama import ModelConfig, Transformer, save_pretrained

    save_pretrained(Transformer(ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)),
                    model, tokenizer=byte_tokenizer())
    code = main(["generate-batch", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and 'p.jsonl:2: expected a non-empty "prompt"' in err[-1]
    assert not (tmp_path / "o").exists()
