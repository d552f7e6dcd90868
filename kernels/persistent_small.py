"""Persistent Elman RNN kernels for small H: one launch runs the whole sequence, no inter-program talk.

Forward:   h_t = act(h_{t-1} W_hhᵀ + Xp_t + b)            (Xp = x W_ihᵀ, one GEMM before the launch)
Backward:  dz_t = (dy_t + dh_{t+1}) ⊙ act'(h_t),  dh_t = dz_t W_hh,  dh_{T} = ∂L/∂h_n

Tiling: program i owns batch rows [i·BB, (i+1)·BB) and ALL of H (BH = next_pow2(H) ≥ 16). It loads
W_hhᵀ (forward) or W_hh (backward) as one [BH, BH] block before the time loop, so the weights stay
on-chip for the whole sequence, and carries the state h (forward) or dh (backward) as an fp32
[BB, BH] block (fp64 for fp64 storage) from step to step: nothing but y / dz and the Xp / dy
inputs touches global memory inside the loop. Step s handles t = s, or t = T-1-s when REVERSE.
y may be written over Xp (p_y = p_xp): a program reads only the Xp_t rows it then overwrites.

The state is rounded to the storage dtype only as the dot operand, as it would be in any GEMM.
"""
import triton
import triton.language as tl

from .common import activation, activation_grad, matmul


@triton.jit(do_not_specialize=["T"])
def elman_persistent_small_fwd_kernel(
    p_xp, p_h0, p_w, p_bias, p_y,
    T, B, H,
    stride_h0_b, stride_h0_h, stride_w_n, stride_w_k,
    HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr,
    ACT: tl.constexpr, FAST_TANH: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr,
):
    o_b, o_h, m_h, m_bh = _batch_tile(B, H, BB, BH)
    acc_ty = tl.float64 if p_y.dtype.element_ty == tl.float64 else tl.float32

    # W_hhᵀ[k, n] = W_hh[n, k], read through strides: [BH, BH], on-chip for all T steps.
    b_wt = tl.load(p_w + o_h[:, None] * stride_w_k + o_h[None, :] * stride_w_n,
                   mask=m_h[:, None] & m_h[None, :], other=0.0)
    b_bias = tl.zeros([BH], dtype=acc_ty)
    if HAS_BIAS:
        b_bias = tl.load(p_bias + o_h, mask=m_h, other=0.0).to(acc_ty)
    b_h = tl.load(p_h0 + o_b[:, None] * stride_h0_b + o_h[None, :] * stride_h0_h,
                  mask=m_bh, other=0.0).to(acc_ty)  # [BB, BH]

    o_bh = o_b[:, None] * H + o_h[None, :]  # [BB, BH] offsets inside one (B, H) time slice
    for s in range(0, T):
        t = (T - 1 - s) if REVERSE else s
        p_t = t.to(tl.int64) * B * H + o_bh
        b_xp = tl.load(p_xp + p_t, mask=m_bh, other=0.0).to(acc_ty)
        z = matmul(b_h.to(p_w.dtype.element_ty), b_wt, PRECISION, UPCAST) + b_xp + b_bias[None, :]
        # Padded columns stay exactly 0 (zero weights, xp and bias; act(0) = 0), so they add nothing.
        b_h = activation(z, ACT, FAST_TANH)
        tl.store(p_y + p_t, b_h.to(p_y.dtype.element_ty), mask=m_bh)


@triton.jit(do_not_specialize=["T"])
def elman_persistent_small_bwd_kernel(
    p_dy, p_dh_n, p_y, p_w, p_dz, p_dh0,
    T, B, H,
    stride_dy_t, stride_dy_b, stride_dy_h, stride_dhn_b, stride_dhn_h, stride_w_n, stride_w_k,
    REVERSE: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr,
):
    o_b, o_h, m_h, m_bh = _batch_tile(B, H, BB, BH)
    dz_ty = p_dz.dtype.element_ty

    b_w = tl.load(p_w + o_h[:, None] * stride_w_n + o_h[None, :] * stride_w_k,
                  mask=m_h[:, None] & m_h[None, :], other=0.0)  # [BH(n), BH(k)], on-chip for all T
    b_dh = tl.load(p_dh_n + o_b[:, None] * stride_dhn_b + o_h[None, :] * stride_dhn_h,
                   mask=m_bh, other=0.0).to(p_dh0.dtype.element_ty)  # [BB, BH], fp32 (fp64) carry

    o_bh = o_b[:, None] * H + o_h[None, :]
    o_dy = o_b[:, None] * stride_dy_b + o_h[None, :] * stride_dy_h
    for s in range(0, T):
        t = s if REVERSE else (T - 1 - s)
        t64 = t.to(tl.int64)
        b_dy = tl.load(p_dy + t64 * stride_dy_t + o_dy, mask=m_bh, other=0.0).to(b_dh.dtype)
        b_h = tl.load(p_y + t64 * B * H + o_bh, mask=m_bh, other=0.0).to(b_dh.dtype)
        b_dz = ((b_dy + b_dh) * activation_grad(b_h, ACT)).to(dz_ty)
        tl.store(p_dz + t64 * B * H + o_bh, b_dz, mask=m_bh)
        b_dh = matmul(b_dz, b_w, PRECISION, UPCAST)
    tl.store(p_dh0 + o_bh, b_dh, mask=m_bh)


@triton.jit
def _batch_tile(B, H, BB: tl.constexpr, BH: tl.constexpr):
    """This program's batch rows o_b [BB] and all hidden units o_h [BH] (int64), with masks."""
    o_b = (tl.program_id(0) * BB + tl.arange(0, BB)).to(tl.int64)
    o_h = tl.arange(0, BH).to(tl.int64)
    m_h = o_h < H
    return o_b, o_h, m_h, (o_b < B)[:, None] & m_h[None, :]
