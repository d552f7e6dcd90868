"""Host side of the persistent backend: the whole sequence in one launch (kernels/persistent_*.py).

Two kernel shapes, picked by H:
  * small H (BH = next_pow2(H) ≤ SMALL_H_MAX: 256 in 16-bit on devices with the shared memory for
    it, else 128; 64 in fp32/fp64): one program per batch tile holds all of W_hh on-chip and
    carries the state in registers; programs never talk, so a step costs no barrier. One launch
    forward, one backward.
  * large H: n_col = ⌈H / BN⌉ programs each hold a BN-column slice of W_hh and meet at a grid
    barrier every step (every phase, backward). Batch tiles are spread over n_group independent
    barrier groups when the grid has room. One cooperative launch forward, one backward; under
    Triton's interpreter, one launch per step (forward) or phase (backward), because there
    programs run one after another and a barrier would never open.

Limits (LARGE_SLICE_BYTES): the on-chip W_hh slice [BH, BN] and the state tile [BB, BH] are each
kept ≤ 64 KiB, which holds H ≤ 2048 for 16-bit storage, H ≤ 1024 for fp32, H ≤ 512 for fp64.
Larger H is not supported by this backend (check_supported raises; "auto" uses stepwise).
These limits come from on-chip capacity and ptxas's register reports for sm_90a, not yet from
measurement on a GPU.
"""
import functools

import torch
import triton

from elman_triton.config import INTERPRETED, accumulator_dtype, check_buffer
from elman_triton.kernels.barrier import barrier_loop_kernel
from elman_triton.kernels.persistent_large import (elman_persistent_large_bwd_kernel,
                                                   elman_persistent_large_fwd_kernel)
from elman_triton.kernels.persistent_small import (elman_persistent_small_bwd_kernel,
                                                   elman_persistent_small_fwd_kernel)

# Largest next_pow2(H) of the small-H kernel per dtype. ptxas (sm_90a) compiles these without spill
# traffic in the time loop (tests/test_compile_sm90.py); fp32 at 128 spills in the forward. At 256 the
# 16-bit kernel keeps its 256×256 W_hh block in shared memory: 136 KiB forward, 176 KiB backward, so
# it needs a device that offers SMALL_H_256_SHARED_BYTES per program (Hopper: 227 KiB); elsewhere
# the limit is 128.
SMALL_H_MAX = {torch.float16: 256, torch.bfloat16: 256, torch.float32: 64, torch.float64: 64}
SMALL_H_256_SHARED_BYTES = 180 * 1024
LARGE_SLICE_BYTES = 64 * 1024
BB = 16  # batch rows per tile; tl.dot needs ≥ 16
BN = 16  # hidden units per program in the large-H kernel


def _num_warps_small(dtype):
    """Warps of the small-H kernels, from ptxas's register report for sm_90a: 8 for 16-bit and fp32
    (no spill traffic up to BH = 256 / 64); fp64 spills with 4 or 8 (H a multiple of 16 or not) and
    fits with 2."""
    return 2 if dtype == torch.float64 else 8


def _num_warps_large(BH, dtype):
    """Warps for the large-H kernels: enough threads that the [BH, BN] weight slice and the
    [BB, BH] state tile fit in registers without spilling. Chosen from ptxas's register report for
    sm_90a (bf16: 4 warps spill at BH=2048, 8 warps spill in the backward at BH=2048, 16 do not;
    fp32 at BH ≤ 512 fits in 4; fp64 at BH=512 needs 8)."""
    if dtype == torch.float64:
        return 4 if BH <= 256 else 8
    return 4 if BH <= 512 else 8 if BH <= 1024 else 16


def _k_split(BH, num_warps):
    """Chunks of the reduction over H in the large-H kernels: one per warp, each ≥ 16 wide (one mma
    k-step), so each warp's dependent mma chain is BH / (16 · K_SPLIT) long instead of BH / 16."""
    return min(num_warps, BH // 16)


def _bh(H):
    return max(16, triton.next_power_of_2(H))


def _is_small(H, dtype, device):
    BH = _bh(H)
    if BH > SMALL_H_MAX[dtype]:
        return False
    return BH < 256 or _shared_bytes(device) >= SMALL_H_256_SHARED_BYTES


def _shared_bytes(device):
    """Shared memory one program may use on device (opt-in maximum); unbounded under the interpreter."""
    if device is None or torch.device(device).type != "cuda":
        return float("inf")
    return _device_properties(torch.device(device))["max_shared_mem"]


@functools.cache
def _device_properties(device):
    """Triton's view of a CUDA device: SM count, registers and shared memory per SM."""
    index = torch.cuda.current_device() if device.index is None else device.index
    return triton.runtime.driver.active.utils.get_device_properties(index)


def supports(B, H, dtype, device):
    """Whether this backend holds (B, H, dtype) on device; "auto" uses it when it does."""
    if dtype not in SMALL_H_MAX:
        return False
    if _is_small(H, dtype, device):
        return True
    elt = torch.empty((), dtype=dtype).element_size()
    return _bh(H) * max(BN, BB) * elt <= LARGE_SLICE_BYTES


def check_supported(B, H, dtype, device):
    if not supports(B, H, dtype, device):
        raise ValueError(f"backend='persistent' does not hold H={H} in {dtype}: the W_hh slice and state tile "
                         f"must each fit {LARGE_SLICE_BYTES // 1024} KiB on-chip; use backend='stepwise' or 'auto'")


def forward_recurrence(xp, h0, weight_hh, bias, y, opts, reverse=False):
    T, B, H = y.shape
    check_buffer(xp, y.shape, y.dtype, "xp")
    check_buffer(y, y.shape, y.dtype, "y")
    common = dict(HAS_BIAS=bias is not None, REVERSE=reverse, ACT=opts.ACT, FAST_TANH=opts.FAST_TANH,
                  PRECISION=opts.PRECISION, UPCAST=opts.UPCAST, BB=BB, BH=_bh(H))
    bias_arg = bias if bias is not None else xp
    strides = (h0.stride(0), h0.stride(1), weight_hh.stride(0), weight_hh.stride(1))
    if _is_small(H, y.dtype, y.device):
        elman_persistent_small_fwd_kernel[(triton.cdiv(B, BB),)](
            xp, h0, weight_hh, bias_arg, y, T, B, H, *strides, **common, num_warps=_num_warps_small(y.dtype))
        return
    _launch_large(elman_persistent_large_fwd_kernel, y, n_units=T,
                  args=(xp, h0, weight_hh, bias_arg, y), strides=strides, meta=common)


def backward_recurrence(dy, dh_n, y, weight_hh, dz, opts, reverse=False):
    T, B, H = y.shape
    check_buffer(dz, y.shape, y.dtype, "dz")
    dh = torch.empty(B, H, dtype=accumulator_dtype(y.dtype), device=y.device)
    common = dict(REVERSE=reverse, ACT=opts.ACT, PRECISION=opts.PRECISION, UPCAST=opts.UPCAST,
                  BB=BB, BH=_bh(H))
    dy_strides = (dy.stride(0), dy.stride(1), dy.stride(2))
    w_strides = (weight_hh.stride(0), weight_hh.stride(1))
    if _is_small(H, y.dtype, y.device):
        elman_persistent_small_bwd_kernel[(triton.cdiv(B, BB),)](
            dy, dh_n, y, weight_hh, dz, dh, T, B, H, *dy_strides, dh_n.stride(0), dh_n.stride(1), *w_strides,
            **common, num_warps=_num_warps_small(y.dtype))
        return dh
    dh.copy_(dh_n)  # the large kernel reads ∂L/∂h_n from, and leaves ∂L/∂h0 in, this buffer
    _launch_large(elman_persistent_large_bwd_kernel, y, n_units=2 * T,
                  args=(dy, y, weight_hh, dz, dh), strides=dy_strides + w_strides, meta=common)
    return dh


def _launch_large(kernel, y, n_units, args, strides, meta):
    T, B, H = y.shape
    n_col, n_tiles = triton.cdiv(H, BN), triton.cdiv(B, BB)
    num_warps = _num_warps_large(meta["BH"], y.dtype)
    meta = dict(meta, BN=BN, K_SPLIT=_k_split(meta["BH"], num_warps), num_warps=num_warps)
    if INTERPRETED:
        # One unit (step or phase) per launch: Triton's interpreter runs programs one after another.
        for u in range(n_units):
            kernel[(n_col, n_tiles)](*args, args[0], T, B, H, u, u + 1, *strides, **meta, USE_BARRIER=False)
        return
    words = _barrier_words(y.device, n_tiles)
    launch_args = (*args, words, T, B, H, 0, n_units, *strides)
    meta.update(USE_BARRIER=True, launch_cooperative_grid=True)
    capacity = _coresident_programs(kernel.warmup(*launch_args, **meta, grid=(n_col, 1)), y.device,
                                    meta["num_warps"])
    if n_col > capacity:
        raise RuntimeError(f"persistent kernel for H={H} needs {n_col} co-resident programs but this GPU holds "
                           f"{capacity}; use backend='stepwise'")
    kernel[(n_col, min(n_tiles, capacity // n_col))](*launch_args, **meta)


def _coresident_programs(compiled, device, num_warps):
    """How many programs of this compiled kernel the whole GPU holds at once (registers, shared memory,
    threads per SM), as Triton's fused-softmax tutorial computes occupancy."""
    compiled._init_handles()
    props = _device_properties(device)
    threads = 32 * num_warps
    regs = -(-compiled.n_regs // 8) * 8  # registers are allocated 256 per warp, 8 per thread
    per_sm = min(props["max_num_regs"] // max(1, regs * threads),
                 props["max_shared_mem"] // max(1, compiled.metadata.shared),
                 2048 // threads)
    return per_sm * props["multiprocessor_count"]


_BARRIER_WORDS = {}


def _barrier_words(device, n_group):
    """One int32 barrier word per group (kernels/barrier.py), one buffer per (device, stream).

    The kernels leave every word's count at 0, so the buffer is reused by every later launch and
    CUDA-graph replay. It must exist before a graph capture starts (a warm-up call outside the
    capture makes it).
    """
    key = (device, torch.cuda.current_stream(device).cuda_stream)
    words = _BARRIER_WORDS.get(key)
    if words is None or words.numel() < n_group:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the persistent backend's barrier buffer is made on first use; call it once "
                               "outside CUDA-graph capture (a warm-up) before capturing")
        words = torch.zeros(max(n_group, 256), dtype=torch.int32, device=device)
        _BARRIER_WORDS[key] = words
    return words


def barrier_latency_us(device=None, n_programs=None, iters=10_000):
    """Measured cost of one grid barrier (µs): a cooperative launch of n_programs (default: one per SM)
    that does nothing but `iters` barriers, minus the same launch with none. The floor of the
    large-H persistent kernel is T × this."""
    device = torch.device(device or "cuda")
    if device.type != "cuda" or INTERPRETED:
        raise RuntimeError("the grid-barrier micro-benchmark needs a CUDA device (and no TRITON_INTERPRET)")
    if n_programs is None:
        n_programs = torch.cuda.get_device_properties(device).multi_processor_count
    words = _barrier_words(device, 1)

    def run(n):
        barrier_loop_kernel[(n_programs,)](words, n, num_warps=4, launch_cooperative_grid=True)

    run(iters)  # compile and warm up
    times = []
    for n in (0, iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(n)
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return (times[1] - times[0]) * 1e3 / iters
