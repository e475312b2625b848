"""The decoder with the fused Triton RMSNorm against the same decoder with the torch norm.

Runs in the TRITON_INTERPRET=1 process (see tests/test_kernels.py); on a machine with CUDA the
models live on the GPU and the kernels are compiled Triton.

Error rule (tests/test_kernels.py's, at model level): both models are compared with an fp64
reference of the same weights (the torch norm, in float64), and the Triton model may be at most
twice as far from it as the torch model of the same dtype, plus a small atol:
|triton - ref| <= 2 * |torch - ref| + atol, for the logits and for every parameter's gradient.
"""

from __future__ import annotations

import pytest
import torch

import minillama
from minillama.kernels import _common

pytestmark = pytest.mark.interpret
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# atol for the logits, which are O(1) here (|max| ~3): 1e-5 in fp32 (the old fused-vs-torch
# tolerance), 1e-2 in bf16 (below one bf16 ulp at the logits' size, 2^-6 in [2, 4)).
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# atol for a gradient, as a fraction of that parameter's largest reference gradient. The torch bf16
# model's own gradient error is ~1.5% of that, so 2x of it (not this) is what bounds the kernels.
GRAD_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return logits.double().logsumexp(-1).mean()


def _within_2x(ours: torch.Tensor, same_dtype: torch.Tensor, ref: torch.Tensor, atol: float,
               what: str) -> None:
    err = (ours.double() - ref).abs().max().item()
    base = (same_dtype.double() - ref).abs().max().item()
    assert err <= 2 * base + atol, f"{what}: error {err:.3g} > 2 * {base:.3g} (the torch norm's) + {atol:.3g}"


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    ("mistral", dict(num_key_value_heads=1, sliding_window=5)),
    # four norms a block, q/k norms over each head, Gemma's (1 + w) fp32 gain
    ("gemma3_text", dict(num_key_value_heads=2, head_dim=16, sliding_window=5, sliding_window_pattern=2,
                         query_pre_attn_scalar=24, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # norms after each sublayer (no fused add), q/k norms over the whole projection, fp32 gain
    ("olmo2", dict(num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_and_gradients_within_2x_of_the_torch_norm(triton_ran, make_hf, model_type, overrides, dtype):
    _, path = make_hf(model_type, **overrides)
    fused = minillama.from_pretrained(path, dtype=dtype, device=DEVICE, prepack=False)  # "rmsnorm": Triton
    plain = minillama.from_pretrained(path, dtype=dtype, device=DEVICE, norm="rmsnorm-torch", prepack=False)
    ref = minillama.from_pretrained(path, dtype=torch.float32, device=DEVICE, norm="rmsnorm-torch",
                                    prepack=False).double()
    assert type(fused.norm).__name__ == "FusedRMSNorm" and type(plain.norm).__name__ == "RMSNorm"
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    # Every norm site runs once per forward (pre, post, q/k and final): one launch each way.
    norms = sum(type(m).__name__ == "FusedRMSNorm" for m in fused.modules())
    assert norms == {"llama": 5, "mistral": 5, "gemma3_text": 13, "olmo2": 9}[model_type]
    logits = {}
    for name, model in (("fused", fused), ("plain", plain), ("ref", ref)):
        before = _common.LAUNCHES.copy()
        logits[name] = model(ids)
        _loss(logits[name]).backward()
        launched = _common.LAUNCHES - before
        if name == "fused":  # every norm ran the Triton kernels, forward and backward
            assert launched == {"rms_norm_fwd": norms, "rms_norm_bwd": norms}, launched
        else:
            assert not launched, f"the torch-norm model launched Triton kernels: {launched}"

    assert logits["fused"].dtype == dtype
    _within_2x(logits["fused"], logits["plain"], logits["ref"], ATOL[dtype], f"{dtype} logits")
    params = [dict(m.named_parameters()) for m in (fused, plain, ref)]
    assert params[0].keys() == params[1].keys() == params[2].keys()
    for name, r in params[2].items():
        a, b = params[0][name].grad, params[1][name].grad
        _within_2x(a, b, r.grad, GRAD_ATOL[dtype] * r.grad.abs().max().item(), f"{dtype} gradient of {name}")
