"""Next-token cross-entropy fused with the output projection, in row chunks.

The unfused loss materialises fp32 logits for every position (batch x seq x vocab: 200 MB for
SmolLM2 at 4 x 256 tokens), then a softmax of the same size, then their gradients. Here each
chunk of rows goes through projection, log-sum-exp, loss and the gradients of hidden states and
weight at once, in the forward pass, so only one chunk of logits is ever alive; backward just
scales the stored gradients. Rows that are not targets (prompt tokens, padding) are dropped
before the projection, so they cost nothing. Same FLOPs as the unfused path, no recompute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def shift_labels(ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Labels aligned with positions: labels[:, t] = ids[:, t + 1] where targets[:, t + 1], else IGNORE."""
    labels = torch.full_like(ids, IGNORE)
    nxt = ids[:, 1:] if targets is None else ids[:, 1:].masked_fill(~targets[:, 1:], IGNORE)
    labels[:, :-1] = nxt
    return labels


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        # Under autocast the projection runs in the autocast dtype, as an nn.Linear would.
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        w = weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], chunk):
            h, lab = hidden[start: start + chunk].to(dtype), labels[start: start + chunk]
            logits = (h @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(h.shape[0], device=h.device)
            loss += (lse - logits[rows, lab]).sum()
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[rows, lab] -= 1.0
            grad = grad.to(h.dtype)
            grad_hidden[start: start + chunk] = grad @ w
            grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss.to(grad_hidden.dtype), (grad_weight * grad_loss).to(ctx.weight_dtype),
                None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int = 1024) -> torch.Tensor:
    """sum over labelled rows of cross_entropy(hidden @ weight.T, labels) (labels == -100 ignored), in fp32.

    hidden: [N, d]; weight: [vocab, d]; labels: [N]. Equals F.cross_entropy(F.linear(hidden, weight)
    .float(), labels, reduction="sum") and its gradients, without materialising all the logits."""
    keep = (labels != IGNORE).nonzero().squeeze(1)
    if keep.numel() == 0:
        return (hidden.sum() * 0.0 + weight.sum() * 0.0).float()  # no targets: zero, still in the graph
    return _LinearCrossEntropy.apply(hidden.index_select(0, keep), weight, labels.index_select(0, keep), chunk)


def reference_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The unfused loss over logits [..., vocab]: what linear_cross_entropy must equal."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
