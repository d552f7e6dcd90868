"""Host side of the stepwise backend: one fused Triton launch per time step (kernels/stepwise.py), both
directions of a layer in each launch (the grid's third axis).

Both functions fill caller-allocated outputs, so nothing is written that the caller cannot see (the
tests poison those buffers with NaN first). User tensors (h0, W_hh, dy, dh_n) are read through their
strides; the sequence buffers this package allocates are indexed through their Layout.

Host cost per step: the arguments are bound once per call (config.direct_launcher) and every step
passes the same tuple with only the step index changed; benchmarks/host_overhead.py measures it.
"""
import torch

from elman_triton.config import (INTERPRETED, accumulator_dtype, cdiv, direct_launcher, next_power_of_2,
                                 on_device)
from elman_triton.kernels.stepwise import elman_step_bwd_kernel, elman_step_fwd_kernel

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


def forward_recurrence(xp, y, h0, weight_hh, bias, h_n, lengths, opts, layout):
    """y[t] = act(h_{t∓1} W_hhᵀ + xp[t] + bias) for every step of every direction; h_n (dirs, B, H) gets
    each row's last state. xp, y: sequence buffers (y may be xp); h0: (dirs, B, Hp) and weight_hh (dirs, H, Hp),
    rows padded like y's (zeros past H);
    (dirs, H, H); bias: (dirs, H) contiguous or None; lengths: (B,) or None."""
    lay = layout
    lay.check(xp, "xp")
    lay.check(y, "y")
    BB, BN, BK = block_sizes(lay.B, lay.H)
    grid = (cdiv(lay.B, BB), cdiv(lay.H, BN), lay.dirs)
    head = (xp, y, h0, weight_hh, bias if bias is not None else xp, h_n, lengths)
    tail = (lay.T, lay.B, lay.H, *lay.seq_strides, h0.stride(0), h0.stride(1), *weight_hh.stride())
    meta = dict(HAS_BIAS=bias is not None, HAS_LENGTHS=lengths is not None, REVERSE=lay.reverse, ACT=opts.ACT,
                FAST_TANH=opts.FAST_TANH, PRECISION=opts.PRECISION, UPCAST=opts.UPCAST,
                BB=BB, BN=BN, BK=BK, num_warps=NUM_WARPS)
    with on_device(y):
        launch = direct_launcher(elman_step_fwd_kernel, grid, (*head, 0, *tail), meta)
        for s in range(lay.T):
            launch(*head, s, *tail)


def backward_recurrence(dy, dh_n, y, weight_hh, dz, lengths, opts, layout):
    """BPTT through the recurrence. Fills dz (y's layout) and returns ∂L/∂h0 (dirs, B, H) in the
    accumulator dtype. dy: y's shape, any strides (autograd hands over expanded zeros, for example);
    dh_n: (dirs, B, H), any strides."""
    lay = layout
    lay.check(dz, "dz")
    dh_next = torch.empty(lay.dirs, lay.B, lay.Hp, dtype=accumulator_dtype(y.dtype), device=y.device)
    dh_next[..., :lay.H].copy_(dh_n)
    dh = torch.empty_like(dh_next)
    BB, BN, BK = block_sizes(lay.B, lay.H)
    grid = (cdiv(lay.B, BB), cdiv(lay.H, BK), lay.dirs)
    meta = dict(HAS_LENGTHS=lengths is not None, REVERSE=lay.reverse, ACT=opts.ACT, PRECISION=opts.PRECISION,
                UPCAST=opts.UPCAST, BB=BB, BN=BN, BK=BK, num_warps=NUM_WARPS)

    # dh_next and dh swap roles every step: the two argument heads are built once.
    heads = [(dy, src, y, weight_hh, dz, dst, lengths) for src, dst in ((dh_next, dh), (dh, dh_next))]
    tail = (lay.T, lay.B, lay.H, *lay.dy_strides(dy), *lay.seq_strides, dh.stride(0), dh.stride(1),
            *weight_hh.stride())
    with on_device(y):
        launch = direct_launcher(elman_step_bwd_kernel, grid, (*heads[0], 0, *tail), meta)
        for s in range(lay.T):
            launch(*heads[s % 2], s, *tail)
    return (dh_next if lay.T % 2 == 0 else dh)[..., :lay.H]
