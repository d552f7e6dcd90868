"""Persistent RNN kernels for large H: W_hh's columns split across programs, a grid barrier per step. The cell
is the CELL constexpr (G gates: 1 Elman, 3 GRU, 4 LSTM; the maths in cells.py, the buffers' layout, saved
gates and aux as in stepwise.py).

Forward:   a_g,t = h_{t∓1} W_hh,gᵀ + Xp_g,t + b_g,   h_t = cell(a_t, h_{t∓1}, c_{t∓1})
Backward:  (d_g, …) = cell'(dy_t + dh_{t±1}, dc_{t±1}, saved),  dh_{t∓1} = Σ_g d_g W_hh,g (+ GRU's z ⊙ dh)

Kernels: rnn_persistent_large_fwd_kernel / _bwd_kernel take any cell; the elman_persistent_large_* kernels
are the Elman cell's entries with its shorter argument list, calling them with CELL = 1.

Tiling: the grid is (n_col, n_group, n_dir). Program (j, g, d) owns hidden units [j·BN, (j+1)·BN) of
direction d (dir_base + the third grid index: both directions in one launch, or one per launch when
the device cannot hold both grids at once) across all G gates, and holds their slice of the weights
on-chip for the whole launch: G blocks W_hh,gᵀ[:, j-slice] ([BH, BN], rows g·H + unit of W_hh) forward,
W_hh,g[:, j-slice] ([BH(n), BN(k)]) backward, with BH = next_pow2(H). It walks batch tiles
g, g + n_group, ... of BB rows. The n_col programs of one group exchange the state through global
memory and meet at their group's barrier once per step:

  forward, step s:  a_g = y_{t∓1}[tile, :] @ W_hh,gᵀ[:, j-slice] + ...; y_t[tile, j-slice] = cell(a); barrier.
            Only h is exchanged: the cell's pointwise maths needs only the program's own units, so LSTM's
            c_{t∓1} (GRU's h_{t∓1} for z ⊙ h) is read at the program's own columns of the fp32 aux
            sequence (of y), which this program wrote itself.
  backward, two phases per step:
    phase 0:  (dz_g)_t[tile, j-slice] = cell'((dy_t + dh)[tile, j-slice], dc, saved); barrier;
    phase 1:  dh[tile, j-slice] = Σ_g dz_g,t[tile, :] @ W_hh,g[:, j-slice] (+ GRU's z ⊙ dh): the G·H-wide
              gate gradient is what is exchanged. dh and LSTM's dc are fp32 (fp64), program-private
              columns, so phase 1 → next phase 0 needs only an intra-program barrier; GRU's z ⊙ dh
              waits in dh's own columns from phase 0 to phase 1.

Layout, directions and lengths as in stepwise.py: element (t, b, d, h) of the sequence buffers (y, aux)
sits at t·stride_t + b·stride_b + d·stride_d + h with stride_d = Hp (H rounded up to 16; the column
programs cover Hp and write zeros in the padding); the gate buffers (Xp, gates, dz) at
t·stride_x_t + b·stride_x_b + (d·S + g)·Hp + h (S = G, or G + 1 for GRU's dz); direction d runs
backwards when (d == 1) != REVERSE; with
HAS_LENGTHS a row's steps t ≥ lengths[b] write y = 0 / dz = 0 and keep its state, so the state a step
reads is h0 (c0) at the row's own first step (a reverse row's first step is t = lengths[b] − 1), else
step t∓1's; h_n (c_n) is written at each row's last step. y may be written over Xp (Elman: p_y = p_xp,
one layout), and the gates over Xp (gates = Xp): a program reads Xp_t only in its own tile and columns,
before writing there, and reads other programs' columns only of y_{t∓1}, complete since the last barrier.

The matmul splits its reduction over H into K_SPLIT chunks, one per warp, so each warp runs
BH / (16·K_SPLIT) dependent mma steps instead of BH / 16: the state row is loaded as
[K_SPLIT, BB, BH / K_SPLIT] chunks, multiplied by the matching [K_SPLIT, BH / K_SPLIT, BN] chunks of
each gate's weight slice (a batched tl.dot, one chunk per warp) and the K_SPLIT partial tiles are summed
(sum_chunks).

Per step, only what changes is computed: the step's row bases (int64, scalar) plus offsets that are
compile-time constants or the same every step; the state comes from one load with no branch (see
the forward). tests/compile_sm90.py counts the SASS instructions per step and bounds them.

Reads of other programs' data use .cg loads (L2, not the incoherent L1). The barrier
(barrier.group_barrier) is one self-resetting word per (direction, group), each on its own 128-byte line:
by default the flip scheme (one release reduction to arrive, acquire polls), FLIP=False
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
from .cells import bias_slots, cell_backward, cell_forward
from .common import is_last_step, matmul, previous_step, row_lengths, step_index


@triton.jit
def sum_chunks(part, K_SPLIT: tl.constexpr):
    """[K_SPLIT, M, N] → [M, N], the sum over the first axis (the split-K partial products, one per
    warp) as log2(K_SPLIT) halvings with tl.split. tl.sum over the warps' axis reduces through shared
    memory twice with shuffles between (≈ 100 instructions per step at K_SPLIT = 8); a split needs
    its pair in one thread, so Triton moves the partials once, through shared memory, into a layout
    with all K_SPLIT of an output in one thread (one output per thread at M = N = 16 and 256
    threads), and the halvings are register adds. The sum's order differs from tl.sum's."""
    M: tl.constexpr = part.shape[1]
    N: tl.constexpr = part.shape[2]
    x = tl.permute(part, (1, 2, 0))  # [M, N, K_SPLIT]
    for i in tl.static_range(6):  # K_SPLIT ≤ 32 (one chunk per warp)
        if (K_SPLIT >> i) > 1:
            a, b = tl.split(tl.reshape(x, [M, N, (K_SPLIT >> i) // 2, 2]))
            x = a + b
    return tl.reshape(x, [M, N])


@triton.jit
def tile_rows(i_b, o_r, B, BB: tl.constexpr):
    """Batch tile i_b: its first row b0 (int64, as b0 · stride is; tl.cast since the interpreter's
    loop index is an int), its rows o_b [BB] and which of them exist."""
    b0 = tl.cast(i_b, tl.int64) * BB
    return b0, b0 + o_r, o_r < B - b0


@triton.jit
def weight_slices(p_w, o_r, o_c, m_w, stride_r, stride_c, stride_gate, G: tl.constexpr, K_SPLIT: tl.constexpr):
    """The G gates' blocks of this program's weight slice, each as [K_SPLIT, BH / K_SPLIT, BN] chunks (the
    split-K operand): gate g's element (r, c) at p_w + o_r[r]·stride_r + o_c[c]·stride_c + g·stride_gate
    (W_hh's rows g·H + n: stride_gate = H · its row stride). Unused gates are placeholders."""
    R: tl.constexpr = o_r.shape[0]
    C: tl.constexpr = o_c.shape[0]
    KC: tl.constexpr = R // K_SPLIT
    p = p_w + o_r[:, None] * stride_r + o_c[None, :] * stride_c
    w0 = tl.reshape(tl.load(p, mask=m_w, other=0.0), [K_SPLIT, KC, C])
    w1, w2, w3 = w0, w0, w0
    if G > 1:
        w1 = tl.reshape(tl.load(p + stride_gate, mask=m_w, other=0.0), [K_SPLIT, KC, C])
        w2 = tl.reshape(tl.load(p + 2 * stride_gate, mask=m_w, other=0.0), [K_SPLIT, KC, C])
    if G > 3:
        w3 = tl.reshape(tl.load(p + 3 * stride_gate, mask=m_w, other=0.0), [K_SPLIT, KC, C])
    return w0, w1, w2, w3


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
    """The Elman cell's entry (CELL = 1): y written over Xp (same strides), nothing else saved, so the
    gate, aux, c0 and c_n pointers are y's, h0's and h_n's (never read or written)."""
    rnn_persistent_large_fwd_kernel(p_xp, p_y, p_y, p_y, p_h0, p_h0, p_w, p_bias, p_hn, p_hn, p_len, p_barrier,
                                    T, B, H, unit_begin, unit_end, dir_base, patience,
                                    stride_y_t, stride_y_b, stride_y_t, stride_y_b, stride_y_d,
                                    stride_h0_d, stride_h0_b, stride_w_d, stride_w_n, stride_w_k,
                                    1, HAS_BIAS, HAS_LENGTHS, REVERSE, USE_BARRIER, FLIP, ACT, FAST_TANH, PRECISION,
                                    UPCAST, BB, BN, BH, K_SPLIT)


@triton.jit(do_not_specialize=["T", "unit_begin", "unit_end", "dir_base", "patience"])
def rnn_persistent_large_fwd_kernel(
    p_xp, p_y, p_gates, p_aux, p_h0, p_c0, p_w, p_bias, p_hn, p_cn, p_len, p_barrier,
    T, B, H, unit_begin, unit_end, dir_base, patience,
    stride_x_t, stride_x_b,
    stride_y_t, stride_y_b, stride_y_d,
    stride_h0_d, stride_h0_b,
    stride_w_d, stride_w_n, stride_w_k,
    CELL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
    USE_BARRIER: tl.constexpr, FLIP: tl.constexpr,
    ACT: tl.constexpr, FAST_TANH: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr, K_SPLIT: tl.constexpr,
):
    """Any cell. h0 and c0 (c0 in aux's fp32 / fp64) share strides, rows padded like y's; h_n, c_n are
    contiguous (dirs, B, H); Xp and gates share strides, as y and aux do; the bias is (dirs, S, H) in
    the accumulator dtype (stepwise.py)."""
    G: tl.constexpr = CELL
    S: tl.constexpr = G + (G == 3)  # bias slots: GRU's n gate has two
    Hp = stride_y_d
    i_n, i_g, i_d = tl.program_id(0), tl.program_id(1), dir_base + tl.program_id(2)
    n_col, n_group = tl.num_programs(0), tl.num_programs(1)
    rev = (i_d == 1) != REVERSE
    o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)  # [BN] this program's hidden units
    o_k = tl.arange(0, BH).to(tl.int64)  # [BH] the whole reduction dimension
    o_r = tl.arange(0, BB).to(tl.int64)  # [BB] the rows of a batch tile
    m_n, m_np = o_n < H, o_n < Hp  # [BN] within H, within the padded row
    acc_ty = tl.float64 if p_y.dtype.element_ty == tl.float64 else tl.float32

    # W_hh,gᵀ[k, n] = W_hh[g·H + n, k]: G blocks [BH, BN], as [K_SPLIT, BH / K_SPLIT, BN] chunks
    w0, w1, w2, w3 = weight_slices(p_w + i_d * stride_w_d, o_k, o_n, (o_k < Hp)[:, None] & m_n[None, :],
                                   stride_w_k, stride_w_n, H * stride_w_n, G, K_SPLIT)
    bias0, bias1, bias2, bias3 = bias_slots(p_bias + i_d * S * H, o_n, m_n, H, tl.zeros([BN], dtype=acc_ty), CELL,
                                            HAS_BIAS)
    p_word = p_barrier + WORD_STRIDE * (1 + i_d * n_group + i_g)
    phase = read_phase(p_word, FLIP) if USE_BARRIER else 0
    p_xp = p_xp + i_d * G * Hp
    p_gates = p_gates + i_d * G * Hp
    p_y = p_y + i_d * Hp
    p_aux = p_aux + i_d * Hp
    p_h0 = p_h0 + i_d * stride_h0_d
    p_c0 = p_c0 + i_d * stride_h0_d
    p_hn = p_hn + i_d.to(tl.int64) * B * H
    p_cn = p_cn + i_d.to(tl.int64) * B * H
    # The state row is read as [K_SPLIT, BB, BH / K_SPLIT] (chunk c: columns [c·KC, (c+1)·KC)), the
    # operand layout of the split-K product: a reshape and permute of a [BB, BH] load cost register
    # moves per mma. o_kk holds compile-time offsets from each row's base (immediate offsets in SASS).
    KC: tl.constexpr = BH // K_SPLIT
    o_kk = tl.arange(0, K_SPLIT)[:, None, None] * KC + tl.arange(0, KC)[None, None, :]  # [K_SPLIT, 1, KC]
    m_hp = o_kk < Hp  # [K_SPLIT, 1, KC] within the padded state row
    o_own = o_r[:, None] * stride_y_b + o_n[None, :]  # [BB, BN] this program's columns, within a tile
    o_gown = o_r[:, None] * stride_x_b + o_n[None, :]  # the same in the gate buffers (Elman: o_own)

    for s in range(unit_begin, unit_end):
        t = step_index(s, T, rev)
        t_prev = previous_step(t, rev)
        o_prev = tl.minimum(tl.maximum(t_prev, 0), T - 1).to(tl.int64) * stride_y_t
        o_t = t.to(tl.int64) * stride_y_t
        p_prev = p_y + o_prev
        o_x = t.to(tl.int64) * stride_x_t
        # num_stages=1: Triton would otherwise prefetch the next tile's state through shared memory
        # (cp.async), one more [BB, BH] buffer per program.
        for i_b in tl.range(i_g, tl.cdiv(B, BB), n_group, num_stages=1):
            b0, o_b, m_b = tile_rows(i_b, o_r, B, BB)
            len_b = row_lengths(p_len, o_b, m_b, T, HAS_LENGTHS)  # [BB]
            m_bp = m_b[:, None] & m_np[None, :]  # [BB, BN] within the padded rows
            # The state: h0 (c0) at a row's first step, else step t∓1's (.cg: other programs wrote
            # it, L1 may be stale). One load from a base per row, no branch: a load in each branch of
            # an `if` costs register moves at the merge (≈ 100 instructions per step), and a per-row
            # choice of pointer (tl.where over pointers) makes Triton 3.9 load one element at a time.
            # GRU's z ⊙ h and LSTM's c need the previous state at the program's own units only.
            b_h_own, b_c_own = bias0, bias0  # placeholders where the cell does not read them
            if HAS_LENGTHS:  # rows start at their own steps (a reverse row at its length − 1)
                # Two loads, each masked to its rows; the second writes into the first's registers.
                # t_prev as a tensor: the interpreters hold a scalar & tensor of bools as int32, which
                # Triton 3.9's interpreter refuses as a mask
                t_prev_b = t_prev + tl.zeros_like(len_b)  # [BB]
                from_y = (t_prev_b >= 0) & (t_prev_b < len_b)  # [BB]
                from_h0 = (t_prev_b < 0) | (t_prev_b >= len_b)
                m_h = m_b[None, :, None] & m_hp  # [K_SPLIT, BB, KC]
                b_prev = tl.load((p_prev + o_b * stride_y_b)[None, :, None] + o_kk, mask=m_h & from_y[None, :, None],
                                 other=0.0, cache_modifier=".cg")
                b_h = tl.load((p_h0 + o_b * stride_h0_b)[None, :, None] + o_kk, mask=m_h & from_h0[None, :, None],
                              other=b_prev, cache_modifier=".cg")  # [K_SPLIT, BB, KC], all programs' columns
                if G == 3:
                    b_h_own = _own_state(p_prev, p_h0, o_b, o_n, stride_y_b, stride_h0_b, m_bp, from_y, from_h0,
                                         acc_ty)
                if G == 4:
                    b_c_own = _own_state(p_aux + o_prev, p_c0, o_b, o_n, stride_y_b, stride_h0_b, m_bp, from_y,
                                         from_h0, acc_ty)
            else:  # every row starts at the first step: one base and row stride for the tile
                first = (t_prev < 0) | (t_prev >= T)
                # Rows past B read row B − 1 (their results are never stored) instead of a mask per
                # row: with B not a multiple of 16 the masks cost registers (100 against 75 at BH =
                # 1024, Triton 3.6: 2 programs per SM instead of 3).
                o_in = tl.minimum(i_b * BB + tl.arange(0, BB), B - 1).to(tl.int64)  # [BB]
                o_rows = o_in * tl.where(first, stride_h0_b, stride_y_b)
                p_rows = tl.where(first, p_h0, p_prev) + o_rows
                b_h = tl.load(p_rows[None, :, None] + o_kk, mask=m_hp, other=0.0, cache_modifier=".cg")
                if G == 3:
                    b_h_own = tl.load(p_rows[:, None] + o_n[None, :], mask=m_np[None, :], other=0.0,
                                      cache_modifier=".cg").to(acc_ty)
                if G == 4:
                    p_crows = tl.where(first, p_c0, p_aux + o_prev) + o_rows
                    b_c_own = tl.load(p_crows[:, None] + o_n[None, :], mask=m_np[None, :], other=0.0,
                                      cache_modifier=".cg").to(acc_ty)
            # Each gate's pre-activation h W_hh,gᵀ + Xp_g + b_g; GRU's n gate keeps its two sides apart:
            # a2 = h W_hnᵀ + b_hn (scaled by r in the cell) and x_n = Xp_n + b_in.
            # Pointers as a scalar base plus one tensor offset: (base + scalars) + o_gown, not base + (scalars +
            # o_gown), which costs a 64-bit add per element (≈ 25 more SASS instructions per step).
            p_x = p_xp + o_x + b0 * stride_x_b + o_gown  # [BB, BN] gate 0's Xp
            # Xp is loaded before the products (its latency behind theirs)
            x0 = tl.load(p_x, mask=m_bp, other=0.0).to(acc_ty)
            x1, x_n, x3 = x0, x0, x0
            if G > 1:
                x1 = tl.load(p_x + Hp, mask=m_bp, other=0.0).to(acc_ty)
                x_n = tl.load(p_x + 2 * Hp, mask=m_bp, other=0.0).to(acc_ty)
            if G > 3:
                x3 = tl.load(p_x + 3 * Hp, mask=m_bp, other=0.0).to(acc_ty)
            a0 = sum_chunks(matmul(b_h, w0, PRECISION, UPCAST), K_SPLIT) + x0 + bias0[None, :]
            a1, a2, a3 = a0, a0, a0
            if G > 1:
                a1 = sum_chunks(matmul(b_h, w1, PRECISION, UPCAST), K_SPLIT) + x1 + bias1[None, :]
                a2 = sum_chunks(matmul(b_h, w2, PRECISION, UPCAST), K_SPLIT) + bias2[None, :]
            if G == 3:
                x_n += bias3[None, :]
            if G == 4:
                a2 += x_n
                a3 = sum_chunks(matmul(b_h, w3, PRECISION, UPCAST), K_SPLIT) + x3 + bias3[None, :]
            h_new, b_aux, g0, g1, g2, g3 = cell_forward(a0, a1, a2, a3, x_n, b_h_own, b_c_own, CELL, ACT, FAST_TANH)
            active = (t < len_b)[:, None]  # [BB, 1]; padding steps store zeros
            # Padding columns get h = 0 from zero weights, Xp, bias and state; gates and aux are zeroed.
            tl.store(p_y + o_t + b0 * stride_y_b + o_own, tl.where(active, h_new, 0.0).to(p_y.dtype.element_ty),
                     mask=m_bp)
            o_last = o_b[:, None] * H + o_n[None, :]
            m_last = m_b[:, None] & m_n[None, :] & is_last_step(t, rev, len_b)[:, None]
            tl.store(p_hn + o_last, h_new.to(p_hn.dtype.element_ty), mask=m_last)
            if G > 1:
                keep = active & m_n[None, :]
                g_ty = p_gates.dtype.element_ty
                p_g = p_gates + o_x + b0 * stride_x_b + o_gown
                tl.store(p_aux + o_t + b0 * stride_y_b + o_own, tl.where(keep, b_aux, 0.0).to(p_aux.dtype.element_ty),
                         mask=m_bp)
                tl.store(p_g, tl.where(keep, g0, 0.0).to(g_ty), mask=m_bp)
                tl.store(p_g + Hp, tl.where(keep, g1, 0.0).to(g_ty), mask=m_bp)
                tl.store(p_g + 2 * Hp, tl.where(keep, g2, 0.0).to(g_ty), mask=m_bp)
                if G == 4:
                    tl.store(p_g + 3 * Hp, tl.where(keep, g3, 0.0).to(g_ty), mask=m_bp)
                    tl.store(p_cn + o_last, b_aux.to(p_cn.dtype.element_ty), mask=m_last)
        if USE_BARRIER:
            phase, patience = group_barrier(p_word, p_barrier, i_n, n_col, phase, patience, FLIP)


@triton.jit
def _own_state(p_seq, p_init, o_b, o_n, stride_seq_b, stride_init_b, m_bp, from_seq, from_init, acc_ty: tl.constexpr):
    """[BB, BN] previous state at this program's own units with lengths: each row's step-t∓1 row of a
    sequence buffer (p_seq: its step base) or its initial state (p_init), two loads each masked to its
    rows, the second into the first's registers."""
    b = tl.load(p_seq + o_b[:, None] * stride_seq_b + o_n[None, :], mask=m_bp & from_seq[:, None], other=0.0,
                cache_modifier=".cg")
    return tl.load(p_init + o_b[:, None] * stride_init_b + o_n[None, :], mask=m_bp & from_init[:, None], other=b,
                   cache_modifier=".cg").to(acc_ty)


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
    """The Elman cell's entry (CELL = 1): the backward reads only y (its own gates) and dz shares y's
    layout, so the h0, gate, aux and c0 pointers are y's and the dc carry dh's (never read or written)."""
    rnn_persistent_large_bwd_kernel(p_dy, p_y, p_y, p_y, p_y, p_y, p_w, p_dz, p_dh, p_dh, p_len, p_barrier,
                                    T, B, H, unit_begin, unit_end, dir_base, patience,
                                    stride_dy_t, stride_dy_b, stride_dy_d, stride_dy_h,
                                    stride_y_t, stride_y_b, stride_y_d, stride_y_t, stride_y_b, stride_y_t, stride_y_b,
                                    stride_dh_d, stride_dh_b, stride_dh_d, stride_dh_b,
                                    stride_w_d, stride_w_n, stride_w_k,
                                    1, HAS_LENGTHS, REVERSE, USE_BARRIER, FLIP, ACT, PRECISION, UPCAST, BB, BN, BH,
                                    K_SPLIT)


@triton.jit(do_not_specialize=["T", "unit_begin", "unit_end", "dir_base", "patience"])
def rnn_persistent_large_bwd_kernel(
    p_dy, p_y, p_h0, p_gates, p_aux, p_c0, p_w, p_dz, p_dh, p_dc, p_len, p_barrier,
    T, B, H, unit_begin, unit_end, dir_base, patience,
    stride_dy_t, stride_dy_b, stride_dy_d, stride_dy_h,
    stride_y_t, stride_y_b, stride_y_d,
    stride_x_t, stride_x_b,
    stride_z_t, stride_z_b,
    stride_h0_d, stride_h0_b,
    stride_dh_d, stride_dh_b,
    stride_w_d, stride_w_n, stride_w_k,
    CELL: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, USE_BARRIER: tl.constexpr,
    FLIP: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr, K_SPLIT: tl.constexpr,
):
    """Any cell. Units are phases: unit u is phase u % 2 of step u // 2. dz has S slots per direction
    (stride_z_*), the gates Xp's layout (stride_x_*); c0 shares h0's strides (aux's dtype). p_dh and
    p_dc are the (dirs, B, ·) fp32 (fp64) carries with one set of strides: ∂L/∂h_n, ∂L/∂c_n on entry,
    ∂L/∂h0, ∂L/∂c0 on exit (dc: LSTM only)."""
    G: tl.constexpr = CELL
    S: tl.constexpr = G + (G == 3)
    Hp = stride_y_d
    i_k, i_g, i_d = tl.program_id(0), tl.program_id(1), dir_base + tl.program_id(2)
    n_col, n_group = tl.num_programs(0), tl.num_programs(1)
    rev = (i_d == 1) != REVERSE
    o_k = (i_k * BN + tl.arange(0, BN)).to(tl.int64)  # [BN] this program's columns of dh
    o_n = tl.arange(0, BH).to(tl.int64)  # [BH] the whole reduction dimension (rows of W_hh,g)
    o_r = tl.arange(0, BB).to(tl.int64)  # [BB] the rows of a batch tile
    m_k, m_kp = o_k < H, o_k < Hp  # [BN] within H, within the padded row
    dz_ty = p_dz.dtype.element_ty
    acc_ty = p_dh.dtype.element_ty

    # W_hh,g[n, k] = W_hh[g·H + n, k]: G blocks [BH, BN], as [K_SPLIT, BH / K_SPLIT, BN] chunks. Where they are
    # loaded moves ptxas's register allocation (sm_90a): the gated cells' here, first (loaded just before the
    # loop, the bf16 LSTM at BH = 1024 spills 8 B in its loop on Triton 3.6, the fp32 LSTM at 128 on 3.9);
    # the Elman cell's just before the loop (loaded here, Triton 3.9 keeps the fp32 ieee slice at BH = 1024
    # in registers and stages it through shared memory every phase: 32 registers, 1.7 KB spilled).
    if G > 1:
        w0, w1, w2, w3 = weight_slices(p_w + i_d * stride_w_d, o_n, o_k, (o_n < H)[:, None] & m_kp[None, :],
                                       stride_w_n, stride_w_k, H * stride_w_n, G, K_SPLIT)
    p_word = p_barrier + WORD_STRIDE * (1 + i_d * n_group + i_g)
    phase = read_phase(p_word, FLIP) if USE_BARRIER else 0
    p_dy = p_dy + i_d * stride_dy_d
    p_y = p_y + i_d * Hp
    p_aux = p_aux + i_d * Hp
    p_gates = p_gates + i_d * G * Hp
    p_dz = p_dz + i_d * S * Hp
    p_dh = p_dh + i_d * stride_dh_d
    p_dc = p_dc + i_d * stride_dh_d
    p_h0 = p_h0 + i_d * stride_h0_d
    p_c0 = p_c0 + i_d * stride_h0_d
    # The dz rows are read as [K_SPLIT, BB, BH / K_SPLIT] chunks, from a base per row (see the forward).
    KC: tl.constexpr = BH // K_SPLIT
    o_nn = tl.arange(0, K_SPLIT)[:, None, None] * KC + tl.arange(0, KC)[None, None, :]  # [K_SPLIT, 1, KC]
    m_np = o_nn < Hp  # [K_SPLIT, 1, KC] within the padded row (padding: dz = 0)
    if G == 1:
        w0, w1, w2, w3 = weight_slices(p_w + i_d * stride_w_d, o_n, o_k, (o_n < H)[:, None] & m_kp[None, :],
                                       stride_w_n, stride_w_k, H * stride_w_n, G, K_SPLIT)

    for u in range(unit_begin, unit_end):
        t = step_index(u // 2, T, rev == 0)  # the forward's steps in reverse
        o_t = t.to(tl.int64) * stride_y_t
        p_y_t = p_y + o_t
        p_dz_t = p_dz + t.to(tl.int64) * stride_z_t
        p_dy_t = p_dy + t.to(tl.int64) * stride_dy_t
        # num_stages=1: no prefetch of the next tile through shared memory (see the forward)
        for i_b in tl.range(i_g, tl.cdiv(B, BB), n_group, num_stages=1):
            b0, o_b, m_b = tile_rows(i_b, o_r, B, BB)
            m_bp = m_b[:, None] & m_kp[None, :]  # [BB, BN] within the padded rows
            len_b = row_lengths(p_len, o_b, m_b, T, HAS_LENGTHS)  # [BB]
            active = (t < len_b)[:, None]  # [BB, 1]
            o_own = o_b[:, None] * stride_y_b + o_k[None, :]  # [BB, BN] in the sequence buffers
            p_dh_own = p_dh + o_b[:, None] * stride_dh_b + o_k[None, :]
            if u % 2 == 0:
                # Loads over the padded width (vectorised for any H); the padding columns' dz is zeroed.
                b_dy = tl.load(p_dy_t + o_b[:, None] * stride_dy_b + o_k[None, :] * stride_dy_h, mask=m_bp, other=0.0)
                b_dh = tl.load(p_dh_own, mask=m_bp, other=0.0)
                b_h = tl.load(p_y_t + o_own, mask=m_bp, other=0.0).to(acc_ty)
                # Placeholders where the cell does not read them (Elman reads only dy, dh and h).
                b_dc, b_aux, a0, a1, a2, a3, b_h_prev, b_c_prev = b_h, b_h, b_h, b_h, b_h, b_h, b_h, b_h
                if G > 1:
                    p_g = p_gates + t.to(tl.int64) * stride_x_t + o_b[:, None] * stride_x_b + o_k[None, :]
                    a0 = tl.load(p_g, mask=m_bp, other=0.0).to(acc_ty)
                    a1 = tl.load(p_g + Hp, mask=m_bp, other=0.0).to(acc_ty)
                    a2 = tl.load(p_g + 2 * Hp, mask=m_bp, other=0.0).to(acc_ty)
                    b_aux = tl.load(p_aux + o_t + o_own, mask=m_bp, other=0.0).to(acc_ty)
                    # The previous step's state at the own units, per row: h0 / c0 at a row's first
                    # step, else step t∓1's (both loaded and selected, as in stepwise's backward).
                    t_prev = previous_step(t, rev)
                    first = ((t_prev < 0) | (t_prev >= len_b))[:, None]  # [BB, 1]
                    o_prev = tl.minimum(tl.maximum(t_prev, 0), T - 1).to(tl.int64) * stride_y_t + o_own
                    o_init = o_b[:, None] * stride_h0_b + o_k[None, :]
                    if G == 3:
                        b_h_prev = tl.where(first, tl.load(p_h0 + o_init, mask=m_bp, other=0.0).to(acc_ty),
                                            tl.load(p_y + o_prev, mask=m_bp, other=0.0).to(acc_ty))
                    else:
                        a3 = tl.load(p_g + 3 * Hp, mask=m_bp, other=0.0).to(acc_ty)
                        b_dc = tl.load(p_dc + o_b[:, None] * stride_dh_b + o_k[None, :], mask=m_bp, other=0.0)
                        b_c_prev = tl.where(first, tl.load(p_c0 + o_init, mask=m_bp, other=0.0).to(acc_ty),
                                            tl.load(p_aux + o_prev, mask=m_bp, other=0.0).to(acc_ty))
                d0, d1, d2, d3, dx_n, dh_direct, dc_prev = cell_backward(b_dy.to(acc_ty) + b_dh, b_dc, b_h, b_aux,
                                                                         a0, a1, a2, a3, b_h_prev, b_c_prev, CELL,
                                                                         ACT)
                keep = active & m_k[None, :]
                p_dz_own = p_dz_t + o_b[:, None] * stride_z_b + o_k[None, :]
                tl.store(p_dz_own, tl.where(keep, d0, 0.0).to(dz_ty), mask=m_bp)
                if G > 1:
                    tl.store(p_dz_own + Hp, tl.where(keep, d1, 0.0).to(dz_ty), mask=m_bp)
                    tl.store(p_dz_own + 2 * Hp, tl.where(keep, d2, 0.0).to(dz_ty), mask=m_bp)
                    tl.store(p_dz_own + 3 * Hp, tl.where(keep, d3 if G == 4 else dx_n, 0.0).to(dz_ty), mask=m_bp)
                if G == 3:  # z ⊙ dh waits in dh's own columns for phase 1 (padding steps: dh untouched)
                    tl.store(p_dh_own, tl.where(keep, dh_direct, 0.0), mask=m_bp & active)
                if G == 4:  # padding steps pass dc through
                    tl.store(p_dc + o_b[:, None] * stride_dh_b + o_k[None, :], tl.where(active, dc_prev, b_dc),
                             mask=m_bp)
            else:
                # The G·H-wide gate gradient of the tile, all programs' columns, gate by gate.
                p_dz_rows = (p_dz_t + o_b * stride_z_b)[None, :, None] + o_nn  # [K_SPLIT, BB, KC]
                m_dz = m_b[None, :, None] & m_np
                part = matmul(tl.load(p_dz_rows, mask=m_dz, other=0.0, cache_modifier=".cg"), w0, PRECISION, UPCAST)
                if G > 1:
                    part += matmul(tl.load(p_dz_rows + Hp, mask=m_dz, other=0.0, cache_modifier=".cg"), w1,
                                   PRECISION, UPCAST)
                    part += matmul(tl.load(p_dz_rows + 2 * Hp, mask=m_dz, other=0.0, cache_modifier=".cg"), w2,
                                   PRECISION, UPCAST)
                if G > 3:
                    part += matmul(tl.load(p_dz_rows + 3 * Hp, mask=m_dz, other=0.0, cache_modifier=".cg"), w3,
                                   PRECISION, UPCAST)
                b_dh_new = sum_chunks(part, K_SPLIT)
                if G == 3:
                    b_dh_new += tl.load(p_dh_own, mask=m_bp, other=0.0)
                # padding steps pass the gradient through: their rows' dh is left as it is
                tl.store(p_dh_own, b_dh_new.to(p_dh.dtype.element_ty), mask=m_bp & active)
        if u % 2 == 0:
            if USE_BARRIER:
                phase, patience = group_barrier(p_word, p_barrier, i_k, n_col, phase, patience, FLIP)
        else:
            tl.debug_barrier()  # this program's dh (dc) stores land before its next phase 0 reads them
