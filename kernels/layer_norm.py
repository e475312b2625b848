"""Fused LayerNorm: y = (h - mean) / sqrt(var + eps) * weight + bias, h = x (+ residual).

The same structure as rms_norm.py (so the norm-swap benchmark compares Triton with Triton):
statistics in fp32, one rounding of the output to the input dtype (as torch's layer_norm does),
optional fused residual add, one-pass backward with deterministic fp32 dweight/dbias partials.
"""

import torch

from . import _common, cpu
from ._common import (BWD_STAGES, BWD_TILE_ELEMS, as_rows, bwd_grid, jit, launch_config, launch_guard, load_h,
                      row_bucket, tl, to_dtype, use_triton)



@jit
def _fwd_kernel(X, R, W, B, Y, H, MEAN, RSTD, stride_x, stride_r, stride_y, stride_h, M, N, eps,
                HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                SINGLE: tl.constexpr):
    if SINGLE:  # a tile of ROWS whole rows
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        cmask = cols < N
        mask = (rows < M)[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        h_ptrs = H + r64 * stride_h + cols[None, :] if HAS_RES else X + r64 * stride_x + cols[None, :]
        hf = load_h(X + r64 * stride_x + cols[None, :], R + r64 * stride_r + cols[None, :], h_ptrs, mask, HAS_RES)
        mean = tl.sum(hf, axis=1) / N
        diff = tl.where(mask, hf - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(diff * diff, axis=1) / N + eps)
        y = diff * rstd[:, None] * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + r64 * stride_y + cols[None, :], to_dtype(y, Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=rows < M)
        tl.store(RSTD + rows, rstd, mask=rows < M)
    else:  # one long row in chunks: mean, variance around it, then normalise
        row = tl.program_id(0).to(tl.int64)
        X += row * stride_x
        Y += row * stride_y
        R += row * stride_r
        H += row * stride_h
        H_or_X = H if HAS_RES else X  # where h lives once the residual add has been stored
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            acc += load_h(X + cols, R + cols, H + cols, cols < N, HAS_RES)
        mean = tl.sum(acc, axis=0) / N
        # Variance in a second pass around the mean: no E[x^2] - E[x]^2 cancellation.
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N
            diff = tl.where(mask, tl.load(H_or_X + cols, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
            acc += diff * diff
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N
            hf = tl.load(H_or_X + cols, mask=mask, other=0.0).to(tl.float32)
            y = (hf - mean) * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + cols, to_dtype(y, Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)


@jit
def _bwd_kernel(DY, DH, H, W, MEAN, RSTD, DX, DR, DW, DB, stride_dy, stride_dh, stride_h, stride_dx, stride_dr,
                M, N, rows_per_program,
                HAS_DH: tl.constexpr, STORE_DR: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK: tl.constexpr, ROWS: tl.constexpr, SINGLE: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    DW += pid.to(tl.int64) * N
    DB += pid.to(tl.int64) * N
    if SINGLE:  # tiles of ROWS whole rows, streamed
        cols = tl.arange(0, BLOCK)
        cmask = cols < N
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        db = tl.zeros([BLOCK], dtype=tl.float32)
        for tile in tl.range(row_start, row_end, ROWS, num_stages=STAGES):
            rows = tile + tl.arange(0, ROWS)
            rmask = rows < row_end
            mask = rmask[:, None] & cmask[None, :]
            r64 = rows.to(tl.int64)[:, None]
            h = tl.load(H + r64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)[:, None]
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)[:, None]
            xhat = tl.where(mask, (h - mean) * rstd, 0.0)
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
            g = dy * w[None, :]
            c1 = tl.sum(xhat * g, axis=1)[:, None] / N
            c2 = tl.sum(g, axis=1)[:, None] / N
            dx = (g - (xhat * c1 + c2)) * rstd
            if HAS_DH:
                dx += tl.load(DH + r64 * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + r64 * stride_dx + cols[None, :], to_dtype(dx, DX.dtype.element_ty), mask=mask)
            if STORE_DR:
                tl.store(DR + r64 * stride_dr + cols[None, :], to_dtype(dx, DR.dtype.element_ty), mask=mask)
        tl.store(DW + cols, dw, mask=cmask)
        if HAS_BIAS:
            tl.store(DB + cols, db, mask=cmask)
    else:
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(DW + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < N)
            if HAS_BIAS:
                tl.store(DB + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < N)
        for row in tl.range(row_start, row_end, num_stages=STAGES):
            row64 = tl.cast(row, tl.int64)
            mean = tl.load(MEAN + row64)
            rstd = tl.load(RSTD + row64)
            acc1 = tl.zeros([BLOCK], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, N, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < N
                h = tl.load(H + row64 * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                acc1 += tl.where(mask, (h - mean) * rstd, 0.0) * g
                acc2 += g
            c1 = tl.sum(acc1, axis=0) / N
            c2 = tl.sum(acc2, axis=0) / N
            for start in range(0, N, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < N
                h = tl.load(H + row64 * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (h - mean) * rstd, 0.0)
                g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                dx = (g - (xhat * c1 + c2)) * rstd
                if HAS_DH:
                    dx += tl.load(DH + row64 * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row64 * stride_dx + cols, to_dtype(dx, DX.dtype.element_ty), mask=mask)
                if STORE_DR:
                    tl.store(DR + row64 * stride_dr + cols, to_dtype(dx, DR.dtype.element_ty), mask=mask)
                tl.store(DW + cols, tl.load(DW + cols, mask=mask, other=0.0) + dy * xhat, mask=mask)
                if HAS_BIAS:
                    tl.store(DB + cols, tl.load(DB + cols, mask=mask, other=0.0) + dy, mask=mask)


def _fwd_torch(x, weight, bias, residual, eps):
    h = x if residual is None else x + residual
    hf = h.float()
    mean = hf.mean(-1, keepdim=True)
    rstd = torch.rsqrt((hf - mean).pow(2).mean(-1, keepdim=True) + eps)
    y = (hf - mean) * rstd * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(h.dtype), h, mean.squeeze(-1), rstd.squeeze(-1)


def _bwd_torch(dy, dh, h, weight, mean, rstd, has_bias):
    n = h.shape[-1]
    dyf = dy.float()
    rstd = rstd.unsqueeze(-1)
    xhat = (h.float() - mean.unsqueeze(-1)) * rstd
    g = dyf * weight.float()
    dx = (g - (xhat * (xhat * g).mean(-1, keepdim=True) + g.mean(-1, keepdim=True))) * rstd
    if dh is not None:
        dx = dx + dh.float()
    dw = (dyf * xhat).reshape(-1, n).sum(0).to(weight.dtype)
    db = dyf.reshape(-1, n).sum(0) if has_bias else None
    return dx.to(h.dtype), dw, db


def _fwd_triton(x, weight, bias, residual, eps):
    n = x.shape[-1]
    x2 = as_rows(x, n)
    r2 = as_rows(residual, n) if residual is not None else x2
    rows = x2.shape[0]
    h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((rows, n), dtype=h_dtype, device=x.device)
    h = torch.empty((rows, n), dtype=h_dtype, device=x.device) if residual is not None else y
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        cfg = launch_config(n, row_bucket(rows))
        w = weight.contiguous()
        with launch_guard(x, "layer_norm_fwd"):
            _fwd_kernel[(-(-rows // cfg.rows),)](
                x2, r2, w, bias.contiguous() if bias is not None else w, y, h, mean, rstd,
                x2.stride(0), r2.stride(0), y.stride(0), h.stride(0), rows, n, eps,
                HAS_RES=residual is not None, HAS_BIAS=bias is not None, BLOCK=cfg.block, ROWS=cfg.rows,
                SINGLE=cfg.single, num_warps=cfg.num_warps)
    shape = x.shape
    return y.view(shape), (h.view(shape) if residual is not None else x), mean.view(shape[:-1]), rstd.view(shape[:-1])


def _bwd_triton(dy, dh, h, weight, mean, rstd, has_bias, store_dr):
    n = h.shape[-1]
    dy2, h2 = as_rows(dy, n), as_rows(h, n)
    dh2 = as_rows(dh, n) if dh is not None else dy2
    rows = h2.shape[0]
    dx = torch.empty((rows, n), dtype=h.dtype, device=h.device)
    dr = torch.empty_like(dx) if store_dr else dx
    cfg = launch_config(n, row_bucket(max(rows, 1)), BWD_TILE_ELEMS)
    programs, per_program = bwd_grid(max(rows, 1), cfg, h.device)
    dw_part = torch.zeros((programs, n), dtype=torch.float32, device=h.device)
    db_part = torch.zeros((programs, n), dtype=torch.float32, device=h.device)
    if rows:
        with launch_guard(h, "layer_norm_bwd"):
            _bwd_kernel[(programs,)](
                dy2, dh2, h2, weight.contiguous(), mean.reshape(-1), rstd.reshape(-1),
                dx, dr, dw_part, db_part, dy2.stride(0), dh2.stride(0), h2.stride(0), dx.stride(0), dr.stride(0),
                rows, n, per_program, HAS_DH=dh is not None, STORE_DR=store_dr, HAS_BIAS=has_bias,
                BLOCK=cfg.block, ROWS=cfg.rows, SINGLE=cfg.single, STAGES=BWD_STAGES, num_warps=cfg.num_warps)
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0) if has_bias else None
    return dx.view(h.shape), (dr.view(h.shape) if store_dr else None), dw, db


def _fwd(x, weight, bias, residual, eps):
    """(y, h, mean, rstd) on the tensor's path: the Triton kernel or the torch code."""
    return (_fwd_triton if use_triton(x) else _fwd_torch)(x, weight, bias, residual, eps)


def _bwd(dy, dh, h, weight, mean, rstd, has_bias, has_residual):
    """(dx, dresidual or None, dweight, dbias or None) on the tensor's path."""
    if use_triton(h):
        return _bwd_triton(dy, dh, h, weight, mean, rstd, has_bias, has_residual)
    dx, dw, db = _bwd_torch(dy, dh, h, weight, mean, rstd, has_bias)
    return dx, (dx.clone() if has_residual else None), dw, db  # two gradients must never share storage


# ---------------------------------------------------------------- torch.library ops (what torch.compile sees)

@torch.library.custom_op("minillama::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, mean, rstd); h is x + residual (empty without residual)."""
    y, h, mean, rstd = _fwd(x, weight, bias, residual, eps)
    return y, (h if residual is not None else x.new_empty(0)), mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, residual, eps):
    h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    h = x.new_empty(x.shape, dtype=h_dtype) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape, dtype=h_dtype), h, stats, torch.empty_like(stats)


@torch.library.custom_op("minillama::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor,
                   mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool,
                   has_residual: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dresidual, dweight, dbias); dresidual/dbias are empty when absent."""
    dx, dr, dw, db = _bwd(dy, dh, h, weight, mean, rstd, has_bias, has_residual)
    # Distinct empty tensors: custom-op outputs may not alias each other.
    return dx, (dr if has_residual else h.new_empty(0)), dw, (db.to(weight.dtype) if has_bias else h.new_empty(0))


@layer_norm_bwd.register_fake
def _(dy, dh, h, weight, mean, rstd, has_bias, has_residual):
    return (torch.empty_like(h), torch.empty_like(h) if has_residual else h.new_empty(0), torch.empty_like(weight),
            torch.empty_like(weight) if has_bias else h.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy, dh, dmean, drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    dh = dh if ctx.has_residual and dh is not None and dh.numel() else None
    dx, dr, dw, db = layer_norm_bwd(dy, dh, h, weight, mean, rstd, ctx.has_bias, ctx.has_residual)
    return (dx, dw, (db.to(ctx.bias_dtype) if ctx.has_bias else None), (dr if ctx.has_residual else None), None)


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerLayerNorm(torch.autograd.Function):
    """Eager calls that need gradients: the same kernels without the custom-op dispatch (see rms_norm.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps):
        y, h, mean, rstd = _fwd(x, weight, bias, residual, eps)
        ctx.save_for_backward(h, weight, mean, rstd)
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.set_materialize_grads(False)  # an unused h gets no gradient: no zeros to read
        return (y, h) if residual is not None else y

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, weight, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(h)
        dx, dr, dw, db = _bwd(dy, dh, h, weight, mean, rstd, ctx.has_bias, ctx.has_residual)
        return dx, dw, (db.to(ctx.bias_dtype) if ctx.has_bias else None), dr, None


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5, *,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of x (or of h = x + residual, returning (y, h)) over the last dimension.

    Dispatch as rms_norm: the custom op under torch.compile, the kernels directly in eager code.
    """
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    if bias is not None and bias.shape != weight.shape:
        raise ValueError(f"bias shape {tuple(bias.shape)} != weight shape {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    eps = float(eps)
    if not _common.use_op(x):
        if cpu.applies(x, weight, residual, bias):  # eager CPU inference: one pass in C++
            y, h = cpu.layer_norm(x, weight, bias, residual, eps)
            return (y, h) if residual is not None else y
        y, h, _, _ = _fwd_torch(x, weight, bias, residual, eps)
    elif torch.compiler.is_compiling():
        y, h, _, _ = layer_norm_fwd(x, weight, bias, residual, eps)
    elif _common.needs_grad(x, weight, bias, residual):
        return _EagerLayerNorm.apply(x, weight, bias, residual, eps)
    else:
        y, h, _, _ = _fwd(x, weight, bias, residual, eps)
    return (y, h) if residual is not None else y
