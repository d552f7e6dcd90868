"""Each cell's pointwise maths, forward and backward, in one place: the CELL constexpr of the kernels.

CELL is the cell's gate count G, which is also its id: 1 Elman, 3 GRU, 4 LSTM. PyTorch's maths and gate
order (rows g·H + n of W_ih, W_hh and the biases belong to gate g):

    Elman         h' = act(a₀),                 a_g = x W_ih,gᵀ + h W_hh,gᵀ + b_ih,g + b_hh,g
    GRU (r,z,n)   r = σ(a_r), z = σ(a_z),
                  n = tanh(x W_inᵀ + b_in + r ⊙ ĥ),   ĥ = h W_hnᵀ + b_hn
                  h' = (1 − z) ⊙ n + z ⊙ h
    LSTM (i,f,g,o) i, f, o = σ(a_i, a_f, a_o), g = tanh(a_g)
                  c' = f ⊙ c + i ⊙ g,   h' = o ⊙ tanh(c')

The kernels hand over each gate's whole pre-activation a_g, except GRU's n gate, whose hidden side
ĥ = h W_hnᵀ + b_hn and input side x W_inᵀ + b_in come separately (only the hidden side is scaled by r).

What the forward saves for the backward, per step (besides h' itself, the layer's output): the G
activated gates, and one `aux` value per unit: LSTM's c' (so c carries in fp32 through the saved
sequence, no separate state buffer) or GRU's ĥ (needed for ∂n/∂r). Saving gates rather than
recomputing them avoids a second h W_hhᵀ GEMM per step in the backward (the recurrence's whole cost).

Backward (dh: the total gradient reaching h' (dy + the next step's), dc: LSTM's gradient reaching c'
from the next step) returns the gradients of the hidden-side pre-activations d_g (their sum over
g of d_g W_hh,g is the part of dh_{t−1} through W_hh), GRU's input-side n gradient (dx_n, which
differs from the hidden side's d_n = dx_n ⊙ r), the part of dh_{t−1} not through W_hh (GRU's z ⊙ dh),
and dc_{t−1} (LSTM's f ⊙ dc).
"""
import triton
import triton.language as tl

from .common import activation, activation_grad, tanh


@triton.jit
def sigmoid(z, FAST_TANH: tl.constexpr):
    """σ(z); with FAST_TANH through the hardware tanh (σ(z) = ½ + ½·tanh(z/2)), as precise as tanh's."""
    if FAST_TANH:
        return 0.5 + 0.5 * tanh(0.5 * z, FAST_TANH)
    else:
        return tl.sigmoid(z)


@triton.jit
def bias_slots(p_bias, o_n, m_n, H, zero, CELL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The bias slots of units o_n (mask m_n) of one direction, as (b0, b1, b2, b3) in zero's dtype and
    shape: p_bias points at the direction's (S, H) block, slot s at s·H. Slots past the cell's are
    zero placeholders; GRU's slot 3 is b_in, its n gate's input side (slot 2 is b_hn, scaled by r)."""
    b0, b1, b2, b3 = zero, zero, zero, zero
    if HAS_BIAS:
        p_b = p_bias + o_n
        b0 = tl.load(p_b, mask=m_n, other=0.0).to(zero.dtype)
        if CELL > 1:
            b1 = tl.load(p_b + H, mask=m_n, other=0.0).to(zero.dtype)
            b2 = tl.load(p_b + 2 * H, mask=m_n, other=0.0).to(zero.dtype)
        if CELL > 2:  # GRU: b_in; LSTM: the o gate's bias
            b3 = tl.load(p_b + 3 * H, mask=m_n, other=0.0).to(zero.dtype)
    return b0, b1, b2, b3


@triton.jit
def cell_forward(a0, a1, a2, a3, x_n, h_prev, c_prev, CELL: tl.constexpr, ACT: tl.constexpr, FAST_TANH: tl.constexpr):
    """(h', aux, g0, g1, g2, g3): the new state, the saved extra (LSTM c', GRU ĥ) and the activated gates.
    a_g: gate g's whole pre-activation (x and h sides and biases), except GRU's n gate: a2 is its hidden
    side ĥ (with b_hn) and x_n its input side (with b_in). Unused inputs and outputs are placeholders
    the compiler drops."""
    if CELL == 1:
        h = activation(a0, ACT, FAST_TANH)
        aux, g0, g1, g2, g3 = h, h, h, h, h
    elif CELL == 3:
        g0 = sigmoid(a0, FAST_TANH)  # r
        g1 = sigmoid(a1, FAST_TANH)  # z
        g2 = tanh(x_n + g0 * a2, FAST_TANH)  # n
        h = (1.0 - g1) * g2 + g1 * h_prev
        aux, g3 = a2, g2
    else:
        g0 = sigmoid(a0, FAST_TANH)  # i
        g1 = sigmoid(a1, FAST_TANH)  # f
        g2 = tanh(a2, FAST_TANH)  # g
        g3 = sigmoid(a3, FAST_TANH)  # o
        aux = g1 * c_prev + g0 * g2  # c'
        h = g3 * tanh(aux, FAST_TANH)
    return h, aux, g0, g1, g2, g3


@triton.jit
def cell_backward(dh, dc, h, aux, a0, a1, a2, a3, h_prev, c_prev, CELL: tl.constexpr, ACT: tl.constexpr):
    """(d0, d1, d2, d3, dx_n, dh_direct, dc_prev) from the saved h', aux and gates (see the docstring).
    Every operand is in the accumulator dtype. tanh(c') is recomputed exactly (the portable form)."""
    zero = tl.zeros_like(dh)
    if CELL == 1:
        d0 = dh * activation_grad(h, ACT)
        d1, d2, d3, dx_n, dh_direct, dc_prev = zero, zero, zero, zero, zero, zero
    elif CELL == 3:
        dx_n = dh * (1.0 - a1) * (1.0 - a2 * a2)  # through n = tanh(·)
        d2 = dx_n * a0  # ĥ is scaled by r
        d0 = dx_n * aux * a0 * (1.0 - a0)  # r
        d1 = dh * (h_prev - a2) * a1 * (1.0 - a1)  # z
        dh_direct = dh * a1
        d3, dc_prev = zero, zero
    else:
        tc = tanh(aux, False)
        dc = dc + dh * a3 * (1.0 - tc * tc)
        d0 = dc * a2 * a0 * (1.0 - a0)  # i
        d1 = dc * c_prev * a1 * (1.0 - a1)  # f
        d2 = dc * a0 * (1.0 - a2 * a2)  # g
        d3 = dh * tc * a3 * (1.0 - a3)  # o
        dc_prev = dc * a1
        dx_n, dh_direct = zero, zero
    return d0, d1, d2, d3, dx_n, dh_direct, dc_prev
