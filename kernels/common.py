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

