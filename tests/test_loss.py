"""The fused projection + cross-entropy equals the unfused loss and its gradients."""

from __future__ import annotations

import pytest
import torch

from minillama.loss import IGNORE, linear_cross_entropy, reference_cross_entropy, shift_labels


def test_shift_labels() -> None:
    ids = torch.tensor([[5, 6, 7, 8]])
    targets = torch.tensor([[False, False, True, True]])
    assert shift_labels(ids, targets).tolist() == [[IGNORE, 7, 8, IGNORE]]
    assert shift_labels(ids).tolist() == [[6, 7, 8, IGNORE]]


@pytest.mark.parametrize("chunk", [3, 1024])
def test_linear_cross_entropy_matches_unfused_fp32(chunk: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(50, 16).requires_grad_()
    labels = torch.randint(0, 50, (37,))
    labels[::4] = IGNORE
    loss = linear_cross_entropy(hidden, weight, labels, chunk=chunk)
    (2.5 * loss).backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = reference_cross_entropy(hidden @ weight.t(), labels)
    (2.5 * ref).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, hidden.grad)
    torch.testing.assert_close(gw, weight.grad)


def test_linear_cross_entropy_under_bf16_autocast_matches_linear() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(20, 32).requires_grad_()
    weight = torch.randn(64, 32).requires_grad_()
    labels = torch.randint(0, 64, (20,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, chunk=8)
        ref = reference_cross_entropy(torch.nn.functional.linear(hidden, weight), labels)
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-2)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(gh, rh, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw, rw, rtol=2e-2, atol=2e-2)


def test_no_targets_gives_zero_with_gradients() -> None:
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.full((4,), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def test_model_loss_equals_loss_of_its_logits() -> None:
    from minillama import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=90, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    ids = torch.randint(0, 90, (3, 11))
    targets = torch.rand(3, 11) > 0.3
    labels = shift_labels(ids, targets)
    fused = model(ids, labels=labels)
    g_fused = torch.autograd.grad(fused, list(model.parameters()))
    ref = reference_cross_entropy(model(ids), labels)
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(fused, ref)
    for a, b in zip(g_fused, g_ref, strict=True):
        torch.testing.assert_close(a, b)
