"""Incremental decoding through the static KV cache equals the full forward pass."""

from __future__ import annotations

import pytest
import torch

import minillama


def _ids(batch: int, seq: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict(num_key_value_heads=2)),
    ("llama", dict(num_key_value_heads=1, head_dim=24, attention_bias=True)),
    ("mistral", dict(num_key_value_heads=2, sliding_window=4)),  # decoding runs well past the window
])
def test_token_by_token_equals_full_forward(make_hf, model_type, overrides):
    _, path = make_hf(model_type, **overrides)
    model = minillama.from_pretrained(path)
    ids = _ids(2, 20)
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(max_batch_size=2, max_seq_len=32)
        prefill = 5
        steps = [model(ids[:, :prefill], torch.arange(prefill))]
        for pos in range(prefill, ids.shape[1]):
            steps.append(model(ids[:, pos : pos + 1], torch.tensor([pos])))
    incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental, full)
    assert torch.equal(incremental.argmax(-1), full.argmax(-1))


def test_cache_reused_for_a_smaller_batch(make_hf):
    _, path = make_hf("llama", num_key_value_heads=2)
    model = minillama.from_pretrained(path)
    ids = _ids(1, 8)
    with torch.no_grad():
        model.setup_cache(max_batch_size=4, max_seq_len=16)
        got = model(ids, torch.arange(8))
        torch.testing.assert_close(got, model(ids))


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict(num_key_value_heads=2)),
    ("mistral", dict(num_key_value_heads=2, sliding_window=4)),
])
def test_left_padding_equals_unpadded(make_hf, model_type, overrides):
    """A left-padded row (padding mask + shifted RoPE positions) gives the logits it gets alone."""
    _, path = make_hf(model_type, **overrides)
    model = minillama.from_pretrained(path)
    long, short = _ids(1, 10, seed=4), _ids(1, 6, seed=5)
    pad = long.shape[1] - short.shape[1]
    batch = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1)])
    padding_mask = torch.ones_like(batch)
    padding_mask[1, :pad] = 0
    position_ids = (padding_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(batch, position_ids=position_ids, padding_mask=padding_mask)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[0], model(long)[0])
        torch.testing.assert_close(got[1, pad:], model(short)[0])


def test_input_pos_without_cache_is_an_error(make_hf):
    _, path = make_hf("llama")
    model = minillama.from_pretrained(path)
    with pytest.raises(minillama.GenerationError, match="setup_cache"):
        model(_ids(1, 4), torch.arange(4))


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict(num_key_value_heads=2)),
    ("mistral", dict(num_key_value_heads=2, sliding_window=4)),
])
def test_rows_at_their_own_slots_equal_each_row_alone(make_hf, model_type, overrides):
    """Continuous batching's forward: each row prefilled into its own cache row (cache_rows), then
    decoded together with per-row slots ([batch, 1] input_pos, host-known kv_len)."""
    _, path = make_hf(model_type, **overrides)
    model = minillama.from_pretrained(path)
    prompts = [_ids(1, n, seed=n)[0].tolist() for n in (3, 9, 6)]
    alone = []
    with torch.no_grad():
        for p in prompts:
            model.setup_cache(1, 32)
            logits = [model(torch.tensor([p]), torch.arange(len(p)))[:, -1]]
            for t in range(6):
                logits.append(model(logits[-1].argmax(-1, keepdim=True), torch.tensor([len(p) + t]))[:, -1])
            alone.append(torch.cat(logits))
        model.setup_cache(4, 32)
        together = [[model(torch.tensor([p]), torch.arange(len(p)), cache_rows=torch.tensor([r + 1]))[:, -1]]
                    for r, p in enumerate(prompts)]
        for t in range(6):
            tokens = torch.cat([torch.zeros(1, 1, dtype=torch.long)]  # row 0: idle
                               + [rows[-1].argmax(-1, keepdim=True) for rows in together])
            slots = torch.tensor([[0]] + [[len(p) + t] for p in prompts])
            out = model(tokens, slots, kv_len=int(slots.max()) + 1)[:, -1]
            for r in range(3):
                together[r].append(out[r + 1:r + 2])
    for r in range(3):
        torch.testing.assert_close(torch.cat(together[r]), alone[r], rtol=1e-4, atol=1e-4)


def test_bad_slots_rows_and_kv_len_are_refused(make_hf):
    _, path = make_hf("llama")
    model = minillama.from_pretrained(path)
    model.setup_cache(2, 16)
    one = torch.tensor([[1]])
    with pytest.raises(minillama.GenerationError, match="kv_len 3 must cover the slots written"):
        model(one, torch.tensor([5]), kv_len=3)
    with pytest.raises(minillama.GenerationError, match="cache_rows: row 2 is outside"):
        model(one, torch.tensor([5]), cache_rows=torch.tensor([2]))
    with pytest.raises(minillama.GenerationError, match="input_pos must hold one slot per token"):
        model(one, torch.tensor([[5, 6]]))
