"""Fused stepwise RNN kernels (Elman, GRU, LSTM: the CELL constexpr, kernels/cells.py): one launch per
time step, both directions of a layer in it.

Forward step (the input projection Xp = x W_ihᵀ for all T is one GEMM done before the loop):

    a_g,t = h_{t∓1} W_hh,gᵀ + Xp_g,t + b_g   for each of the cell's G gates,   h_t = cell(a_t, h_{t∓1}, c_{t∓1})

Tiling: program (i, j, d) owns direction d's output tile h_t[i·BB : (i+1)·BB, j·BN : (j+1)·BN] across all
G gates: it keeps G accumulators acc_g[BB, BN] += h_{t∓1}[BB, BK] @ W_hh,gᵀ[BK, BN] (rows g·H + n of
W_hh) over the reduction dimension in BK chunks, so the cell's pointwise maths needs no other program.
W_hhᵀ is never materialised: the tile is loaded through W_hh's strides with the two indices swapped.

Layout: the layer's sequence buffers hold element (t, b, d, h) at t·stride_t + b·stride_b + d·Hp + h
(y, aux, and dz for Elman); the gate buffers (Xp, the saved gates, dz) hold (t, b, d, g, h) at
t·stride_t + b·stride_b + (d·S + g)·Hp + h with S slots per direction (S = G for Xp and the gates;
dz and the bias have one more slot for GRU, see below). Time-major, batch-first and both directions
are the same code. Hp is H rounded up to 16
(the launcher's padding): every row, gate and direction block starts 16-element aligned, so loads
vectorise for any H. The launcher pads the rows of h0, c0 and W_hh the same way (zeros past H), and
loads along a row mask at Hp, not H. Stores cover the padding columns too and write exact zeros there,
which the weight-gradient GEMMs rely on.

Elman (CELL = 1) writes y over Xp (p_y = p_xp; each program reads only the Xp_t tile it overwrites) and
saves nothing else: the backward needs only y. GRU and LSTM also write the activated gates (p_gates,
Xp's layout; may be Xp itself) and one fp32 (fp64) `aux` value per unit (y's layout): LSTM's c_t,
which is also how c carries from step to step in full precision, or GRU's ĥ_t = h W_hnᵀ + b_hn.
The bias is (dirs, S, H) in the accumulator dtype: per gate b_ih + b_hh, except GRU's n gate, whose
slot 2 holds b_hn (hidden side, scaled by r) and slot 3 b_in (input side).

Direction d runs time backwards when (d == 1) != REVERSE. Variable lengths (HAS_LENGTHS): row b's
steps t ≥ lengths[b] are padding; they write y = 0 and leave the state alone, so a reverse row starts
from h0 (c0) at its own end and h_n (c_n) is each row's state after its own last step.

Backward step (BPTT, reverse of the forward order), with dh_{t±1} (dc_{t±1}) the gradient reaching h_t
(c_t) from the step after it:

    (d_g, dx_n, dh_direct, dc_t∓1) = cell'(dy_t + dh_{t±1}, dc_{t±1}, saved values)      (cells.py)
    dh_{t∓1} = Σ_g d_g W_hh,g + dh_direct          (padding steps: d = 0, dh and dc pass through)

Program (i, j, d) owns dh[i-tile, j·BK : (j+1)·BK]. It loops over W_hh's rows n in BN chunks,
recomputing the element-wise d_g[i-tile, n-chunk] it needs (cheaper than a second launch), and also
stores its own chunk of dz = (d_0 … d_{G−1}, and GRU's dx_n in slot 3) for the weight-gradient GEMMs
that follow: slots 0…G−1 are the gradient of W_hh's pre-activations, and of the bias slots one to
one.

Kernels: rnn_step_fwd_kernel / rnn_step_bwd_kernel take any cell; elman_step_fwd_kernel /
elman_step_bwd_kernel are the Elman cell's entries with its shorter argument list (y doubles as its
gates, nothing else saved), calling them with CELL = 1: one body, no twin.

Both kernels take the whole buffers and the step index s, so the launcher passes the same arguments
every step but s. Accumulation and the carried dh, dc are fp32 (fp64 for fp64 storage). Offsets are
int64.
"""
import triton
import triton.language as tl

from .cells import cell_backward, cell_forward
from .common import is_last_step, matmul, previous_step, row_lengths, step_index


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
    """The Elman cell's entry (CELL = 1): y written over Xp (same strides), nothing else saved, so the
    gate, aux and c pointers are y's and h0's (never read or written)."""
    rnn_step_fwd_kernel(p_xp, p_y, p_y, p_y, p_h0, p_h0, p_w, p_bias, p_hn, p_hn, p_len, s, T, B, H,
                        stride_y_t, stride_y_b, stride_y_t, stride_y_b, stride_y_d, stride_h0_d, stride_h0_b,
                        stride_w_d, stride_w_n, stride_w_k, 1, HAS_BIAS, HAS_LENGTHS, REVERSE, ACT, FAST_TANH,
                        PRECISION, UPCAST, BB, BN, BK)


@triton.jit(do_not_specialize=["s", "T"])
def rnn_step_fwd_kernel(
    p_xp, p_y, p_gates, p_aux, p_h0, p_c0, p_w, p_bias, p_hn, p_cn, p_len,
    s, T, B, H,
    stride_x_t, stride_x_b,
    stride_y_t, stride_y_b, stride_y_d,
    stride_h0_d, stride_h0_b,
    stride_w_d, stride_w_n, stride_w_k,
    CELL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
    ACT: tl.constexpr, FAST_TANH: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Any cell (the Elman entry calls it with CELL = 1). h0 (and c0, with h0's strides, in aux's fp32 /
    fp64) come in rows padded like y's; Xp and gates share strides, as y and aux do."""
    G: tl.constexpr = CELL
    S: tl.constexpr = G + (G == 3)  # bias slots: GRU's n gate has two
    Hp = stride_y_d  # the padded row: every gate and direction block starts at a multiple of it
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

    o_yd = i_d * Hp
    # Each row's previous state: its h0 row at its first step, else y_{t∓1}'s row (both padded rows).
    o_state = i_d * stride_h0_d + o_b * stride_h0_b  # [BB]
    o_seq_prev = o_yd + t_read * stride_y_t + o_b * stride_y_b  # [BB]
    p_rows = tl.where(from_h0, p_h0 + o_state, p_y + o_seq_prev)  # [BB]
    p_w = p_w + i_d * stride_w_d
    acc_ty = tl.float64 if p_y.dtype.element_ty == tl.float64 else tl.float32
    acc0 = tl.zeros([BB, BN], dtype=acc_ty)
    acc1, acc2, acc3 = acc0, acc0, acc0
    for k0 in range(0, H, BK):
        o_k = (k0 + tl.arange(0, BK)).to(tl.int64)  # [BK]
        m_k = o_k < Hp
        b_h_prev = tl.load(p_rows[:, None] + o_k[None, :], mask=m_b[:, None] & m_k[None, :],
                           other=0.0, cache_modifier=".cg")  # [BB, BK]; padding columns hold zeros
        acc0 += matmul(b_h_prev, _w_tile(p_w, o_k, o_n, m_k, m_n, stride_w_k, stride_w_n), PRECISION, UPCAST)
        if G > 1:
            acc1 += matmul(b_h_prev, _w_tile(p_w, o_k, 1 * H + o_n, m_k, m_n, stride_w_k, stride_w_n),
                           PRECISION, UPCAST)
            acc2 += matmul(b_h_prev, _w_tile(p_w, o_k, 2 * H + o_n, m_k, m_n, stride_w_k, stride_w_n),
                           PRECISION, UPCAST)
        if G > 3:
            acc3 += matmul(b_h_prev, _w_tile(p_w, o_k, 3 * H + o_n, m_k, m_n, stride_w_k, stride_w_n),
                           PRECISION, UPCAST)

    m_bn = m_b[:, None] & m_n[None, :]
    m_store = m_b[:, None] & (o_n < Hp)[None, :]  # padding columns too (they get zeros)
    t64 = t.to(tl.int64)
    o_x = t64 * stride_x_t + o_b[:, None] * stride_x_b + i_d * G * Hp + o_n[None, :]  # [BB, BN] gate 0
    # Each gate's pre-activation: the accumulated h side, plus Xp and the bias. GRU's n gate keeps its two
    # sides apart: acc2 + b_hn (scaled by r in the cell) and x_n = Xp_n + b_in.
    acc0 += tl.load(p_xp + o_x, mask=m_store, other=0.0).to(acc_ty)
    x_n = acc0
    if G > 1:
        acc1 += tl.load(p_xp + o_x + Hp, mask=m_store, other=0.0).to(acc_ty)
        x_n = tl.load(p_xp + o_x + 2 * Hp, mask=m_store, other=0.0).to(acc_ty)
        if G == 4:
            acc2 += x_n
            acc3 += tl.load(p_xp + o_x + 3 * Hp, mask=m_store, other=0.0).to(acc_ty)
    if HAS_BIAS:
        p_b = p_bias + i_d * S * H + o_n
        acc0 += tl.load(p_b, mask=m_n, other=0.0).to(acc_ty)[None, :]
        if G > 1:
            acc1 += tl.load(p_b + H, mask=m_n, other=0.0).to(acc_ty)[None, :]
            acc2 += tl.load(p_b + 2 * H, mask=m_n, other=0.0).to(acc_ty)[None, :]
        if G == 3:
            x_n += tl.load(p_b + 3 * H, mask=m_n, other=0.0).to(acc_ty)[None, :]
        if G == 4:
            acc3 += tl.load(p_b + 3 * H, mask=m_n, other=0.0).to(acc_ty)[None, :]
    b_h_prev, b_c_prev = acc0, acc0  # placeholders where the cell does not read them
    if G == 3:  # z ⊙ h needs the previous state at this tile's own units
        b_h_prev = tl.load(p_rows[:, None] + o_n[None, :], mask=m_store, other=0.0, cache_modifier=".cg").to(acc_ty)
    if G == 4:
        p_crows = tl.where(from_h0, p_c0 + o_state, p_aux + o_seq_prev)  # [BB]: c0, else c_{t∓1} (fp32)
        b_c_prev = tl.load(p_crows[:, None] + o_n[None, :], mask=m_store, other=0.0, cache_modifier=".cg").to(acc_ty)

    b_h, b_aux, a0, a1, a2, a3 = cell_forward(acc0, acc1, acc2, acc3, x_n, b_h_prev, b_c_prev, CELL, ACT, FAST_TANH)
    keep = (t < len_b)[:, None] & m_n[None, :]  # padding steps and columns store zeros
    o_out = o_yd + t64 * stride_y_t + o_b[:, None] * stride_y_b + o_n[None, :]  # [BB, BN]
    tl.store(p_y + o_out, tl.where(keep, b_h, 0.0).to(p_y.dtype.element_ty), mask=m_store)
    if G > 1:
        g_ty = p_gates.dtype.element_ty
        tl.store(p_aux + o_out, tl.where(keep, b_aux, 0.0).to(p_aux.dtype.element_ty), mask=m_store)
        tl.store(p_gates + o_x, tl.where(keep, a0, 0.0).to(g_ty), mask=m_store)
        tl.store(p_gates + o_x + Hp, tl.where(keep, a1, 0.0).to(g_ty), mask=m_store)
        tl.store(p_gates + o_x + 2 * Hp, tl.where(keep, a2, 0.0).to(g_ty), mask=m_store)
        if G > 3:
            tl.store(p_gates + o_x + 3 * Hp, tl.where(keep, a3, 0.0).to(g_ty), mask=m_store)
    o_last = i_d.to(tl.int64) * B * H + o_b[:, None] * H + o_n[None, :]
    m_last = m_bn & is_last_step(t, rev, len_b)[:, None]
    tl.store(p_hn + o_last, b_h.to(p_hn.dtype.element_ty), mask=m_last)
    if G == 4:
        tl.store(p_cn + o_last, b_aux.to(p_cn.dtype.element_ty), mask=m_last)


@triton.jit
def _w_tile(p_w, o_r, o_c, m_r, m_c, stride_r, stride_c):
    """A [R, C] tile of the direction's W_hh: element (o_r, o_c) at o_r·stride_r + o_c·stride_c. Gate g's
    rows are g·H + n; with the strides swapped the tile is W_hhᵀ's."""
    return tl.load(p_w + o_r[:, None] * stride_r + o_c[None, :] * stride_c, mask=m_r[:, None] & m_c[None, :],
                   other=0.0)


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
    """The Elman cell's entry (CELL = 1): the backward reads only y (its own gates) and dz shares y's
    layout, so the gate, aux, h0, c0 and dc pointers are y's and dh's (never read or written)."""
    rnn_step_bwd_kernel(p_dy, p_dh_next, p_dh_next, p_y, p_y, p_y, p_y, p_y, p_w, p_dz, p_dh, p_dh, p_len, s, T, B, H,
                        stride_dy_t, stride_dy_b, stride_dy_d, stride_dy_h, stride_y_t, stride_y_b, stride_y_d,
                        stride_y_t, stride_y_b, stride_y_t, stride_y_b, stride_dh_d, stride_dh_b, stride_dh_d,
                        stride_dh_b, stride_w_d, stride_w_n, stride_w_k, 1, HAS_LENGTHS, REVERSE, ACT, PRECISION,
                        UPCAST, BB, BN, BK)


@triton.jit(do_not_specialize=["s", "T"])
def rnn_step_bwd_kernel(
    p_dy, p_dh_next, p_dc_next, p_y, p_h0, p_gates, p_aux, p_c0, p_w, p_dz, p_dh, p_dc, p_len,
    s, T, B, H,
    stride_dy_t, stride_dy_b, stride_dy_d, stride_dy_h,
    stride_y_t, stride_y_b, stride_y_d,
    stride_x_t, stride_x_b,
    stride_z_t, stride_z_b,
    stride_h0_d, stride_h0_b,
    stride_dh_d, stride_dh_b,
    stride_w_d, stride_w_n, stride_w_k,
    CELL: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
    ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Any cell (the Elman entry calls it with CELL = 1). dh_next / dh (and dc_next / dc) are the (dirs, B, ·)
    fp32 (fp64) carry buffers; dz has S slots per direction (strides stride_z_*), the gates Xp's layout
    (stride_x_*)."""
    G: tl.constexpr = CELL
    S: tl.constexpr = G + (G == 3)
    Hp = stride_y_d
    i_b, i_k, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rev = (i_d == 1) != REVERSE
    t = step_index(s, T, rev == 0)  # the backward walks the forward's steps in reverse
    t_prev = previous_step(t, rev)
    t64 = t.to(tl.int64)
    o_b = (i_b * BB + tl.arange(0, BB)).to(tl.int64)  # [BB]
    o_k = (i_k * BK + tl.arange(0, BK)).to(tl.int64)  # [BK]
    m_b, m_k = o_b < B, o_k < H
    len_b = row_lengths(p_len, o_b, m_b, T, HAS_LENGTHS)  # [BB]
    active = t < len_b  # [BB]
    from_h0 = (t_prev < 0) | (t_prev >= len_b)
    t_read = tl.minimum(tl.maximum(t_prev, 0), T - 1).to(tl.int64)
    dz_ty = p_dz.dtype.element_ty

    o_yd = i_d * Hp
    o_state = i_d * stride_h0_d + o_b * stride_h0_b  # [BB]
    o_seq_prev = o_yd + t_read * stride_y_t + o_b * stride_y_b  # [BB]
    p_rows = tl.where(from_h0, p_h0 + o_state, p_y + o_seq_prev)  # [BB] h_{t∓1} (GRU)
    p_crows = p_rows  # a placeholder where the cell has no c
    if G == 4:
        p_crows = tl.where(from_h0, p_c0 + o_state, p_aux + o_seq_prev)  # [BB] c_{t∓1}: c0 and aux both fp32
    p_dy = p_dy + i_d * stride_dy_d + t64 * stride_dy_t
    p_y = p_y + o_yd + t64 * stride_y_t
    p_aux = p_aux + o_yd + t64 * stride_y_t
    p_gates = p_gates + i_d * G * Hp + t64 * stride_x_t
    p_dz = p_dz + i_d * S * Hp + t64 * stride_z_t
    p_dh_next = p_dh_next + i_d * stride_dh_d
    p_dc_next = p_dc_next + i_d * stride_dh_d
    p_w = p_w + i_d * stride_w_d

    # This program's own chunk of dz_t, stored once for the weight-gradient GEMMs (padding columns too).
    d0, d1, d2, d3, dx_n, dh_direct, dc_prev, dh_own, dc_own = _grad_tile(
        p_dy, p_dh_next, p_dc_next, p_y, p_rows, p_gates, p_aux, p_crows, o_b, o_k, m_b, m_k, active,
        stride_dy_b, stride_dy_h, stride_y_b, stride_x_b, stride_dh_b, Hp, CELL, ACT)
    p_dz_own = p_dz + o_b[:, None] * stride_z_b + o_k[None, :]
    m_kp = o_k < Hp  # W_hh's rows are padded: a mask constant over 16 elements keeps its loads vectorised
    m_own = m_b[:, None] & m_kp[None, :]
    tl.store(p_dz_own, d0.to(dz_ty), mask=m_own)
    if G > 1:
        tl.store(p_dz_own + Hp, d1.to(dz_ty), mask=m_own)
        tl.store(p_dz_own + 2 * Hp, d2.to(dz_ty), mask=m_own)
        tl.store(p_dz_own + 3 * Hp, (d3 if G == 4 else dx_n).to(dz_ty), mask=m_own)
    if G == 4:  # padding steps pass dc through
        tl.store(p_dc + i_d * stride_dh_d + o_b[:, None] * stride_dh_b + o_k[None, :],
                 tl.where(active[:, None], dc_prev, dc_own), mask=m_own)

    acc = tl.zeros([BB, BK], dtype=p_dh.dtype.element_ty)
    for n0 in range(0, H, BN):
        o_n = (n0 + tl.arange(0, BN)).to(tl.int64)  # [BN]
        m_n = o_n < H
        e0, e1, e2, e3, _, _, _, _, _ = _grad_tile(
            p_dy, p_dh_next, p_dc_next, p_y, p_rows, p_gates, p_aux, p_crows, o_b, o_n, m_b, m_n, active,
            stride_dy_b, stride_dy_h, stride_y_b, stride_x_b, stride_dh_b, Hp, CELL, ACT)  # [BB, BN] each
        acc += matmul(e0.to(dz_ty), _w_tile(p_w, o_n, o_k, m_n, m_kp, stride_w_n, stride_w_k), PRECISION, UPCAST)
        if G > 1:
            acc += matmul(e1.to(dz_ty), _w_tile(p_w, 1 * H + o_n, o_k, m_n, m_kp, stride_w_n, stride_w_k),
                          PRECISION, UPCAST)
            acc += matmul(e2.to(dz_ty), _w_tile(p_w, 2 * H + o_n, o_k, m_n, m_kp, stride_w_n, stride_w_k),
                          PRECISION, UPCAST)
        if G > 3:
            acc += matmul(e3.to(dz_ty), _w_tile(p_w, 3 * H + o_n, o_k, m_n, m_kp, stride_w_n, stride_w_k),
                          PRECISION, UPCAST)
    b_dh = tl.where(active[:, None], acc + dh_direct, dh_own)  # padding steps pass the gradient through unchanged
    tl.store(p_dh + i_d * stride_dh_d + o_b[:, None] * stride_dh_b + o_k[None, :], b_dh, mask=m_own)


@triton.jit
def _grad_tile(p_dy, p_dh_next, p_dc_next, p_y, p_rows, p_gates, p_aux, p_crows, o_b, o_n, m_b, m_n, active,
               stride_dy_b, stride_dy_h, stride_y_b, stride_x_b, stride_dh_b, Hp,
               CELL: tl.constexpr, ACT: tl.constexpr):
    """The cell's gradients (cells.cell_backward) on one [BB, BN] tile, 0 on padding steps and in the padding
    columns, in dh_next's (fp32/fp64) precision, and the carried (dh_next, dc_next) tiles. The loads cover
    the padded rows (o_n < Hp, in bounds in every buffer) so they vectorise for any H; m_n (o_n < H) then
    zeroes the padding. p_* point at step t of the direction (p_rows / p_crows: each row's previous state)."""
    G: tl.constexpr = CELL
    m_load = m_b[:, None] & (o_n < Hp)[None, :]
    o_bn = o_b[:, None] * stride_y_b + o_n[None, :]
    b_dy = tl.load(p_dy + o_b[:, None] * stride_dy_b + o_n[None, :] * stride_dy_h, mask=m_load, other=0.0)
    b_dh = tl.load(p_dh_next + o_b[:, None] * stride_dh_b + o_n[None, :], mask=m_load, other=0.0)
    acc_ty = b_dh.dtype
    b_h = tl.load(p_y + o_bn, mask=m_load, other=0.0).to(acc_ty)
    # Placeholders where the cell does not read them (Elman reads only b_h, dy and dh).
    b_dc, b_aux, a0, a1, a2, a3, b_h_prev, b_c_prev = b_h, b_h, b_h, b_h, b_h, b_h, b_h, b_h
    if G > 1:
        b_aux = tl.load(p_aux + o_bn, mask=m_load, other=0.0).to(acc_ty)
        o_g = o_b[:, None] * stride_x_b + o_n[None, :]
        a0 = tl.load(p_gates + o_g, mask=m_load, other=0.0).to(acc_ty)
        a1 = tl.load(p_gates + o_g + Hp, mask=m_load, other=0.0).to(acc_ty)
        a2 = tl.load(p_gates + o_g + 2 * Hp, mask=m_load, other=0.0).to(acc_ty)
    if G == 3:
        b_h_prev = tl.load(p_rows[:, None] + o_n[None, :], mask=m_load, other=0.0).to(acc_ty)
    if G == 4:
        a3 = tl.load(p_gates + o_g + 3 * Hp, mask=m_load, other=0.0).to(acc_ty)
        b_dc = tl.load(p_dc_next + o_b[:, None] * stride_dh_b + o_n[None, :], mask=m_load, other=0.0)
        b_c_prev = tl.load(p_crows[:, None] + o_n[None, :], mask=m_load, other=0.0).to(acc_ty)
    d0, d1, d2, d3, dx_n, dh_direct, dc_prev = cell_backward(b_dy.to(acc_ty) + b_dh, b_dc, b_h, b_aux, a0, a1, a2, a3,
                                                             b_h_prev, b_c_prev, CELL, ACT)
    keep = active[:, None] & m_n[None, :]
    return (tl.where(keep, d0, 0.0), tl.where(keep, d1, 0.0), tl.where(keep, d2, 0.0), tl.where(keep, d3, 0.0),
            tl.where(keep, dx_n, 0.0), tl.where(keep, dh_direct, 0.0), tl.where(keep, dc_prev, 0.0), b_dh, b_dc)
