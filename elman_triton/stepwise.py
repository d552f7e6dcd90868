"""Host side of the stepwise backend: one fused Triton launch per time step (kernels/stepwise.py).

Both functions fill caller-allocated outputs, so nothing is written that the caller cannot see (the
tests poison those buffers with NaN first). Every user tensor is read through its strides; the only
tensors assumed contiguous are the ones this package allocates (xp, y, dz and the dh buffers).
"""
import torch
import triton

from elman_triton.config import INTERPRETED, accumulator_dtype, check_buffer
from elman_triton.kernels.stepwise import elman_step_bwd_kernel, elman_step_fwd_kernel

NUM_WARPS = 8  # 4 spills at BB=64 (ptxas, sm_90a; tests/test_compile_sm90.py)


def block_sizes(B, H):
    """(BB, BN, BK). tl.dot needs every block dim ≥ 16.

    On GPU, narrow column tiles (BN=32) give H/32 programs per batch tile, enough to spread the
    W_hh read over the SMs at H ≥ 1024. The interpreter pays per program and per op, so it gets
    the widest tiles.
    """
    BB = min(64, max(16, triton.next_power_of_2(B)))
    if INTERPRETED:
        BN = BK = min(128, max(16, triton.next_power_of_2(H)))
    else:
        BN, BK = 32, 64
    return BB, BN, BK


def forward_recurrence(xp, h0, weight_hh, bias, y, opts, reverse=False):
    """y[t] = act(h_prev W_hhᵀ + xp[t] + bias) for every t, in time order (reversed if reverse).

    xp, y: (T, B, H) contiguous; h0: (B, H), any strides; bias: (H,) contiguous or None.
    """
    T, B, H = y.shape
    check_buffer(xp, y.shape, y.dtype, "xp")
    check_buffer(y, y.shape, y.dtype, "y")
    BB, BN, BK = block_sizes(B, H)
    grid = (triton.cdiv(B, BB), triton.cdiv(H, BN))
    h_prev = h0
    for s in range(T):
        t = T - 1 - s if reverse else s
        elman_step_fwd_kernel[grid](
            xp[t], h_prev, weight_hh, bias if bias is not None else xp, y[t],
            B, H,
            xp.stride(1), h_prev.stride(0), h_prev.stride(1),
            weight_hh.stride(0), weight_hh.stride(1), y.stride(1),
            HAS_BIAS=bias is not None, ACT=opts.ACT, FAST_TANH=opts.FAST_TANH,
            PRECISION=opts.PRECISION, UPCAST=opts.UPCAST,
            BB=BB, BN=BN, BK=BK, num_warps=NUM_WARPS,
        )
        h_prev = y[t]


def backward_recurrence(dy, dh_n, y, weight_hh, dz, opts, reverse=False):
    """BPTT through the recurrence. Fills dz (T, B, H) and returns dh0 in the accumulator dtype.

    dy: (T, B, H) and dh_n: (B, H), any strides (autograd hands over expanded zeros, for example).
    """
    T, B, H = y.shape
    check_buffer(dz, y.shape, y.dtype, "dz")
    acc_dtype = accumulator_dtype(y.dtype)
    dh_next = torch.empty(B, H, dtype=acc_dtype, device=y.device)
    dh_next.copy_(dh_n)
    dh = torch.empty_like(dh_next)
    BB, BN, BK = block_sizes(B, H)
    grid = (triton.cdiv(B, BB), triton.cdiv(H, BK))
    for s in range(T):
        t = s if reverse else T - 1 - s
        elman_step_bwd_kernel[grid](
            dy[t], dh_next, y[t], weight_hh, dz[t], dh,
            B, H,
            dy.stride(1), dy.stride(2), y.stride(1),
            weight_hh.stride(0), weight_hh.stride(1), dz.stride(1),
            ACT=opts.ACT, PRECISION=opts.PRECISION, UPCAST=opts.UPCAST,
            BB=BB, BN=BN, BK=BK, num_warps=NUM_WARPS,
        )
        dh_next, dh = dh, dh_next
    return dh_next
