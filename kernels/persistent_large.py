"""Persistent Elman RNN kernels for large H: W_hh's columns split across programs, a grid barrier per step.

Forward:   h_t = act(h_{t-1} W_hhᵀ + Xp_t + b)
Backward:  dz_t = (dy_t + dh_{t+1}) ⊙ act'(h_t),  dh_t = dz_t W_hh

Tiling: the grid is (n_col, n_group, n_dir). Program (j, g, d) owns hidden units [j·BN, (j+1)·BN) of
direction d (dir_base + the third grid index: both directions in one launch, or one per launch when
the device cannot hold both grids at once) and holds
their slice of the weights on-chip for the whole launch: W_hhᵀ[:, j-slice] ([BH, BN]) forward,
W_hh[:, j-slice] ([BH(n), BN(k)]) backward, with BH = next_pow2(H). It walks batch tiles
g, g + n_group, ... of BB rows. The n_col programs of one group exchange the state through global
memory and meet at their group's barrier once per step:

  forward, step s:  y_t[tile, j-slice] = act(y_{t∓1}[tile, :] @ W_hhᵀ[:, j-slice] + ...); barrier.
  backward, two phases per step:
    phase 0:  dz_t[tile, j-slice] = (dy_t + dh[tile, j-slice]) ⊙ act'(y_t); barrier;
    phase 1:  dh[tile, j-slice] = dz_t[tile, :] @ W_hh[:, j-slice]   (dh is fp32, program-private
              columns, so phase 1 → next phase 0 needs only an intra-program barrier).

Layout, directions and lengths as in stepwise.py: element (t, b, d, h) of the sequence buffers sits at
t·stride_t + b·stride_b + d·stride_d + h with stride_d = Hp (H rounded up to 16; the column programs
cover Hp and write zeros in the padding); direction d runs backwards when (d == 1) != REVERSE; with
HAS_LENGTHS a row's steps t ≥ lengths[b] write y = 0 / dz = 0 and keep its state, so the state a step
reads is h0 at the row's own first step (a reverse row's first step is t = lengths[b] − 1), else
y_{t∓1}; h_n is written at each row's last step. y may be written over Xp (p_y = p_xp, one layout): a program reads Xp_t
only in its own tile, before writing y_t there, and reads other programs' columns only of y_{t∓1},
complete since the last barrier.

The matmul splits its reduction over H into K_SPLIT chunks, one per warp (common.matmul_split_k),
so each warp runs BH / (16·K_SPLIT) dependent mma steps instead of BH / 16.

Reads of other programs' data use .cg loads (L2, not the incoherent L1). The barrier
(barrier.group_barrier) is one self-resetting word per (direction, group), each on its own 128-byte line:
by default the flip scheme (one release reduction to arrive, relaxed polls, one acquire), FLIP=False
the older count scheme, kept for measurement. Waits are bounded by `patience` polls; a program that
runs out sets the buffer's error word, stops waiting, and the launcher raises.
Co-residency of all programs is the launcher's job (a cooperative launch, which fails instead of
hanging).

Triton's interpreter runs programs one after another, so a barrier would never open there. With
USE_BARRIER=False the launcher runs [unit_begin, unit_end) = one step (forward) or one phase
(backward) per launch; the indexing and column split are the same code.
"""
import triton
import triton.language as tl

from .barrier import WORD_STRIDE, group_barrier, read_phase
from .common import (activation, activation_grad, is_last_step, load_state, matmul_split_k, previous_step,
                     row_lengths, step_index)


@triton.jit(do_not_specialize=["T", "unit_begin", "unit_end", "dir_base", "patience"])
def elman_persistent_large_fwd_kernel(
    p_xp, p_y, p_h0, p_w, p_bias, p_hn, p_len, p_barrier,
    T, B, H, unit_begin, unit_end, dir_base, patience,
    stride_y_t, stride_y_b, stride_y_d,
    stride_h0_d, stride_h0_b,
    stride_w_d, stride_w_n, stride_w_k,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
    USE_BARRIER: tl.constexpr, FLIP: tl.constexpr,
    ACT: tl.constexpr, FAST_TANH: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr, K_SPLIT: tl.constexpr,
):
    i_n, i_g, i_d = tl.program_id(0), tl.program_id(1), dir_base + tl.program_id(2)
    n_col, n_group = tl.num_programs(0), tl.num_programs(1)
    rev = (i_d == 1) != REVERSE
    o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)  # [BN] this program's hidden units
    o_k = tl.arange(0, BH).to(tl.int64)  # [BH] the whole reduction dimension
    m_n, m_k = o_n < H, o_k < H
    acc_ty = tl.float64 if p_y.dtype.element_ty == tl.float64 else tl.float32

    b_wt = tl.load(p_w + i_d * stride_w_d + o_k[:, None] * stride_w_k + o_n[None, :] * stride_w_n,
                   mask=(o_k < stride_y_d)[:, None] & m_n[None, :], other=0.0)  # [BH, BN] = W_hhᵀ[:, slice]
    b_bias = tl.zeros([BN], dtype=acc_ty)
    if HAS_BIAS:
        b_bias = tl.load(p_bias + i_d * H + o_n, mask=m_n, other=0.0).to(acc_ty)
    p_word = p_barrier + WORD_STRIDE * (1 + i_d * n_group + i_g)
    phase = read_phase(p_word, FLIP) if USE_BARRIER else 0
    o_d = i_d * stride_y_d
    p_h0 = p_h0 + i_d * stride_h0_d
    p_hn = p_hn + i_d * B * H

    for s in range(unit_begin, unit_end):
        t = step_index(s, T, rev)
        t_prev = previous_step(t, rev)
        p_prev = p_y + o_d + tl.minimum(tl.maximum(t_prev, 0), T - 1).to(tl.int64) * stride_y_t
        for i_b in range(i_g, tl.cdiv(B, BB), n_group):
            o_b = (i_b * BB + tl.arange(0, BB)).to(tl.int64)  # [BB]
            m_b = o_b < B
            len_b = row_lengths(p_len, o_b, m_b, T, HAS_LENGTHS)  # [BB]
            from_h0 = (t_prev < 0) | (t_prev >= len_b)  # [BB] the row's first step reads h0
            any_start = tl.max(from_h0.to(tl.int32), axis=0) > 0  # some row of the tile reads h0
            b_h = load_state(p_h0, p_prev, o_b, o_k, m_b, from_h0, any_start, stride_h0_b, stride_y_b,
                             stride_y_d)  # [BB, BH], all programs' columns
            m_bn = m_b[:, None] & m_n[None, :]
            o_t = o_d + t.to(tl.int64) * stride_y_t + o_b[:, None] * stride_y_b + o_n[None, :]  # [BB, BN]
            b_xp = tl.load(p_xp + o_t, mask=m_b[:, None] & (o_n < stride_y_d)[None, :], other=0.0).to(acc_ty)
            z = matmul_split_k(b_h, b_wt, K_SPLIT, PRECISION, UPCAST) + b_xp + b_bias[None, :]
            b_out = tl.where((t < len_b)[:, None], activation(z, ACT, FAST_TANH), 0.0)
            tl.store(p_y + o_t, b_out.to(p_y.dtype.element_ty), mask=m_b[:, None] & (o_n < stride_y_d)[None, :])
            tl.store(p_hn + o_b[:, None] * H + o_n[None, :], b_out.to(p_hn.dtype.element_ty),
                     mask=m_bn & is_last_step(t, rev, len_b)[:, None])
        if USE_BARRIER:
            phase, patience = group_barrier(p_word, p_barrier, i_n, n_col, phase, patience, FLIP)


@triton.jit(do_not_specialize=["T", "unit_begin", "unit_end", "dir_base", "patience"])
def elman_persistent_large_bwd_kernel(
    p_dy, p_y, p_w, p_dz, p_dh, p_len, p_barrier,
    T, B, H, unit_begin, unit_end, dir_base, patience,
    stride_dy_t, stride_dy_b, stride_dy_d, stride_dy_h,
    stride_y_t, stride_y_b, stride_y_d,
    stride_dh_d, stride_dh_b,
    stride_w_d, stride_w_n, stride_w_k,
    HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, USE_BARRIER: tl.constexpr, FLIP: tl.constexpr,
    ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr, K_SPLIT: tl.constexpr,
):
    """Units are phases: unit u is phase u % 2 of step u // 2. dz shares y's layout. p_dh is the
    (dirs, B, ·) fp32 (fp64) carry: ∂L/∂h_n on entry, ∂L/∂h0 on exit."""
    i_k, i_g, i_d = tl.program_id(0), tl.program_id(1), dir_base + tl.program_id(2)
    n_col, n_group = tl.num_programs(0), tl.num_programs(1)
    rev = (i_d == 1) != REVERSE
    o_k = (i_k * BN + tl.arange(0, BN)).to(tl.int64)  # [BN] this program's columns of dh
    o_n = tl.arange(0, BH).to(tl.int64)  # [BH] the whole reduction dimension (rows of W_hh)
    m_k, m_n = o_k < H, o_n < H
    dz_ty = p_dz.dtype.element_ty

    b_w = tl.load(p_w + i_d * stride_w_d + o_n[:, None] * stride_w_n + o_k[None, :] * stride_w_k,
                  mask=m_n[:, None] & (o_k < stride_y_d)[None, :], other=0.0)  # [BH, BN] = W_hh[:, slice]
    p_word = p_barrier + WORD_STRIDE * (1 + i_d * n_group + i_g)
    phase = read_phase(p_word, FLIP) if USE_BARRIER else 0
    p_dy = p_dy + i_d * stride_dy_d
    p_y = p_y + i_d * stride_y_d
    p_dz = p_dz + i_d * stride_y_d
    p_dh = p_dh + i_d * stride_dh_d

    for u in range(unit_begin, unit_end):
        t = step_index(u // 2, T, rev == 0)  # the forward's steps in reverse
        o_t = t.to(tl.int64) * stride_y_t
        for i_b in range(i_g, tl.cdiv(B, BB), n_group):
            o_b = (i_b * BB + tl.arange(0, BB)).to(tl.int64)  # [BB]
            m_b = o_b < B
            m_bp = m_b[:, None] & (o_k < stride_y_d)[None, :]  # [BB, BN] within the padded rows
            active = (t < row_lengths(p_len, o_b, m_b, T, HAS_LENGTHS))[:, None]  # [BB, 1]
            o_own = o_b[:, None] * stride_y_b + o_k[None, :]  # [BB, BN] in the sequence buffers
            p_dh_own = p_dh + o_b[:, None] * stride_dh_b + o_k[None, :]
            if u % 2 == 0:
                # Loads over the padded width (vectorised for any H); the padding columns' dz is zeroed.
                b_dy = tl.load(p_dy + t.to(tl.int64) * stride_dy_t + o_b[:, None] * stride_dy_b
                               + o_k[None, :] * stride_dy_h, mask=m_bp, other=0.0)
                b_dh = tl.load(p_dh_own, mask=m_bp, other=0.0)
                b_h = tl.load(p_y + o_t + o_own, mask=m_bp, other=0.0).to(b_dh.dtype)
                b_dz = tl.where(active & m_k[None, :], (b_dy.to(b_dh.dtype) + b_dh) * activation_grad(b_h, ACT), 0.0)
                tl.store(p_dz + o_t + o_own, b_dz.to(dz_ty), mask=m_bp)
            else:
                b_dz_row = tl.load(p_dz + o_t + o_b[:, None] * stride_y_b + o_n[None, :],
                                   mask=m_b[:, None] & (o_n < stride_y_d)[None, :], other=0.0,
                                   cache_modifier=".cg")  # [BB, BH], all programs' columns (padding: 0)
                b_dh_new = matmul_split_k(b_dz_row, b_w, K_SPLIT, PRECISION, UPCAST)
                # padding steps pass the gradient through: their rows' dh is left as it is
                tl.store(p_dh_own, b_dh_new.to(p_dh.dtype.element_ty), mask=m_bp & active)
        if u % 2 == 0:
            if USE_BARRIER:
                phase, patience = group_barrier(p_word, p_barrier, i_k, n_col, phase, patience, FLIP)
        else:
            tl.debug_barrier()  # this program's dh stores land before its next phase 0 reads them
