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

The matmul splits its reduction over H into K_SPLIT chunks, one per warp, so each warp runs
BH / (16·K_SPLIT) dependent mma steps instead of BH / 16: the state row is loaded as
[K_SPLIT, BB, BH / K_SPLIT] chunks, multiplied by the matching [K_SPLIT, BH / K_SPLIT, BN] chunks of
the weight slice (a batched tl.dot, one chunk per warp) and the K_SPLIT partial tiles are summed
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
from .common import activation, activation_grad, is_last_step, matmul, previous_step, row_lengths, step_index


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
    o_r = tl.arange(0, BB).to(tl.int64)  # [BB] the rows of a batch tile
    m_n, m_np = o_n < H, o_n < stride_y_d  # [BN] within H, within the padded row
    acc_ty = tl.float64 if p_y.dtype.element_ty == tl.float64 else tl.float32

    b_wt = tl.load(p_w + i_d * stride_w_d + o_k[:, None] * stride_w_k + o_n[None, :] * stride_w_n,
                   mask=(o_k < stride_y_d)[:, None] & m_n[None, :], other=0.0)  # [BH, BN] = W_hhᵀ[:, slice]
    b_bias = tl.zeros([BN], dtype=acc_ty)
    if HAS_BIAS:
        b_bias = tl.load(p_bias + i_d * H + o_n, mask=m_n, other=0.0).to(acc_ty)
    p_word = p_barrier + WORD_STRIDE * (1 + i_d * n_group + i_g)
    phase = read_phase(p_word, FLIP) if USE_BARRIER else 0
    p_xp = p_xp + i_d * stride_y_d
    p_y = p_y + i_d * stride_y_d
    p_h0 = p_h0 + i_d * stride_h0_d
    p_hn = p_hn + i_d.to(tl.int64) * B * H
    # The state row is read as [K_SPLIT, BB, BH / K_SPLIT] (chunk c: columns [c·KC, (c+1)·KC)), the
    # operand layout of the split-K product: a reshape and permute of a [BB, BH] load cost register
    # moves per mma. o_kk holds compile-time offsets from each row's base (immediate offsets in SASS).
    KC: tl.constexpr = BH // K_SPLIT
    o_kk = tl.arange(0, K_SPLIT)[:, None, None] * KC + tl.arange(0, KC)[None, None, :]  # [K_SPLIT, 1, KC]
    m_hp = o_kk < stride_y_d  # [K_SPLIT, 1, KC] within the padded state row
    b_w = tl.reshape(b_wt, [K_SPLIT, KC, BN])  # [K_SPLIT, KC, BN] the matching chunks of W_hhᵀ
    o_own = o_r[:, None] * stride_y_b + o_n[None, :]  # [BB, BN] this program's columns, within a tile

    for s in range(unit_begin, unit_end):
        t = step_index(s, T, rev)
        t_prev = previous_step(t, rev)
        p_prev = p_y + tl.minimum(tl.maximum(t_prev, 0), T - 1).to(tl.int64) * stride_y_t
        p_t = p_y + t.to(tl.int64) * stride_y_t
        p_xp_t = p_xp + t.to(tl.int64) * stride_y_t
        # num_stages=1: Triton would otherwise prefetch the next tile's state through shared memory
        # (cp.async), one more [BB, BH] buffer per program.
        for i_b in tl.range(i_g, tl.cdiv(B, BB), n_group, num_stages=1):
            b0, o_b, m_b = tile_rows(i_b, o_r, B, BB)
            len_b = row_lengths(p_len, o_b, m_b, T, HAS_LENGTHS)  # [BB]
            # The state: h0 at a row's first step, else y_{t∓1} (.cg: other programs wrote it, L1 may
            # be stale). One load from a base per row, no branch: a load in each branch of an `if`
            # costs register moves at the merge (≈ 100 instructions per step), and a per-row choice
            # of pointer (tl.where over pointers) makes Triton 3.9 load one element at a time.
            if HAS_LENGTHS:  # rows start at their own steps (a reverse row at its length − 1)
                # Two loads, each masked to its rows; the second writes into the first's registers.
                # t_prev as a tensor: the interpreters hold a scalar & tensor of bools as int32, which
                # Triton 3.9's interpreter refuses as a mask
                t_prev_b = t_prev + tl.zeros_like(len_b)  # [BB]
                from_y = ((t_prev_b >= 0) & (t_prev_b < len_b))[None, :, None]  # [1, BB, 1]
                from_h0 = ((t_prev_b < 0) | (t_prev_b >= len_b))[None, :, None]
                m_h = m_b[None, :, None] & m_hp  # [K_SPLIT, BB, KC]
                b_prev = tl.load((p_prev + o_b * stride_y_b)[None, :, None] + o_kk, mask=m_h & from_y, other=0.0,
                                 cache_modifier=".cg")
                b_h = tl.load((p_h0 + o_b * stride_h0_b)[None, :, None] + o_kk, mask=m_h & from_h0, other=b_prev,
                              cache_modifier=".cg")  # [K_SPLIT, BB, KC], all programs' columns
            else:  # every row starts at the first step: one base and row stride for the tile
                first = (t_prev < 0) | (t_prev >= T)
                # Rows past B read row B − 1 (their results are never stored) instead of a mask per
                # row: with B not a multiple of 16 the masks cost registers (100 against 75 at BH =
                # 1024, Triton 3.6: 2 programs per SM instead of 3).
                o_in = tl.minimum(i_b * BB + tl.arange(0, BB), B - 1).to(tl.int64)  # [BB]
                p_rows = tl.where(first, p_h0, p_prev) + o_in * tl.where(first, stride_h0_b, stride_y_b)
                b_h = tl.load(p_rows[None, :, None] + o_kk, mask=m_hp, other=0.0, cache_modifier=".cg")
            m_bp = m_b[:, None] & m_np[None, :]  # [BB, BN] within the padded rows
            b_xp = tl.load(p_xp_t + b0 * stride_y_b + o_own, mask=m_bp, other=0.0).to(acc_ty)
            z = sum_chunks(matmul(b_h, b_w, PRECISION, UPCAST), K_SPLIT) + b_xp + b_bias[None, :]
            b_out = tl.where((t < len_b)[:, None], activation(z, ACT, FAST_TANH), 0.0)
            tl.store(p_t + b0 * stride_y_b + o_own, b_out.to(p_y.dtype.element_ty), mask=m_bp)
            tl.store(p_hn + o_b[:, None] * H + o_n[None, :], b_out.to(p_hn.dtype.element_ty),
                     mask=m_b[:, None] & m_n[None, :] & is_last_step(t, rev, len_b)[:, None])
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
    o_r = tl.arange(0, BB).to(tl.int64)  # [BB] the rows of a batch tile
    m_k, m_kp = o_k < H, o_k < stride_y_d  # [BN] within H, within the padded row
    dz_ty = p_dz.dtype.element_ty

    b_w = tl.load(p_w + i_d * stride_w_d + o_n[:, None] * stride_w_n + o_k[None, :] * stride_w_k,
                  mask=(o_n < H)[:, None] & m_kp[None, :], other=0.0)  # [BH, BN] = W_hh[:, slice]
    p_word = p_barrier + WORD_STRIDE * (1 + i_d * n_group + i_g)
    phase = read_phase(p_word, FLIP) if USE_BARRIER else 0
    p_dy = p_dy + i_d * stride_dy_d
    p_y = p_y + i_d * stride_y_d
    p_dz = p_dz + i_d * stride_y_d
    p_dh = p_dh + i_d * stride_dh_d
    # The dz row is read as [K_SPLIT, BB, BH / K_SPLIT] chunks, from a base per row (see the forward).
    KC: tl.constexpr = BH // K_SPLIT
    o_nn = tl.arange(0, K_SPLIT)[:, None, None] * KC + tl.arange(0, KC)[None, None, :]  # [K_SPLIT, 1, KC]
    m_np = o_nn < stride_y_d  # [K_SPLIT, 1, KC] within the padded row (padding: dz = 0)
    b_wc = tl.reshape(b_w, [K_SPLIT, KC, BN])  # [K_SPLIT, KC, BN] the matching chunks of W_hh

    for u in range(unit_begin, unit_end):
        t = step_index(u // 2, T, rev == 0)  # the forward's steps in reverse
        p_y_t = p_y + t.to(tl.int64) * stride_y_t
        p_dz_t = p_dz + t.to(tl.int64) * stride_y_t
        p_dy_t = p_dy + t.to(tl.int64) * stride_dy_t
        # num_stages=1: no prefetch of the next tile through shared memory (see the forward)
        for i_b in tl.range(i_g, tl.cdiv(B, BB), n_group, num_stages=1):
            b0, o_b, m_b = tile_rows(i_b, o_r, B, BB)
            m_bp = m_b[:, None] & m_kp[None, :]  # [BB, BN] within the padded rows
            active = (t < row_lengths(p_len, o_b, m_b, T, HAS_LENGTHS))[:, None]  # [BB, 1]
            o_own = o_b[:, None] * stride_y_b + o_k[None, :]  # [BB, BN] in the sequence buffers
            p_dh_own = p_dh + o_b[:, None] * stride_dh_b + o_k[None, :]
            if u % 2 == 0:
                # Loads over the padded width (vectorised for any H); the padding columns' dz is zeroed.
                b_dy = tl.load(p_dy_t + o_b[:, None] * stride_dy_b + o_k[None, :] * stride_dy_h, mask=m_bp, other=0.0)
                b_dh = tl.load(p_dh_own, mask=m_bp, other=0.0)
                b_h = tl.load(p_y_t + o_own, mask=m_bp, other=0.0).to(b_dh.dtype)
                b_dz = tl.where(active & m_k[None, :], (b_dy.to(b_dh.dtype) + b_dh) * activation_grad(b_h, ACT), 0.0)
                tl.store(p_dz_t + o_own, b_dz.to(dz_ty), mask=m_bp)
            else:
                b_dz_row = tl.load((p_dz_t + o_b * stride_y_b)[None, :, None] + o_nn, mask=m_b[None, :, None] & m_np,
                                   other=0.0, cache_modifier=".cg")  # [K_SPLIT, BB, KC], all programs' columns
                b_dh_new = sum_chunks(matmul(b_dz_row, b_wc, PRECISION, UPCAST), K_SPLIT)
                # padding steps pass the gradient through: their rows' dh is left as it is
                tl.store(p_dh_own, b_dh_new.to(p_dh.dtype.element_ty), mask=m_bp & active)
        if u % 2 == 0:
            if USE_BARRIER:
                phase, patience = group_barrier(p_word, p_barrier, i_k, n_col, phase, patience, FLIP)
        else:
            tl.debug_barrier()  # this program's dh stores land before its next phase 0 reads them
