"""Host side of the stepwise backend: one fused Triton launch per time step (kernels/stepwise.py), both
directions of a layer in each launch (the grid's third axis), for every cell (G gates: 1 Elman, 3 GRU,
4 LSTM, the kernels' CELL constexpr).

The functions fill caller-allocated outputs, so nothing is written that the caller cannot see (the
tests poison those buffers with NaN first). User tensors (h0, W_hh, dy, dh_n) are read through their
strides; the sequence buffers this package allocates are indexed through their Layout, and the gate
buffers (G·Hp columns per direction, S·Hp for dz) through their own (t, b) strides.

Host cost per step: the arguments are bound once per call (config.direct_launcher) and every step
passes the same tuple with only the step index changed; benchmarks/host_overhead.py measures it.
"""
import torch

from elman_triton.config import (INTERPRETED, accumulator_dtype, cdiv, direct_launcher, next_power_of_2,
                                 on_device)
from elman_triton.kernels.stepwise import (elman_step_bwd_kernel, elman_step_fwd_kernel, rnn_step_bwd_kernel,
                                           rnn_step_fwd_kernel)

NUM_WARPS = 8  # 4 spills at BB=64 (ptxas, sm_90a; tests/test_compile_sm90.py)


def block_sizes(B, H):
    """(BB, BN, BK). tl.dot needs every block dim ≥ 16.

    On GPU, narrow column tiles (BN=32) give H/32 programs per batch tile, enough to spread the
    W_hh read over the SMs at H ≥ 1024. The interpreter pays per program and per op, so it gets
    the widest tiles.
    """
    BB = min(64, max(16, next_power_of_2(B)))
    if INTERPRETED:
        BN = BK = min(128, max(16, next_power_of_2(H)))
    else:
        BN, BK = 32, 64
    return BB, BN, BK


def gate_slots(G):
    """Slots per direction of dz and of the bias: one per gate, and GRU's n gate has two (its hidden
    side ĥ is scaled by r, its input side is not)."""
    return G + (G == 3)


def forward_recurrence(xp, y, h0, weight_hh, bias, h_n, lengths, opts, layout):
    """Elman: y[t] = act(h_{t∓1} W_hhᵀ + xp[t] + bias) for every step of every direction; h_n (dirs, B, H)
    gets each row's last state. xp, y: sequence buffers (y may be xp); h0: (dirs, B, Hp) and weight_hh
    (dirs, H, Hp), rows padded like y's (zeros past H); bias: (dirs, H) contiguous or None; lengths: (B,)
    or None."""
    lay = layout
    lay.check(xp, "xp")
    lay.check(y, "y")
    head = (xp, y, h0, weight_hh, bias if bias is not None else xp, h_n, lengths)
    tail = (lay.T, lay.B, lay.H, *lay.seq_strides, h0.stride(0), h0.stride(1), *weight_hh.stride())
    _run_steps(elman_step_fwd_kernel, lay, "fwd", [head], tail, bias is not None, opts, None, y)


def backward_recurrence(dy, dh_n, y, weight_hh, dz, lengths, opts, layout):
    """Elman BPTT through the recurrence. Fills dz (y's layout) and returns ∂L/∂h0 (dirs, B, H) in the
    accumulator dtype. dy: y's shape, any strides (autograd hands over expanded zeros, for example);
    dh_n: (dirs, B, H), any strides."""
    lay = layout
    lay.check(dz, "dz")
    dh_a, dh_b = _carries(dh_n, lay, y)
    heads = [(dy, src, y, weight_hh, dz, dst, lengths) for src, dst in ((dh_a, dh_b), (dh_b, dh_a))]
    tail = (lay.T, lay.B, lay.H, *lay.dy_strides(dy), *lay.seq_strides, dh_a.stride(0), dh_a.stride(1),
            *weight_hh.stride())
    _run_steps(elman_step_bwd_kernel, lay, "bwd", heads, tail, None, opts, None, y)
    return (dh_a if lay.T % 2 == 0 else dh_b)[..., :lay.H]


def cell_forward_recurrence(G, xp, y, gates, aux, h0, c0, weight_hh, bias, h_n, c_n, lengths, opts, layout):
    """The forward of a G-gate cell (GRU, LSTM). xp: (T, B, dirs·G·Hp) gate pre-activations x W_ihᵀ
    (batch-first: (B, T, ·)), gate g of direction d in columns (d·G + g)·Hp …; gates: xp's shape and
    strides (may be xp), gets the activated gates; y: sequence buffer; aux: y's shape and strides in
    the accumulator dtype, gets LSTM's c_t / GRU's ĥ_t; h0, c0: (dirs, B, Hp) with the same strides,
    rows padded, c0 in the accumulator dtype; weight_hh (dirs, G·H, Hp); bias: (dirs, S, H) contiguous
    in the accumulator dtype (see kernels/stepwise.py) or None; h_n, c_n: (dirs, B, H) contiguous (c_n:
    any tensor for GRU)."""
    lay = layout
    lay.check(y, "y")
    _check_gates(xp, lay, G, "xp")
    _check_gates(gates, lay, G, "gates")
    assert h0.stride() == c0.stride(), "h0 and c0 share strides"
    head = (xp, y, gates, aux, h0, c0, weight_hh, bias if bias is not None else xp, h_n, c_n, lengths)
    tail = (lay.T, lay.B, lay.H, *_tb_strides(xp, lay), *lay.seq_strides, h0.stride(0), h0.stride(1),
            *weight_hh.stride())
    _run_steps(rnn_step_fwd_kernel, lay, "fwd", [head], tail, bias is not None, opts, G, y)


def cell_backward_recurrence(G, dy, dh_n, dc_n, y, h0, gates, aux, c0, weight_hh, dz, lengths, opts, layout):
    """BPTT of a G-gate cell. Fills dz ((T, B, dirs·S·Hp) in xp's order, S = gate_slots(G): the gradients
    of the hidden-side pre-activations of each gate, and GRU's input-side n gradient in slot 3) and
    returns (∂L/∂h0, ∂L/∂c0 or None), (dirs, B, H) views of the accumulator-dtype carries. dy: y's
    shape, any strides; dh_n, dc_n: (dirs, B, H), any strides (dc_n: LSTM only). The saved y, gates,
    aux and the padded h0, c0 as the forward had them."""
    lay = layout
    lay.check(y, "y")
    _check_gates(gates, lay, G, "gates")
    _check_gates(dz, lay, gate_slots(G), "dz")
    dh_a, dh_b = _carries(dh_n, lay, y)
    dc_a, dc_b = _carries(dc_n, lay, y) if G == 4 else (dh_a, dh_b)  # GRU: no dc (never read or written)
    heads = [(dy, dh_src, dc_src, y, h0, gates, aux, c0, weight_hh, dz, dh_dst, dc_dst, lengths)
             for dh_src, dh_dst, dc_src, dc_dst in ((dh_a, dh_b, dc_a, dc_b), (dh_b, dh_a, dc_b, dc_a))]
    tail = (lay.T, lay.B, lay.H, *lay.dy_strides(dy), *lay.seq_strides, *_tb_strides(gates, lay),
            *_tb_strides(dz, lay), h0.stride(0), h0.stride(1), dh_a.stride(0), dh_a.stride(1), *weight_hh.stride())
    _run_steps(rnn_step_bwd_kernel, lay, "bwd", heads, tail, None, opts, G, y)
    dh0, dc0 = (dh_a, dc_a) if lay.T % 2 == 0 else (dh_b, dc_b)
    return dh0[..., :lay.H], (dc0[..., :lay.H] if G == 4 else None)


def _run_steps(kernel, lay, direction, heads, tail, has_bias, opts, G, y):
    """T launches of a step kernel, step s with heads[s % len(heads)] (the backward's carries swap roles
    every step). G: the cell's CELL constexpr, None for the Elman entries (which fix it)."""
    BB, BN, BK = block_sizes(lay.B, lay.H)
    grid = (cdiv(lay.B, BB), cdiv(lay.H, BN if direction == "fwd" else BK), lay.dirs)
    meta = dict(HAS_LENGTHS=heads[0][-1] is not None, REVERSE=lay.reverse, ACT=opts.ACT, PRECISION=opts.PRECISION,
                UPCAST=opts.UPCAST, BB=BB, BN=BN, BK=BK, num_warps=NUM_WARPS)
    if direction == "fwd":
        meta.update(HAS_BIAS=has_bias, FAST_TANH=opts.FAST_TANH)
    if G is not None:
        meta["CELL"] = G
    with on_device(y):
        launch = direct_launcher(kernel, grid, (*heads[0], 0, *tail), meta)
        for s in range(lay.T):
            launch(*heads[s % len(heads)], s, *tail)


def _carries(grad, lay, y):
    """Two (dirs, B, Hp) accumulator-dtype carries, the first holding grad (dirs, B, H): the kernels
    read one and write the other every step."""
    first = torch.empty(lay.dirs, lay.B, lay.Hp, dtype=accumulator_dtype(y.dtype), device=y.device)
    first[..., :lay.H].copy_(grad)
    return first, torch.empty_like(first)


def _tb_strides(buf, lay):
    """(t, b) strides of a gate buffer in the layer's order."""
    return (buf.stride(1), buf.stride(0)) if lay.batch_first else (buf.stride(0), buf.stride(1))


def _check_gates(buf, lay, slots, name):
    """Gate buffers have rows of dirs·slots·Hp contiguous columns, in the layer's (t, b) order."""
    T, B = (buf.shape[1], buf.shape[0]) if lay.batch_first else buf.shape[:2]
    ok = buf.stride(2) == 1 and buf.shape[2] == lay.dirs * slots * lay.Hp and (T, B) == (lay.T, lay.B)
    assert ok, f"{name} does not have the layer's gate-buffer layout ({slots} slots) {lay}"
