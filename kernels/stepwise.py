"""Fused stepwise Elman RNN kernels: one launch per time step.

Forward step (the input projection Xp = x W_ihᵀ for all T is one GEMM done before the loop):

    h_t = act(h_{t-1} W_hhᵀ + Xp_t + b),      b = b_ih + b_hh

Tiling: program (i, j) owns the output tile h_t[i·BB : (i+1)·BB, j·BN : (j+1)·BN] and loops over
the reduction dimension in BK chunks: acc[BB, BN] += h_{t-1}[BB, BK] @ W_hhᵀ[BK, BN]. W_hhᵀ is
never materialised: the tile is loaded through W_hh's strides with the two indices swapped.
h_t may be written over Xp_t (p_h = p_xp): each program reads only the Xp_t tile it then overwrites.

Backward step (BPTT, reverse time), with dh_{t+1} the gradient reaching h_t from step t+1:

    dz_t = (dy_t + dh_{t+1}) ⊙ act'(h_t)          tanh' = 1 − h_t²,  relu' = [h_t > 0]
    dh_t = dz_t W_hh

Program (i, j) owns dh_t[i-tile, j·BK : (j+1)·BK]. It loops over W_hh's rows n in BN chunks,
recomputing the element-wise dz_t[i-tile, n-chunk] it needs (cheaper than a second launch), and
also stores its own chunk dz_t[i-tile, j-chunk] for the weight-gradient GEMMs that follow.

Accumulation and the carried dh are fp32 (fp64 for fp64 storage). Offsets are int64.
"""
import triton
import triton.language as tl

from .common import activation, activation_grad, matmul


@triton.jit
def elman_step_fwd_kernel(
    p_xp, p_h_prev, p_w, p_bias, p_h,
    B, H,
    stride_xp_b, stride_hp_b, stride_hp_h, stride_w_n, stride_w_k, stride_h_b,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, FAST_TANH: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    i_b, i_n = tl.program_id(0), tl.program_id(1)
    o_b = (i_b * BB + tl.arange(0, BB)).to(tl.int64)  # [BB]
    o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)  # [BN]
    m_b, m_n = o_b < B, o_n < H

    acc = tl.zeros([BB, BN], dtype=tl.float64 if p_h.dtype.element_ty == tl.float64 else tl.float32)
    for k0 in range(0, H, BK):
        o_k = (k0 + tl.arange(0, BK)).to(tl.int64)  # [BK]
        m_k = o_k < H
        p_hk = p_h_prev + o_b[:, None] * stride_hp_b + o_k[None, :] * stride_hp_h
        b_h_prev = tl.load(p_hk, mask=m_b[:, None] & m_k[None, :], other=0.0)  # [BB, BK]
        p_wt = p_w + o_k[:, None] * stride_w_k + o_n[None, :] * stride_w_n
        b_wt = tl.load(p_wt, mask=m_k[:, None] & m_n[None, :], other=0.0)  # [BK, BN] = W_hhᵀ tile
        acc += matmul(b_h_prev, b_wt, PRECISION, UPCAST)

    m_bn = m_b[:, None] & m_n[None, :]
    b_xp = tl.load(p_xp + o_b[:, None] * stride_xp_b + o_n[None, :], mask=m_bn, other=0.0)  # [BB, BN]
    z = acc + b_xp.to(acc.dtype)
    if HAS_BIAS:
        z += tl.load(p_bias + o_n, mask=m_n, other=0.0).to(acc.dtype)[None, :]
    b_h = activation(z, ACT, FAST_TANH)
    tl.store(p_h + o_b[:, None] * stride_h_b + o_n[None, :], b_h.to(p_h.dtype.element_ty), mask=m_bn)


@triton.jit
def elman_step_bwd_kernel(
    p_dy, p_dh_next, p_h, p_w, p_dz, p_dh,
    B, H,
    stride_dy_b, stride_dy_h, stride_h_b, stride_w_n, stride_w_k, stride_dz_b,
    ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    i_b, i_k = tl.program_id(0), tl.program_id(1)
    o_b = (i_b * BB + tl.arange(0, BB)).to(tl.int64)  # [BB]
    o_k = (i_k * BK + tl.arange(0, BK)).to(tl.int64)  # [BK]
    m_b, m_k = o_b < B, o_k < H
    m_bk = m_b[:, None] & m_k[None, :]
    dz_ty = p_dz.dtype.element_ty

    # This program's own chunk of dz_t, stored once for the weight-gradient GEMMs.
    b_dz = _dz_tile(p_dy, p_dh_next, p_h, o_b, o_k, m_bk, stride_dy_b, stride_dy_h, stride_h_b, H, ACT)
    tl.store(p_dz + o_b[:, None] * stride_dz_b + o_k[None, :], b_dz.to(dz_ty), mask=m_bk)

    acc = tl.zeros([BB, BK], dtype=p_dh.dtype.element_ty)
    for n0 in range(0, H, BN):
        o_n = (n0 + tl.arange(0, BN)).to(tl.int64)  # [BN]
        m_n = o_n < H
        b_dz_n = _dz_tile(p_dy, p_dh_next, p_h, o_b, o_n, m_b[:, None] & m_n[None, :],
                          stride_dy_b, stride_dy_h, stride_h_b, H, ACT)  # [BB, BN]
        p_wn = p_w + o_n[:, None] * stride_w_n + o_k[None, :] * stride_w_k
        b_w = tl.load(p_wn, mask=m_n[:, None] & m_k[None, :], other=0.0)  # [BN, BK]
        acc += matmul(b_dz_n.to(dz_ty), b_w, PRECISION, UPCAST)
    tl.store(p_dh + o_b[:, None] * H + o_k[None, :], acc, mask=m_bk)


@triton.jit
def _dz_tile(p_dy, p_dh_next, p_h, o_b, o_n, mask, stride_dy_b, stride_dy_h, stride_h_b, H,
             ACT: tl.constexpr):
    """dz = (dy + dh_next) ⊙ act'(h) on one [BB, BN] tile, in dh_next's (fp32/fp64) precision."""
    b_dy = tl.load(p_dy + o_b[:, None] * stride_dy_b + o_n[None, :] * stride_dy_h, mask=mask, other=0.0)
    b_dh = tl.load(p_dh_next + o_b[:, None] * H + o_n[None, :], mask=mask, other=0.0)
    b_h = tl.load(p_h + o_b[:, None] * stride_h_b + o_n[None, :], mask=mask, other=0.0).to(b_dh.dtype)
    return (b_dy.to(b_dh.dtype) + b_dh) * activation_grad(b_h, ACT)
