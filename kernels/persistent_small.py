"""Persistent RNN kernels for small H: one launch runs the whole sequence, no inter-program talk. The cell
is the CELL constexpr (G gates: 1 Elman, 3 GRU, 4 LSTM; the maths in cells.py, the buffers' layout,
saved gates and aux as in stepwise.py).

Forward:   a_g,t = h_{t∓1} W_hh,gᵀ + Xp_g,t + b_g,   h_t = cell(a_t, h_{t∓1}, c_{t∓1})   (Xp = x W_ihᵀ before)
Backward:  (d_g, …) = cell'(dy_t + dh_{t±1}, dc_{t±1}, saved),  dh_{t∓1} = Σ_g d_g W_hh,g (+ GRU's z ⊙ dh)

Kernels: rnn_persistent_small_fwd_kernel / _bwd_kernel take any cell; the elman_persistent_small_*
kernels are the Elman cell's entries with its shorter argument list, calling them with CELL = 1.

Tiling: program (i, d) owns batch rows [i·BB, (i+1)·BB) of direction d and ALL of H
(BH = next_pow2(H) ≥ 16). It loads W_hhᵀ (forward) or W_hh (backward) of its direction as G
[BH, BH] blocks (one per gate) before the time loop, so the weights stay on-chip for the whole
sequence, and carries the state h, c (forward) or dh, dc (backward) as fp32 [BB, BH] blocks (fp64 for
fp64 storage) from step to step. Inside the loop only the sequence buffers are read and written (and,
in the GRU / LSTM backward, the previous step's h or c rows).

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

from .cells import bias_slots, cell_backward, cell_forward
from .common import matmul, previous_step, row_lengths, step_index


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
    """The Elman cell's entry (CELL = 1): y written over Xp (same strides), nothing else saved."""
    rnn_persistent_small_fwd_kernel(p_xp, p_y, p_y, p_y, p_h0, p_h0, p_w, p_bias, p_hn, p_hn, p_len, T, B, H,
                                    stride_y_t, stride_y_b, stride_y_t, stride_y_b, stride_y_d,
                                    stride_h0_d, stride_h0_b, stride_h0_h, stride_w_d, stride_w_n, stride_w_k,
                                    1, HAS_BIAS, HAS_LENGTHS, REVERSE, ACT, FAST_TANH, PRECISION, UPCAST, BB, BH)


@triton.jit(do_not_specialize=["T"])
def rnn_persistent_small_fwd_kernel(
    p_xp, p_y, p_gates, p_aux, p_h0, p_c0, p_w, p_bias, p_hn, p_cn, p_len,
    T, B, H,
    stride_x_t, stride_x_b,
    stride_y_t, stride_y_b, stride_y_d,
    stride_h0_d, stride_h0_b, stride_h0_h,
    stride_w_d, stride_w_n, stride_w_k,
    CELL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
    ACT: tl.constexpr, FAST_TANH: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr,
):
    """Any cell. c0 has h0's strides; h_n, c_n are contiguous (dirs, B, H); Xp and gates share strides, as
    y and aux do (stepwise.py's layout)."""
    G: tl.constexpr = CELL
    S: tl.constexpr = G + (G == 3)  # bias slots: GRU's n gate has two
    Hp = stride_y_d
    i_d, rev, o_b, o_h, m_h, m_bh, m_store, len_b = _program_tile(p_len, T, B, H, Hp, REVERSE, HAS_LENGTHS, BB, BH)
    acc_ty = tl.float64 if p_y.dtype.element_ty == tl.float64 else tl.float32

    # W_hh,gᵀ[k, n] = W_hh[g·H + n, k], read through strides: G blocks [BH, BH], on-chip for all T steps.
    w0, w1, w2, w3 = _w_hh_blocks(p_w + i_d * stride_w_d, o_h, m_h, H, Hp, stride_w_n, stride_w_k, G, True)
    b0, b1, b2, b3 = bias_slots(p_bias + i_d * S * H, o_h, m_h, H, tl.zeros([BH], dtype=acc_ty), CELL, HAS_BIAS)
    o_state = i_d * stride_h0_d + o_b[:, None] * stride_h0_b + o_h[None, :] * stride_h0_h
    b_h = tl.load(p_h0 + o_state, mask=m_bh, other=0.0).to(acc_ty)  # [BB, BH]
    b_c = b_h
    if G == 4:
        b_c = tl.load(p_c0 + o_state, mask=m_bh, other=0.0).to(acc_ty)

    o_seq = i_d * Hp + o_b[:, None] * stride_y_b + o_h[None, :]  # [BB, BH] within one step
    o_gseq = o_seq  # Elman's Xp has y's layout: one set of int64 offsets (registers: fp64 spilled with two)
    if G > 1:
        o_gseq = i_d * G * Hp + o_b[:, None] * stride_x_b + o_h[None, :]
    for s in range(0, T):
        t = step_index(s, T, rev)
        t64 = t.to(tl.int64)
        o_t = t64 * stride_y_t + o_seq
        o_g = o_t
        if G > 1:
            o_g = t64 * stride_x_t + o_gseq
        b_hw = b_h.to(p_w.dtype.element_ty)  # the state is rounded only as the dot operand
        # Each gate's pre-activation h W_hh,gᵀ + Xp_g + b_g (the dot accumulates onto Xp); GRU's n gate keeps
        # its two sides apart: a2 = h W_hnᵀ + b_hn (scaled by r in the cell) and x_n = Xp_n + b_in.
        a0 = matmul(b_hw, w0, PRECISION, UPCAST) + _xp(p_xp, o_g, 0, Hp, m_store, acc_ty) + b0[None, :]
        a1, a2, a3, x_n = a0, a0, a0, a0
        if G > 1:
            a1 = matmul(b_hw, w1, PRECISION, UPCAST) + _xp(p_xp, o_g, 1, Hp, m_store, acc_ty) + b1[None, :]
            x_n = _xp(p_xp, o_g, 2, Hp, m_store, acc_ty)
            a2 = matmul(b_hw, w2, PRECISION, UPCAST) + b2[None, :]
        if G == 3:
            x_n += b3[None, :]
        if G == 4:
            a2 += x_n
            a3 = matmul(b_hw, w3, PRECISION, UPCAST) + _xp(p_xp, o_g, 3, Hp, m_store, acc_ty) + b3[None, :]
        h_new, aux, g0, g1, g2, g3 = cell_forward(a0, a1, a2, a3, x_n, b_h, b_c, CELL, ACT, FAST_TANH)
        # Padded columns stay exactly 0 (zero weights, xp and bias give h = 0 and c = 0 in every cell).
        active = (t < len_b)[:, None]
        b_h = tl.where(active, h_new, b_h)
        tl.store(p_y + o_t, tl.where(active, b_h, 0.0).to(p_y.dtype.element_ty), mask=m_store)
        if G > 1:
            keep = active & m_h[None, :]
            g_ty = p_gates.dtype.element_ty
            tl.store(p_aux + o_t, tl.where(keep, aux, 0.0).to(p_aux.dtype.element_ty), mask=m_store)
            tl.store(p_gates + o_g, tl.where(keep, g0, 0.0).to(g_ty), mask=m_store)
            tl.store(p_gates + o_g + Hp, tl.where(keep, g1, 0.0).to(g_ty), mask=m_store)
            tl.store(p_gates + o_g + 2 * Hp, tl.where(keep, g2, 0.0).to(g_ty), mask=m_store)
            if G == 4:
                tl.store(p_gates + o_g + 3 * Hp, tl.where(keep, g3, 0.0).to(g_ty), mask=m_store)
                b_c = tl.where(active, aux, b_c)
    o_last = i_d.to(tl.int64) * B * H + o_b[:, None] * H + o_h[None, :]
    tl.store(p_hn + o_last, b_h.to(p_hn.dtype.element_ty), mask=m_bh)
    if G == 4:
        tl.store(p_cn + o_last, b_c.to(p_cn.dtype.element_ty), mask=m_bh)


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
    """The Elman cell's entry (CELL = 1): dz shares y's layout; p_dh0 receives ∂L/∂h0 as a contiguous
    (dirs, B, H) fp32 (fp64) tensor. y doubles as the gates, aux and previous-state rows (never read)."""
    rnn_persistent_small_bwd_kernel(p_dy, p_dh_n, p_dh_n, p_y, p_y, p_y, p_y, p_y, p_w, p_dz, p_dh0, p_dh0, p_len,
                                    T, B, H, stride_dy_t, stride_dy_b, stride_dy_d, stride_dy_h,
                                    stride_dhn_d, stride_dhn_b, stride_dhn_h, stride_y_t, stride_y_b, stride_y_d,
                                    stride_y_t, stride_y_b, stride_y_t, stride_y_b, stride_dhn_d, stride_dhn_b,
                                    stride_dhn_h, stride_w_d, stride_w_n, stride_w_k,
                                    1, HAS_LENGTHS, REVERSE, ACT, PRECISION, UPCAST, BB, BH)


@triton.jit(do_not_specialize=["T"])
def rnn_persistent_small_bwd_kernel(
    p_dy, p_dh_n, p_dc_n, p_y, p_h0, p_gates, p_aux, p_c0, p_w, p_dz, p_dh0, p_dc0, p_len,
    T, B, H,
    stride_dy_t, stride_dy_b, stride_dy_d, stride_dy_h,
    stride_dhn_d, stride_dhn_b, stride_dhn_h,
    stride_y_t, stride_y_b, stride_y_d,
    stride_x_t, stride_x_b,
    stride_z_t, stride_z_b,
    stride_h0_d, stride_h0_b, stride_h0_h,
    stride_w_d, stride_w_n, stride_w_k,
    CELL: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
    ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr,
):
    """Any cell. dc_n has dh_n's strides, c0 h0's (c0 in aux's dtype); dz has S slots per direction
    (stride_z_*), the gates Xp's layout (stride_x_*); p_dh0, p_dc0 receive ∂L/∂h0, ∂L/∂c0 as contiguous
    (dirs, B, H) fp32 (fp64) tensors."""
    G: tl.constexpr = CELL
    S: tl.constexpr = G + (G == 3)
    Hp = stride_y_d
    i_d, rev, o_b, o_h, m_h, m_bh, m_store, len_b = _program_tile(p_len, T, B, H, Hp, REVERSE, HAS_LENGTHS, BB, BH)
    dz_ty = p_dz.dtype.element_ty
    acc_ty = p_dh0.dtype.element_ty

    # W_hh,g[n, k] = W_hh[g·H + n, k]: G blocks [BH(n), BH(k)], on-chip for all T steps.
    w0, w1, w2, w3 = _w_hh_blocks(p_w + i_d * stride_w_d, o_h, m_h, H, Hp, stride_w_n, stride_w_k, G, False)
    o_dhn = i_d * stride_dhn_d + o_b[:, None] * stride_dhn_b + o_h[None, :] * stride_dhn_h
    b_dh = tl.load(p_dh_n + o_dhn, mask=m_bh, other=0.0).to(acc_ty)  # [BB, BH], fp32 (fp64) carry
    b_dc = b_dh
    if G == 4:
        b_dc = tl.load(p_dc_n + o_dhn, mask=m_bh, other=0.0).to(acc_ty)

    o_seq = i_d * Hp + o_b[:, None] * stride_y_b + o_h[None, :]  # [BB, BH] within one step
    o_zseq = o_seq  # Elman's dz has y's layout: one set of int64 offsets
    if G > 1:
        o_zseq = i_d * S * Hp + o_b[:, None] * stride_z_b + o_h[None, :]
    p_dy = p_dy + i_d * stride_dy_d + o_b[:, None] * stride_dy_b + o_h[None, :] * stride_dy_h
    for s in range(0, T):
        t = step_index(s, T, rev == 0)  # the forward's steps in reverse
        t64 = t.to(tl.int64)
        b_dy = tl.load(p_dy + t64 * stride_dy_t, mask=m_store, other=0.0).to(acc_ty)  # padded rows
        b_h = tl.load(p_y + t64 * stride_y_t + o_seq, mask=m_store, other=0.0).to(acc_ty)
        active = (t < len_b)[:, None]
        a0, a1, a2, a3, b_aux, b_h_prev, b_c_prev = b_h, b_h, b_h, b_h, b_h, b_h, b_h
        if G > 1:
            o_g = t64 * stride_x_t + i_d * G * Hp + o_b[:, None] * stride_x_b + o_h[None, :]
            o_state = i_d * stride_h0_d + o_b[:, None] * stride_h0_b + o_h[None, :] * stride_h0_h
            a0 = tl.load(p_gates + o_g, mask=m_store, other=0.0).to(acc_ty)
            a1 = tl.load(p_gates + o_g + Hp, mask=m_store, other=0.0).to(acc_ty)
            a2 = tl.load(p_gates + o_g + 2 * Hp, mask=m_store, other=0.0).to(acc_ty)
            b_aux = tl.load(p_aux + t64 * stride_y_t + o_seq, mask=m_store, other=0.0).to(acc_ty)
            # The previous step's state, per row: h0 / c0 at a row's first step, else step t∓1's (both
            # loaded whole and selected: a mask from `first` is an int64 tensor in Triton 3.9's interpreter).
            t_prev = previous_step(t, rev)
            first = ((t_prev < 0) | (t_prev >= len_b))[:, None]  # [BB, 1]
            o_prev = tl.minimum(tl.maximum(t_prev, 0), T - 1).to(tl.int64) * stride_y_t + o_seq
            if G == 3:
                b_h_prev = tl.where(first, tl.load(p_h0 + o_state, mask=m_bh, other=0.0).to(acc_ty),
                                    tl.load(p_y + o_prev, mask=m_store, other=0.0).to(acc_ty))
            else:
                a3 = tl.load(p_gates + o_g + 3 * Hp, mask=m_store, other=0.0).to(acc_ty)
                b_c_prev = tl.where(first, tl.load(p_c0 + o_state, mask=m_bh, other=0.0).to(acc_ty),
                                    tl.load(p_aux + o_prev, mask=m_store, other=0.0).to(acc_ty))
        d0, d1, d2, d3, dx_n, dh_direct, dc_prev = cell_backward(b_dy + b_dh, b_dc, b_h, b_aux, a0, a1, a2, a3,
                                                                 b_h_prev, b_c_prev, CELL, ACT)
        keep = active & m_h[None, :]
        o_z = t64 * stride_y_t + o_seq
        if G > 1:
            o_z = t64 * stride_z_t + o_zseq
        d0 = tl.where(keep, d0, 0.0).to(dz_ty)
        tl.store(p_dz + o_z, d0, mask=m_store)
        dh_new = matmul(d0, w0, PRECISION, UPCAST)
        if G > 1:
            d1 = tl.where(keep, d1, 0.0).to(dz_ty)
            d2 = tl.where(keep, d2, 0.0).to(dz_ty)
            tl.store(p_dz + o_z + Hp, d1, mask=m_store)
            tl.store(p_dz + o_z + 2 * Hp, d2, mask=m_store)
            tl.store(p_dz + o_z + 3 * Hp, tl.where(keep, d3 if G == 4 else dx_n, 0.0).to(dz_ty), mask=m_store)
            dh_new += matmul(d1, w1, PRECISION, UPCAST) + matmul(d2, w2, PRECISION, UPCAST)
        if G == 3:
            dh_new += tl.where(keep, dh_direct, 0.0)
        if G == 4:
            dh_new += matmul(tl.where(keep, d3, 0.0).to(dz_ty), w3, PRECISION, UPCAST)
            b_dc = tl.where(active, dc_prev, b_dc)
        b_dh = tl.where(active, dh_new, b_dh)
    o_first = i_d.to(tl.int64) * B * H + o_b[:, None] * H + o_h[None, :]
    tl.store(p_dh0 + o_first, b_dh, mask=m_bh)
    if G == 4:
        tl.store(p_dc0 + o_first, b_dc, mask=m_bh)


@triton.jit
def _w_hh_blocks(p_w, o_h, m_h, H, Hp, stride_w_n, stride_w_k, G: tl.constexpr, TRANSPOSED: tl.constexpr):
    """One direction's W_hh (p_w) as its G gate blocks [BH, BH]: W_hh,g[n, k] = W_hh[g·H + n, k] (the
    backward's dh = Σ_g d_g W_hh,g), or with TRANSPOSED W_hh,gᵀ[k, n] (the forward's h W_hh,gᵀ). Rows n ≥ H
    load as 0; columns k < Hp load whole (the launcher pads W_hh's rows to Hp with zeros: aligned vector
    loads). Unused blocks (G < 4) repeat block 0 and are never read."""
    m_n = m_h
    m_k = o_h < Hp
    if TRANSPOSED:
        p_g = p_w + o_h[:, None] * stride_w_k + o_h[None, :] * stride_w_n  # [BH(k), BH(n)]
        m_w = m_k[:, None] & m_n[None, :]
    else:
        p_g = p_w + o_h[:, None] * stride_w_n + o_h[None, :] * stride_w_k  # [BH(n), BH(k)]
        m_w = m_n[:, None] & m_k[None, :]
    w0 = tl.load(p_g, mask=m_w, other=0.0)
    w1, w2, w3 = w0, w0, w0
    if G > 1:
        w1 = tl.load(p_g + H * stride_w_n, mask=m_w, other=0.0)
        w2 = tl.load(p_g + 2 * H * stride_w_n, mask=m_w, other=0.0)
    if G > 3:
        w3 = tl.load(p_g + 3 * H * stride_w_n, mask=m_w, other=0.0)
    return w0, w1, w2, w3


@triton.jit
def _xp(p_xp, o_g, g, Hp, m_store, acc_ty: tl.constexpr):
    """Gate g's Xp tile at offsets o_g (gate 0's), in the accumulator dtype: padded rows, vectorised loads,
    0 past H."""
    return tl.load(p_xp + o_g + g * Hp, mask=m_store, other=0.0).to(acc_ty)


@triton.jit
def _program_tile(p_len, T, B, H, Hp, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr, BB: tl.constexpr,
                  BH: tl.constexpr):
    """What program (i, d) works on: direction i_d (running backwards when rev), batch rows o_b [BB] and all
    hidden units o_h [BH] (int64), their masks (m_h: h < H; m_bh: b < B and h < H, the states; m_store:
    b < B and h < Hp, the sequence buffers, whose padding columns get their zeros too) and the rows'
    lengths len_b [BB] (T without HAS_LENGTHS)."""
    i_d = tl.program_id(1)
    rev = (i_d == 1) != REVERSE
    o_b = (tl.program_id(0) * BB + tl.arange(0, BB)).to(tl.int64)
    o_h = tl.arange(0, BH).to(tl.int64)
    m_b = o_b < B
    m_h = o_h < H
    len_b = row_lengths(p_len, o_b, m_b, T, HAS_LENGTHS)  # [BB]
    return i_d, rev, o_b, o_h, m_h, m_b[:, None] & m_h[None, :], m_b[:, None] & (o_h < Hp)[None, :], len_b
