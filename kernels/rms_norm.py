"""Fused RMSNorm: y = x / sqrt(mean(x^2) + eps) * (weight + offset), with an optional residual add.

Numerics (both paths): h = x + residual in promote(x.dtype, residual.dtype), as an unfused model
adds (a bf16 sublayer output onto an fp32 residual stream stays fp32); statistics and
normalisation in fp32; the normalised value rounded to h's dtype (HF Llama casting,
transformers#33133) unless fp32_gain, which multiplies the fp32 value (Gemma, OLMo 2: "cast
after"); (weight + offset) formed in fp32, so Gemma's 1 + w never rounds to 1 in bf16; the
product rounded once to promote(h.dtype, weight.dtype). Rows of any length: a q/k norm runs on
[tokens * heads, head_dim] rows, several to a program.

Forward reads x (and residual) once and writes y (and h) once, keeping the fp32 1/rms per row;
short rows go several to a program (see _common.launch_config). Backward is one streaming pass
over the rows by a persistent grid sized from the SM count: dx (and d-residual) per row, dweight
as fp32 partial sums, one row of partials per program, summed in a fixed order afterwards:
deterministic.
"""

import torch
import torch.nn.functional as F

from . import _common, cpu
from ._common import (BWD_STAGES, BWD_TILE_ELEMS, as_rows, bwd_grid, jit, launch_config, launch_guard, load_h,
                      row_bucket, tl, to_dtype, use_triton)



# ---------------------------------------------------------------- Triton kernels

@jit
def _fwd_kernel(X, R, W, Y, H, RSTD, stride_x, stride_r, stride_y, stride_h, M, N, eps, offset,
                HAS_RES: tl.constexpr, FP32_GAIN: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                SINGLE: tl.constexpr):
    if SINGLE:  # a tile of ROWS whole rows
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        r64 = rows.to(tl.int64)[:, None]
        h_ptrs = H + r64 * stride_h + cols[None, :] if HAS_RES else X + r64 * stride_x + cols[None, :]
        hf = load_h(X + r64 * stride_x + cols[None, :], R + r64 * stride_r + cols[None, :], h_ptrs, mask, HAS_RES)
        rstd = tl.rsqrt(tl.sum(hf * hf, axis=1) / N + eps)
        normed = hf * rstd[:, None]
        if not FP32_GAIN:
            normed = to_dtype(normed, h_ptrs.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32) + offset
        tl.store(Y + r64 * stride_y + cols[None, :], to_dtype(normed * w[None, :], Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=rows < M)
    else:  # one long row in chunks: sum of squares, then normalise (h re-read from where it lives)
        row = tl.program_id(0).to(tl.int64)
        X += row * stride_x
        Y += row * stride_y
        R += row * stride_r
        H += row * stride_h
        H_or_X = H if HAS_RES else X
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            hf = load_h(X + cols, R + cols, H + cols, cols < N, HAS_RES)
            acc += hf * hf
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N
            hf = tl.load(H_or_X + cols, mask=mask, other=0.0).to(tl.float32)
            normed = hf * rstd
            if not FP32_GAIN:
                normed = to_dtype(normed, H_or_X.dtype.element_ty).to(tl.float32)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
            tl.store(Y + cols, to_dtype(normed * w, Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)


@jit
def _bwd_kernel(DY, DH, H, W, RSTD, DX, DR, DW, stride_dy, stride_dh, stride_h, stride_dx, stride_dr,
                M, N, offset, rows_per_program,
                HAS_DH: tl.constexpr, STORE_DR: tl.constexpr, FP32_GAIN: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                SINGLE: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    DW += pid.to(tl.int64) * N
    if SINGLE:  # tiles of ROWS whole rows, streamed: the next tile's loads overlap this one's math
        cols = tl.arange(0, BLOCK)
        cmask = cols < N
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for tile in tl.range(row_start, row_end, ROWS, num_stages=STAGES):
            rows = tile + tl.arange(0, ROWS)
            rmask = rows < row_end
            mask = rmask[:, None] & cmask[None, :]
            r64 = rows.to(tl.int64)[:, None]
            h = tl.load(H + r64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)[:, None]
            xhat = h * rstd
            # dweight sees the normalised value as the forward multiplied it: rounded to h's dtype
            # (unless the gain multiplied it in fp32).
            if FP32_GAIN:
                dw += tl.sum(dy * xhat, axis=0)
            else:
                dw += tl.sum(dy * to_dtype(xhat, H.dtype.element_ty).to(tl.float32), axis=0)
            g = dy * w[None, :]
            c = tl.sum(g * xhat, axis=1)[:, None] / N
            dx = (g - xhat * c) * rstd
            if HAS_DH:
                dx += tl.load(DH + r64 * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + r64 * stride_dx + cols[None, :], to_dtype(dx, DX.dtype.element_ty), mask=mask)
            if STORE_DR:
                tl.store(DR + r64 * stride_dr + cols[None, :], to_dtype(dx, DR.dtype.element_ty), mask=mask)
        tl.store(DW + cols, dw, mask=cmask)
    else:
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(DW + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < N)
        for row in tl.range(row_start, row_end, num_stages=STAGES):
            row64 = tl.cast(row, tl.int64)
            rstd = tl.load(RSTD + row64)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, N, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < N
                h = tl.load(H + row64 * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
                acc += dy * w * h * rstd
            c = tl.sum(acc, axis=0) / N
            for start in range(0, N, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < N
                h = tl.load(H + row64 * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
                xhat = h * rstd
                dx = (dy * w - xhat * c) * rstd
                if HAS_DH:
                    dx += tl.load(DH + row64 * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row64 * stride_dx + cols, to_dtype(dx, DX.dtype.element_ty), mask=mask)
                if STORE_DR:
                    tl.store(DR + row64 * stride_dr + cols, to_dtype(dx, DR.dtype.element_ty), mask=mask)
                part = tl.load(DW + cols, mask=mask, other=0.0)
                if not FP32_GAIN:
                    xhat = to_dtype(xhat, H.dtype.element_ty).to(tl.float32)
                tl.store(DW + cols, part + dy * xhat, mask=mask)


# ---------------------------------------------------------------- the two implementations of each op

def _fwd_torch(x, weight, residual, eps, offset, fp32_gain, with_rstd=True):
    h = x if residual is None else x + residual
    hf = h.float()
    # F.rms_norm in fp32 is transformers' hf * rsqrt(mean(hf^2) + eps) bit for bit (tests/test_norms.py),
    # in one kernel instead of five: that matters in eager decoding, where every op is overhead.
    normed = F.rms_norm(hf, (hf.shape[-1],), None, eps)
    if fp32_gain:  # Gemma / OLMo 2: the gain multiplies the fp32 value, one rounding after
        y = (normed * (weight.float() + offset)).to(torch.promote_types(h.dtype, weight.dtype))
        rstd = torch.rsqrt(hf.pow(2).mean(-1) + eps) if with_rstd else None
        return y, h, rstd
    normed = normed.to(h.dtype)
    if offset:
        y = (normed.float() * (weight.float() + offset)).to(torch.promote_types(h.dtype, weight.dtype))
    else:  # the same numbers (torch multiplies low-precision tensors in fp32, rounding once), fewer passes
        y = weight * normed
    rstd = torch.rsqrt(hf.pow(2).mean(-1) + eps) if with_rstd else None
    return y, h, rstd


def _bwd_torch(dy, dh, h, weight, rstd, offset, fp32_gain):
    hf, dyf = h.float(), dy.float()
    rstd = rstd.unsqueeze(-1)
    xhat = hf * rstd
    g = dyf * (weight.float() + offset)
    dx = (g - xhat * (g * xhat).mean(-1, keepdim=True)) * rstd
    if dh is not None:
        dx = dx + dh.float()
    dw = (dyf * (xhat if fp32_gain else xhat.to(h.dtype).float())).reshape(-1, h.shape[-1]).sum(0)
    return dx.to(h.dtype), dw.to(weight.dtype)


def _fwd_triton(x, weight, residual, eps, offset, fp32_gain):
    n = x.shape[-1]
    x2 = as_rows(x, n)
    r2 = as_rows(residual, n) if residual is not None else x2
    rows = x2.shape[0]
    h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((rows, n), dtype=torch.promote_types(h_dtype, weight.dtype), device=x.device)
    h = torch.empty((rows, n), dtype=h_dtype, device=x.device) if residual is not None else y
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        cfg = launch_config(n, row_bucket(rows))
        with launch_guard(x, "rms_norm_fwd"):
            _fwd_kernel[(-(-rows // cfg.rows),)](
                x2, r2, weight.contiguous(), y, h, rstd, x2.stride(0), r2.stride(0), y.stride(0), h.stride(0),
                rows, n, eps, offset, HAS_RES=residual is not None, FP32_GAIN=fp32_gain, BLOCK=cfg.block, ROWS=cfg.rows,
                SINGLE=cfg.single, num_warps=cfg.num_warps)
    shape = x.shape
    h_out = h.view(shape) if residual is not None else x
    return y.view(shape), h_out, rstd.view(shape[:-1])


def _bwd_triton(dy, dh, h, weight, rstd, offset, fp32_gain, store_dr):
    n = h.shape[-1]
    dy2, h2 = as_rows(dy, n), as_rows(h, n)
    dh2 = as_rows(dh, n) if dh is not None else dy2
    rows = h2.shape[0]
    dx = torch.empty((rows, n), dtype=h.dtype, device=h.device)
    dr = torch.empty_like(dx) if store_dr else dx
    if rows:
        cfg = launch_config(n, row_bucket(rows), BWD_TILE_ELEMS)
        programs, per_program = bwd_grid(rows, cfg, h.device)
        partial = torch.empty((programs, n), dtype=torch.float32, device=h.device)
        with launch_guard(h, "rms_norm_bwd"):
            _bwd_kernel[(programs,)](
                dy2, dh2, h2, weight.contiguous(), rstd.reshape(-1), dx, dr, partial,
                dy2.stride(0), dh2.stride(0), h2.stride(0), dx.stride(0), dr.stride(0), rows, n, offset, per_program,
                HAS_DH=dh is not None, STORE_DR=store_dr, FP32_GAIN=fp32_gain, BLOCK=cfg.block, ROWS=cfg.rows, SINGLE=cfg.single,
                STAGES=BWD_STAGES, num_warps=cfg.num_warps)
        dw = partial.sum(0)
    else:
        dw = torch.zeros(n, dtype=torch.float32, device=h.device)
    return dx.view(h.shape), (dr.view(h.shape) if store_dr else None), dw.to(weight.dtype)


def _fwd(x, weight, residual, eps, offset, fp32_gain):
    """(y, h, rstd) on the tensor's path: the Triton kernel or the torch code (h is x without residual)."""
    return (_fwd_triton if use_triton(x) else _fwd_torch)(x, weight, residual, eps, offset, fp32_gain)


def _bwd(dy, dh, h, weight, rstd, offset, fp32_gain, has_residual):
    """(dx, dresidual or None, dweight) on the tensor's path."""
    if use_triton(h):
        return _bwd_triton(dy, dh, h, weight, rstd, offset, fp32_gain, has_residual)
    dx, dw = _bwd_torch(dy, dh, h, weight, rstd, offset, fp32_gain)
    return dx, (dx.clone() if has_residual else None), dw  # two gradients must never share storage


# ---------------------------------------------------------------- torch.library ops (what torch.compile sees)

@torch.library.custom_op("minillama::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float,
                 offset: float, fp32_gain: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, rstd); h is x + residual (an empty tensor without residual, since outputs may not alias inputs)."""
    y, h, rstd = _fwd(x, weight, residual, eps, offset, fp32_gain)
    return y, (h if residual is not None else x.new_empty(0)), rstd


@rms_norm_fwd.register_fake
def _(x, weight, residual, eps, offset, fp32_gain):
    h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = x.new_empty(x.shape, dtype=torch.promote_types(h_dtype, weight.dtype))
    h = x.new_empty(x.shape, dtype=h_dtype) if residual is not None else x.new_empty(0)
    return y, h, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("minillama::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor,
                 rstd: torch.Tensor, offset: float, fp32_gain: bool,
                 has_residual: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dresidual, dweight); dresidual is empty without residual."""
    dx, dr, dw = _bwd(dy, dh, h, weight, rstd, offset, fp32_gain, has_residual)
    return dx, (dr if has_residual else h.new_empty(0)), dw


@rms_norm_bwd.register_fake
def _(dy, dh, h, weight, rstd, offset, fp32_gain, has_residual):
    return torch.empty_like(h), (torch.empty_like(h) if has_residual else h.new_empty(0)), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, residual, eps, offset, fp32_gain = inputs
    _, h, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, rstd)
    ctx.offset, ctx.fp32_gain, ctx.has_residual = offset, fp32_gain, residual is not None


def _backward(ctx, dy, dh, drstd):
    h, weight, rstd = ctx.saved_tensors
    dh = dh if ctx.has_residual and dh is not None and dh.numel() else None
    dx, dr, dw = rms_norm_bwd(dy, dh, h, weight, rstd, ctx.offset, ctx.fp32_gain, ctx.has_residual)
    return dx, dw, (dr if ctx.has_residual else None), None, None, None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerRMSNorm(torch.autograd.Function):
    """Eager calls that need gradients: the same kernels without the custom-op dispatch, which costs
    more host time than the kernels at small sizes (tools/bench_kernels.py --overhead)."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps, offset, fp32_gain):
        y, h, rstd = _fwd(x, weight, residual, eps, offset, fp32_gain)
        ctx.save_for_backward(h, weight, rstd)
        ctx.offset, ctx.fp32_gain, ctx.has_residual = offset, fp32_gain, residual is not None
        ctx.set_materialize_grads(False)  # an unused h gets no gradient: no zeros to read
        return (y, h) if residual is not None else y

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, weight, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros(h.shape, dtype=torch.promote_types(h.dtype, weight.dtype), device=h.device)
        dx, dr, dw = _bwd(dy, dh, h, weight, rstd, ctx.offset, ctx.fp32_gain, ctx.has_residual)
        return dx, dw, dr, None, None, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
    residual: torch.Tensor | None = None, offset: float = 0.0, fp32_gain: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x (or of h = x + residual, returning (y, h)) over the last dimension.

    offset: the gain is weight + offset (Gemma: 1). fp32_gain: multiply the gain into the fp32
    normalised value and round once (Gemma, OLMo 2), instead of rounding it to the input dtype first
    (Llama).

    Triton on CUDA or under TRITON_INTERPRET=1; on a CPU in eager inference the C++ kernels of
    kernels/cpu.py (the torch code's numbers bit for bit, in one pass), torch code otherwise. Under
    torch.compile the call is the custom op; eagerly it skips the op's dispatch (no gradient
    needed: the kernel alone; else a plain autograd.Function around the same kernels).
    """
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    eps, offset, fp32_gain = float(eps), float(offset), bool(fp32_gain)
    if not _common.use_op(x):
        if cpu.applies(x, weight, residual):  # eager CPU inference: one pass in C++
            y, h = cpu.rms_norm(x, weight, residual, eps, offset, fp32_gain)
            return (y, h) if residual is not None else y
        y, h, _ = _fwd_torch(x, weight, residual, eps, offset, fp32_gain, with_rstd=False)
    elif torch.compiler.is_compiling():
        y, h, _ = rms_norm_fwd(x, weight, residual, eps, offset, fp32_gain)
    elif _common.needs_grad(x, weight, residual):
        return _EagerRMSNorm.apply(x, weight, residual, eps, offset, fp32_gain)
    else:
        y, h, _ = _fwd(x, weight, residual, eps, offset, fp32_gain)
    return (y, h) if residual is not None else y
