"""Fused stepwise Elman RNN kernels: one launch per time step, both directions of a layer in it.

Forward step (the input projection Xp = x W_ihᵀ for all T is one GEMM done before the loop):

    h_t = act(h_{t∓1} W_hhᵀ + Xp_t + b),      b = b_ih + b_hh

Tiling: program (i, j, d) owns direction d's output tile h_t[i·BB : (i+1)·BB, j·BN : (j+1)·BN] and
loops over the reduction dimension in BK chunks: acc[BB, BN] += h_{t∓1}[BB, BK] @ W_hhᵀ[BK, BN].
W_hhᵀ is never materialised: the tile is loaded through W_hh's strides with the two indices swapped.

Layout: the sequence buffer (Xp, overwritten by y) holds element (t, b, d, h) at
t·stride_t + b·stride_b + d·stride_d + h, so time-major, batch-first and both directions' halves of
one (·, ·, 2·Hp) buffer are the same code. stride_d = Hp is H rounded up to 16 (the launcher's
padding): every row and direction block then starts 16-element aligned, so loads vectorise for any
H. The launcher pads the rows of h0 and W_hh the same way (zeros past H), and loads along a row mask
at Hp, not H, so the mask too is constant over 16 elements. Stores cover the padding columns too and write exact zeros there (Xp, W and b are zero there and
act(0) = 0), which the weight-gradient GEMMs rely on.

Direction d runs time backwards when (d == 1) != REVERSE. Variable lengths (HAS_LENGTHS): row b's
steps t ≥ lengths[b] are padding; they write y = 0 and leave the state alone, so a reverse row starts
from h0 at its own end and h_n is each row's state after its own last step (written at that step).
y may be written over Xp (p_y = p_xp; both share the layout): each program reads only the Xp_t tile
it then overwrites.

Backward step (BPTT, reverse of the forward order), with dh_{t±1} the gradient reaching h_t from the
step after it:

    dz_t = (dy_t + dh_{t±1}) ⊙ act'(h_t)          tanh' = 1 − h_t²,  relu' = [h_t > 0]
    dh_t = dz_t W_hh                              (padding steps: dz_t = 0, dh_t = dh_{t±1})

Program (i, j, d) owns dh_t[i-tile, j·BK : (j+1)·BK]. It loops over W_hh's rows n in BN chunks,
recomputing the element-wise dz_t[i-tile, n-chunk] it needs (cheaper than a second launch), and
also stores its own chunk dz_t[i-tile, j-chunk] for the weight-gradient GEMMs that follow.

Both kernels take the whole buffers and the step index s, so the launcher passes the same arguments
every step but s. Accumulation and the carried dh are fp32 (fp64 for fp64 storage). Offsets are int64.
"""
import triton
import triton.language as tl

from .common import activation, activation_grad, is_last_step, matmul, previous_step, row_lengths, step_index


@triton.jit(do_not_specialize=["s", "T"])
def elman_step_fwd_kernel(
    p_xp, p_y, p_h0, p_w, p_bias, p_hn, p_len,
    s, T, B, H,
    stride_y_t, stride_y_b, stride_y_d,
    stride_h0_d, stride_h0_b,
    stride_w_d, stride_w_n, stride_w_k,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
    ACT: tl.constexpr, FAST_TANH: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """h0 comes in rows padded like y's (the launcher pads it): see common.load_state."""
    i_b, i_n, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rev = (i_d == 1) != REVERSE
    t = step_index(s, T, rev)
    t_prev = previous_step(t, rev)
    o_b = (i_b * BB + tl.arange(0, BB)).to(tl.int64)  # [BB]
    o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)  # [BN]
    m_b, m_n = o_b < B, o_n < H
    len_b = row_lengths(p_len, o_b, m_b, T, HAS_LENGTHS)  # [BB]
    from_h0 = (t_prev < 0) | (t_prev >= len_b)  # [BB] the row's first step reads h0
    t_read = tl.minimum(tl.maximum(t_prev, 0), T - 1).to(tl.int64)  # in range even where unused

    o_d = i_d * stride_y_d
    # Each row's previous state: its h0 row at its first step, else y_{t∓1}'s row (both padded rows).
    p_rows = tl.where(from_h0, p_h0 + i_d * stride_h0_d + o_b * stride_h0_b,
                      p_y + o_d + t_read * stride_y_t + o_b * stride_y_b)  # [BB]
    p_w = p_w + i_d * stride_w_d
    acc = tl.zeros([BB, BN], dtype=tl.float64 if p_y.dtype.element_ty == tl.float64 else tl.float32)
    for k0 in range(0, H, BK):
        o_k = (k0 + tl.arange(0, BK)).to(tl.int64)  # [BK]
        b_h_prev = tl.load(p_rows[:, None] + o_k[None, :], mask=m_b[:, None] & (o_k < stride_y_d)[None, :],
                           other=0.0, cache_modifier=".cg")  # [BB, BK]; padding columns hold zeros
        p_wt = p_w + o_k[:, None] * stride_w_k + o_n[None, :] * stride_w_n
        b_wt = tl.load(p_wt, mask=(o_k < stride_y_d)[:, None] & m_n[None, :], other=0.0)  # [BK, BN] = W_hhᵀ tile
        acc += matmul(b_h_prev, b_wt, PRECISION, UPCAST)

    m_bn = m_b[:, None] & m_n[None, :]
    o_out = o_d + t.to(tl.int64) * stride_y_t + o_b[:, None] * stride_y_b + o_n[None, :]  # [BB, BN]
    b_xp = tl.load(p_xp + o_out, mask=m_b[:, None] & (o_n < stride_y_d)[None, :], other=0.0)  # padding: 0
    z = acc + b_xp.to(acc.dtype)
    if HAS_BIAS:
        z += tl.load(p_bias + i_d * H + o_n, mask=m_n, other=0.0).to(acc.dtype)[None, :]
    b_h = tl.where((t < len_b)[:, None], activation(z, ACT, FAST_TANH), 0.0)  # [BB, BN]
    tl.store(p_y + o_out, b_h.to(p_y.dtype.element_ty), mask=m_b[:, None] & (o_n < stride_y_d)[None, :])
    p_hn = p_hn + i_d.to(tl.int64) * B * H + o_b[:, None] * H + o_n[None, :]
    tl.store(p_hn, b_h.to(p_hn.dtype.element_ty), mask=m_bn & is_last_step(t, rev, len_b)[:, None])


@triton.jit(do_not_specialize=["s", "T"])
def elman_step_bwd_kernel(
    p_dy, p_dh_next, p_y, p_w, p_dz, p_dh, p_len,
    s, T, B, H,
    stride_dy_t, stride_dy_b, stride_dy_d, stride_dy_h,
    stride_y_t, stride_y_b, stride_y_d,
    stride_dh_d, stride_dh_b,
    stride_w_d, stride_w_n, stride_w_k,
    HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
    ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """dz shares y's layout; dh_next / dh are the (dirs, B, ·) fp32 (fp64) carry buffers."""
    i_b, i_k, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rev = (i_d == 1) != REVERSE
    t = step_index(s, T, rev == 0)  # the backward walks the forward's steps in reverse
    t64 = t.to(tl.int64)
    o_b = (i_b * BB + tl.arange(0, BB)).to(tl.int64)  # [BB]
    o_k = (i_k * BK + tl.arange(0, BK)).to(tl.int64)  # [BK]
    m_b, m_k = o_b < B, o_k < H
    active = t < row_lengths(p_len, o_b, m_b, T, HAS_LENGTHS)  # [BB]
    dz_ty = p_dz.dtype.element_ty

    p_dy = p_dy + i_d * stride_dy_d + t64 * stride_dy_t
    p_y = p_y + i_d * stride_y_d + t64 * stride_y_t
    p_dz = p_dz + i_d * stride_y_d + t64 * stride_y_t
    p_dh_next = p_dh_next + i_d * stride_dh_d
    p_dh = p_dh + i_d * stride_dh_d
    p_w = p_w + i_d * stride_w_d

    # This program's own chunk of dz_t, stored once for the weight-gradient GEMMs (padding columns too).
    b_dz, b_dh_own = _dz_tile(p_dy, p_dh_next, p_y, o_b, o_k, m_b, m_k, active,
                              stride_dy_b, stride_dy_h, stride_y_b, stride_y_d, stride_dh_b, ACT)
    tl.store(p_dz + o_b[:, None] * stride_y_b + o_k[None, :], b_dz.to(dz_ty),
             mask=m_b[:, None] & (o_k < stride_y_d)[None, :])

    acc = tl.zeros([BB, BK], dtype=p_dh.dtype.element_ty)
    for n0 in range(0, H, BN):
        o_n = (n0 + tl.arange(0, BN)).to(tl.int64)  # [BN]
        m_n = o_n < H
        b_dz_n, b_dh_n = _dz_tile(p_dy, p_dh_next, p_y, o_b, o_n, m_b, m_n, active,
                                  stride_dy_b, stride_dy_h, stride_y_b, stride_y_d, stride_dh_b, ACT)  # [BB, BN]
        p_wn = p_w + o_n[:, None] * stride_w_n + o_k[None, :] * stride_w_k
        b_w = tl.load(p_wn, mask=m_n[:, None] & (o_k < stride_y_d)[None, :], other=0.0)  # [BN, BK]
        acc += matmul(b_dz_n.to(dz_ty), b_w, PRECISION, UPCAST)
    b_dh = tl.where(active[:, None], acc, b_dh_own)  # padding steps pass the gradient through unchanged
    tl.store(p_dh + o_b[:, None] * stride_dh_b + o_k[None, :], b_dh, mask=m_b[:, None] & (o_k < stride_y_d)[None, :])


@triton.jit
def _dz_tile(p_dy, p_dh_next, p_y, o_b, o_n, m_b, m_n, active, stride_dy_b, stride_dy_h, stride_y_b, Hp,
             stride_dh_b, ACT: tl.constexpr):
    """(dz, dh_next) on one [BB, BN] tile: dz = (dy + dh_next) ⊙ act'(h), 0 on padding steps and in the
    padding columns, in dh_next's (fp32/fp64) precision. The loads cover the padded rows (o_n < Hp,
    in bounds in every buffer) so they vectorise for any H; m_n (o_n < H) then zeroes the padding."""
    m_load = m_b[:, None] & (o_n < Hp)[None, :]
    b_dy = tl.load(p_dy + o_b[:, None] * stride_dy_b + o_n[None, :] * stride_dy_h, mask=m_load, other=0.0)
    b_dh = tl.load(p_dh_next + o_b[:, None] * stride_dh_b + o_n[None, :], mask=m_load, other=0.0)
    b_h = tl.load(p_y + o_b[:, None] * stride_y_b + o_n[None, :], mask=m_load, other=0.0).to(b_dh.dtype)
    b_dz = (b_dy.to(b_dh.dtype) + b_dh) * activation_grad(b_h, ACT)
    return tl.where(active[:, None] & m_n[None, :], b_dz, 0.0), b_dh
