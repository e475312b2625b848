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
