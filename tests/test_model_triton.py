"""The decoder with the fused Triton RMSNorm (interpreted on the CPU) against the torch norm.

Runs in the TRITON_INTERPRET=1 process (see tests/test_kernels.py).
"""

from __future__ import annotations

import pytest
import torch

import minillama

pytestmark = pytest.mark.interpret


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    ("mistral", dict(num_key_value_heads=1, sliding_window=5)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_and_gradients_equal_the_torch_norm(make_hf, model_type, overrides, dtype):
    _, path = make_hf(model_type, **overrides)
    fused = minillama.from_pretrained(path, dtype=dtype)  # "rmsnorm": Triton under the interpreter
    plain = minillama.from_pretrained(path, dtype=dtype, norm="rmsnorm-torch")
    assert type(fused.norm).__name__ == "FusedRMSNorm" and type(plain.norm).__name__ == "RMSNorm"
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    out = [m(ids) for m in (fused, plain)]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(out[0], out[1], **tol)
    for o in out:
        o.float().logsumexp(-1).mean().backward()
    for (name, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters(), strict=True):
        scale = b.grad.abs().max().item() + 1e-6
        assert (a.grad - b.grad).abs().max().item() <= (1e-4 if dtype == torch.float32 else 0.1) * scale, name
