"""Element-wise and matmul helpers shared by every Elman RNN kernel.

ACT is 0 for tanh and 1 for relu (see elman_triton.ops.ACTIVATION_IDS).

tanh has two forms behind the FAST_TANH constexpr:
  * portable: tanh(z) = 2·sigmoid(2z) − 1. It runs in Triton's interpreter, is finite for every z
    (unlike (1 − e^{−2z}) / (1 + e^{−2z}), which is NaN below z ≈ −44) and is accurate to a few ulp
    in absolute terms.
  * fast: the sm_75+ instruction tanh.approx.f32, whose documented maximum relative error is
    2^−10.987 (≈ 4.9e-4). It is only chosen for 16-bit storage on GPU, where rounding the output to
    bf16 (2^−9 relative) or fp16 (2^−11) is of the same size or larger. z must be fp32.

The derivative is taken from the stored output h: tanh'(z) = 1 − h², relu'(z) = [h > 0].
"""
import triton
import triton.language as tl


@triton.jit
def tanh(z, FAST_TANH: tl.constexpr):
    if FAST_TANH:
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [z], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def activation(z, ACT: tl.constexpr, FAST_TANH: tl.constexpr):
    if ACT == 0:
        return tanh(z, FAST_TANH)
    else:
        return tl.maximum(z, 0.0)


@triton.jit
def activation_grad(h, ACT: tl.constexpr):
    """act'(z) expressed through h = act(z)."""
    if ACT == 0:
        return 1.0 - h * h
    else:
        return tl.where(h > 0.0, 1.0, 0.0).to(h.dtype)


@triton.jit
def matmul_split_k(a, b, K_SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a [M, K] @ b [K, N] as K_SPLIT partial products over K/K_SPLIT-wide chunks, summed.

    A plain tl.dot with a small M×N (one 16×16 tile) runs K/16 mma instructions back to back on one
    accumulator in every warp, a dependent chain of 64 mma at K = 1024. The batched form gives each
    warp its own chunk (Triton puts the warps on the batch axis), so the chain is K/(16·K_SPLIT) long
    and the K_SPLIT partial tiles are summed once, through shared memory.
    """
    if K_SPLIT == 1:
        return matmul(a, b, PRECISION, UPCAST)
    M: tl.constexpr = a.shape[0]
    K: tl.constexpr = a.shape[1]
    N: tl.constexpr = b.shape[1]
    a_chunks = tl.permute(tl.reshape(a, [M, K_SPLIT, K // K_SPLIT]), (1, 0, 2))  # [K_SPLIT, M, K/K_SPLIT]
    b_chunks = tl.reshape(b, [K_SPLIT, K // K_SPLIT, N])  # [K_SPLIT, K/K_SPLIT, N]
    return tl.sum(matmul(a_chunks, b_chunks, PRECISION, UPCAST), axis=0)


@triton.jit
def matmul(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation (fp64 for fp64 inputs).

    UPCAST converts 16-bit operands to fp32 first: Triton's interpreter holds bf16 as raw integers and
    a bf16 tl.dot there returns garbage, so the launcher sets it when interpreting.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def step_index(s, T, rev):
    """The time index of step s: t = s, or T − 1 − s when rev (a runtime bool, per direction)."""
    return tl.where(rev, T - 1 - s, s)


@triton.jit
def previous_step(t, rev):
    """The time index of the step before t: t − 1, or t + 1 when rev."""
    return tl.where(rev, t + 1, t - 1)


@triton.jit
def row_lengths(p_len, o_b, m_b, T, HAS_LENGTHS: tl.constexpr):
    """Each batch row's own length [BB] (int64): lengths[b] with HAS_LENGTHS, else T. A row's steps
    t ≥ its length are padding: they neither read nor write its state."""
    if HAS_LENGTHS:
        return tl.load(p_len + o_b, mask=m_b, other=0).to(tl.int64)
    else:
        return tl.zeros_like(o_b) + T


@triton.jit
def is_last_step(t, rev, len_b):
    """[BB] whether t is each row's last step: its length − 1 forward, 0 in reverse (each reverse row
    starts at its own end, len_b − 1, and ends at 0)."""
    return t == tl.where(rev, 0, len_b - 1)  # a where over ints: Triton 3.9's interpreter types a where over bools as int64


@triton.jit
def load_state(p_h0, p_prev, o_b, o_k, m_b, from_h0, any_start, stride_h0_b, stride_prev_b, Hp):
    """The previous state h_{t∓1} of rows o_b, units o_k ([BB, BK]): h0 where from_h0 [BB] (a row's
    first step), else the previous step's output p_prev, read past L1 (.cg) because other programs
    wrote it. Both come in padded rows (Hp, a multiple of 16, zeros past H; the launcher pads h0), so
    the loads vectorise whatever H is.

    On most steps no row starts (any_start, the caller's tl.max of from_h0, is False), and one load
    from a uniform base serves. Only a step where some row starts pays the per-row choice of base
    pointer (more registers for its addresses, once per row)."""
    mask = m_b[:, None] & (o_k < Hp)[None, :]
    if any_start:
        p_rows = tl.where(from_h0, p_h0 + o_b * stride_h0_b, p_prev + o_b * stride_prev_b)  # [BB]
        b_h = tl.load(p_rows[:, None] + o_k[None, :], mask=mask, other=0.0, cache_modifier=".cg")
    else:
        b_h = tl.load(p_prev + o_b[:, None] * stride_prev_b + o_k[None, :], mask=mask, other=0.0,
                      cache_modifier=".cg")
    return b_h
