"""Persistent Elman RNN kernels for small H: one launch runs the whole sequence, no inter-program talk.

Forward:   h_t = act(h_{t∓1} W_hhᵀ + Xp_t + b)            (Xp = x W_ihᵀ, one GEMM before the launch)
Backward:  dz_t = (dy_t + dh_{t±1}) ⊙ act'(h_t),  dh_t = dz_t W_hh,  dh at the last step = ∂L/∂h_n

Tiling: program (i, d) owns batch rows [i·BB, (i+1)·BB) of direction d and ALL of H
(BH = next_pow2(H) ≥ 16). It loads W_hhᵀ (forward) or W_hh (backward) of its direction as one
[BH, BH] block before the time loop, so the weights stay on-chip for the whole sequence, and carries
the state h (forward) or dh (backward) as an fp32 [BB, BH] block (fp64 for fp64 storage) from step to
step: nothing but y / dz and the Xp / dy inputs touches global memory inside the loop.

Layout, directions and lengths as in stepwise.py: element (t, b, d, h) of the sequence buffers sits at
t·stride_t + b·stride_b + d·stride_d + h with stride_d = Hp (H rounded up to 16, padding written as
zeros); direction d runs backwards when (d == 1) != REVERSE; with HAS_LENGTHS a row's steps
t ≥ lengths[b] write y = 0 / dz = 0 and keep the carried state, so a reverse row starts from h0 at its
own end and the state left at the end of the loop is each row's h_n (forward) or ∂L/∂h0 (backward).
y may be written over Xp (p_y = p_xp; both share the layout): a program reads only the Xp_t rows it
then overwrites.

The state is rounded to the storage dtype only as the dot operand, as it would be in any GEMM.
"""
import triton
import triton.language as tl

from .common import activation, activation_grad, matmul, row_lengths, step_index


@triton.jit(do_not_specialize=["T"])
def elman_persistent_small_fwd_kernel(
    p_xp, p_y, p_h0, p_w, p_bias, p_hn, p_len,
    T, B, H,
    stride_y_t, stride_y_b, stride_y_d,
    stride_h0_d, stride_h0_b, stride_h0_h,
    stride_w_d, stride_w_n, stride_w_k,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
    ACT: tl.constexpr, FAST_TANH: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr,
):
    i_d = tl.program_id(1)
    rev = (i_d == 1) != REVERSE
    o_b, o_h, m_b, m_h = _batch_tile(B, H, BB, BH)
    m_bh = m_b[:, None] & m_h[None, :]
    len_b = row_lengths(p_len, o_b, m_b, T, HAS_LENGTHS)  # [BB]
    acc_ty = tl.float64 if p_y.dtype.element_ty == tl.float64 else tl.float32

    # W_hhᵀ[k, n] = W_hh[n, k], read through strides: [BH, BH], on-chip for all T steps.
    p_w = p_w + i_d * stride_w_d
    b_wt = tl.load(p_w + o_h[:, None] * stride_w_k + o_h[None, :] * stride_w_n,
                   mask=(o_h < stride_y_d)[:, None] & m_h[None, :], other=0.0)
    b_bias = tl.zeros([BH], dtype=acc_ty)
    if HAS_BIAS:
        b_bias = tl.load(p_bias + i_d * H + o_h, mask=m_h, other=0.0).to(acc_ty)
    b_h = tl.load(p_h0 + i_d * stride_h0_d + o_b[:, None] * stride_h0_b + o_h[None, :] * stride_h0_h,
                  mask=m_bh, other=0.0).to(acc_ty)  # [BB, BH]

    o_seq = i_d * stride_y_d + o_b[:, None] * stride_y_b + o_h[None, :]  # [BB, BH] within one step
    m_store = m_b[:, None] & (o_h < stride_y_d)[None, :]  # the padding columns get their zeros too
    for s in range(0, T):
        t = step_index(s, T, rev)
        o_t = t.to(tl.int64) * stride_y_t + o_seq
        b_xp = tl.load(p_xp + o_t, mask=m_store, other=0.0).to(acc_ty)  # padded rows: vectorised, 0 past H
        z = matmul(b_h.to(p_w.dtype.element_ty), b_wt, PRECISION, UPCAST) + b_xp + b_bias[None, :]
        # Padded columns stay exactly 0 (zero weights, xp and bias; act(0) = 0), so they add nothing.
        active = (t < len_b)[:, None]
        b_h = tl.where(active, activation(z, ACT, FAST_TANH), b_h)
        tl.store(p_y + o_t, tl.where(active, b_h, 0.0).to(p_y.dtype.element_ty), mask=m_store)
    tl.store(p_hn + i_d.to(tl.int64) * B * H + o_b[:, None] * H + o_h[None, :], b_h.to(p_hn.dtype.element_ty), mask=m_bh)


@triton.jit(do_not_specialize=["T"])
def elman_persistent_small_bwd_kernel(
    p_dy, p_dh_n, p_y, p_w, p_dz, p_dh0, p_len,
    T, B, H,
    stride_dy_t, stride_dy_b, stride_dy_d, stride_dy_h,
    stride_dhn_d, stride_dhn_b, stride_dhn_h,
    stride_y_t, stride_y_b, stride_y_d,
    stride_w_d, stride_w_n, stride_w_k,
    HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
    ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr,
):
    """dz shares y's layout; p_dh0 receives ∂L/∂h0 as a contiguous (dirs, B, H) fp32 (fp64) tensor."""
    i_d = tl.program_id(1)
    rev = (i_d == 1) != REVERSE
    o_b, o_h, m_b, m_h = _batch_tile(B, H, BB, BH)
    m_bh = m_b[:, None] & m_h[None, :]
    len_b = row_lengths(p_len, o_b, m_b, T, HAS_LENGTHS)  # [BB]
    dz_ty = p_dz.dtype.element_ty

    p_w = p_w + i_d * stride_w_d
    b_w = tl.load(p_w + o_h[:, None] * stride_w_n + o_h[None, :] * stride_w_k,
                  mask=m_h[:, None] & (o_h < stride_y_d)[None, :], other=0.0)  # [BH(n), BH(k)], on-chip for all T
    b_dh = tl.load(p_dh_n + i_d * stride_dhn_d + o_b[:, None] * stride_dhn_b + o_h[None, :] * stride_dhn_h,
                   mask=m_bh, other=0.0).to(p_dh0.dtype.element_ty)  # [BB, BH], fp32 (fp64) carry

    o_seq = i_d * stride_y_d + o_b[:, None] * stride_y_b + o_h[None, :]  # [BB, BH] within one step
    p_dy = p_dy + i_d * stride_dy_d + o_b[:, None] * stride_dy_b + o_h[None, :] * stride_dy_h
    m_store = m_b[:, None] & (o_h < stride_y_d)[None, :]
    for s in range(0, T):
        t = step_index(s, T, rev == 0)  # the forward's steps in reverse
        t64 = t.to(tl.int64)
        b_dy = tl.load(p_dy + t64 * stride_dy_t, mask=m_store, other=0.0).to(b_dh.dtype)  # padded rows
        b_h = tl.load(p_y + t64 * stride_y_t + o_seq, mask=m_store, other=0.0).to(b_dh.dtype)
        active = (t < len_b)[:, None]
        b_dz = tl.where(active & m_h[None, :], (b_dy + b_dh) * activation_grad(b_h, ACT), 0.0).to(dz_ty)
        tl.store(p_dz + t64 * stride_y_t + o_seq, b_dz, mask=m_store)
        b_dh = tl.where(active, matmul(b_dz, b_w, PRECISION, UPCAST), b_dh)
    tl.store(p_dh0 + i_d.to(tl.int64) * B * H + o_b[:, None] * H + o_h[None, :], b_dh, mask=m_bh)


@triton.jit
def _batch_tile(B, H, BB: tl.constexpr, BH: tl.constexpr):
    """This program's batch rows o_b [BB] and all hidden units o_h [BH] (int64), with their masks."""
    o_b = (tl.program_id(0) * BB + tl.arange(0, BB)).to(tl.int64)
    o_h = tl.arange(0, BH).to(tl.int64)
    return o_b, o_h, o_b < B, o_h < H
