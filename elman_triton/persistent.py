"""Host side of the persistent backend: the whole sequence in one launch (kernels/persistent_*.py), both
directions of a layer in it.

Two kernel shapes, picked by H:
  * small H (BH = next_pow2(H) ≤ SMALL_H_MAX: 256 in 16-bit on devices with the shared memory for
    it, else 128; 64 in fp32/fp64): one program per (batch tile, direction) holds all of W_hh
    on-chip and carries the state in registers; programs never talk, so a step costs no barrier.
  * large H: n_col = ⌈H / BN⌉ programs per direction each hold a BN-column slice of W_hh and meet at
    a grid barrier every step (every phase, backward). Batch tiles are spread over n_group
    independent barrier groups when the grid has room. One cooperative launch forward, one
    backward, both directions in it when the device holds 2·n_col programs at once, else one
    launch per direction (sequential_directions says which). The grid is sized from the registers
    and shared memory of the kernel compiled for the call's own arguments (lengths need more), and
    fits answers for "auto" the same way. Under Triton's interpreter, one launch per step (forward)
    or phase (backward), because there programs run one after another and a barrier would never open.

The gated cells (GRU, LSTM: cell_forward_recurrence / cell_backward_recurrence, stepwise's contract)
run on the same two kernel shapes with the cell as their CELL constexpr: the small-H kernel within
CELL_SMALL_H_MAX, the large-H kernel (a program owns BN units across all G gates, G [BH, BN] blocks of
W_hh on-chip) within CELL_LARGE_H_MAX, with the grid co-resident on the device (cell_supports); larger H
raises ValueError ("auto" uses stepwise).

Host cost per call: everything but the tensors (the compiled kernel, its grid, the barrier buffer, the
remaining arguments) is a launch plan built on a call's first use of its shape (_PLANS), so a call
checks its buffers, looks the plan up and calls the compiled kernel directly; benchmarks/host_overhead.py
measures it.

Limits (LARGE_SLICE_BYTES): the on-chip W_hh slice [BH, BN] and the state tile [BB, BH] are each
kept ≤ 64 KiB, which holds H ≤ 2048 for 16-bit storage, H ≤ 1024 for fp32, H ≤ 512 for fp64.
Larger H is not supported by this backend (check_supported raises; "auto" uses stepwise), and
neither is a grid the device cannot hold at once ("auto" checks that too, see fits).

The barrier never hangs: every wait is bounded by MAX_POLLS polls, after which the kernel sets the
buffer's error word and finishes; the launcher raises RuntimeError when it sees the word (see
check_errors for when).
"""
import contextlib
import dataclasses
import functools
import time
import types

import torch
import triton

from elman_triton.config import (INTERPRETED, Layout, accumulator_dtype, bound_launch, cdiv, compile_kernel,
                                 constexpr_args, kernel_options, next_power_of_2, on_device, padded, with_fp_fusion)
from elman_triton.kernels.barrier import WORD_STRIDE, barrier_loop_kernel
from elman_triton.kernels.persistent_large import (elman_persistent_large_bwd_kernel,
                                                   elman_persistent_large_fwd_kernel, rnn_persistent_large_bwd_kernel,
                                                   rnn_persistent_large_fwd_kernel)
from elman_triton.kernels.persistent_small import (elman_persistent_small_bwd_kernel,
                                                   elman_persistent_small_fwd_kernel, rnn_persistent_small_bwd_kernel,
                                                   rnn_persistent_small_fwd_kernel)
from elman_triton.stepwise import _tb_strides

# Largest next_pow2(H) of the small-H kernel per dtype. ptxas (sm_90a) compiles these without spill
# traffic in the time loop (tests/test_compile_sm90.py); fp32 at 128 spills in the forward. At 256 the
# 16-bit kernel keeps its 256×256 W_hh block in shared memory: 136 KiB forward, 176 KiB backward, so
# it needs a device that offers SMALL_H_256_SHARED_BYTES per program (Hopper: 227 KiB); elsewhere
# the limit is 128.
SMALL_H_MAX = {torch.float16: 256, torch.bfloat16: 256, torch.float32: 64, torch.float64: 64}
SMALL_H_256_SHARED_BYTES = 180 * 1024
# The same for the gated cells (G = 3 GRU, 4 LSTM), which hold G [BH, BH] blocks of W_hh: largest BH with
# no spill traffic in the time loop (sm_90a, the Elman kernels' warps; benchmarks/NOTES.md, "Persistent
# small-H kernels with the cell"). fp64 LSTM spills in the forward's loop at 32. Larger H: stepwise.
CELL_SMALL_H_MAX = {G: {torch.float16: 128, torch.bfloat16: 128, torch.float32: 32,
                        torch.float64: 32 if G == 3 else 16} for G in (3, 4)}
CELL_NAMES = {3: "GRU", 4: "LSTM"}
# The gated cells on the large-H kernel: largest BH per dtype whose sm_90a compile (forward and backward,
# both alignments, Triton 3.6 and 3.9, tests/test_compile_sm90.py) has no spill traffic in the time loop,
# with _cell_large_meta's tiles and warps (benchmarks/NOTES.md, "LSTM and GRU on the persistent large-H
# kernel").
# Beyond them: at BH = 2048 (16-bit) both cells' backward spills in its loop; at fp32 BH = 256 both cells'
# backward does on Triton 3.9 (255 registers; the ieee fp32 dot runs on FMAs); at fp64 the LSTM backward
# spills in its loop at 128 with 4 warps (its forward with 8), the GRU forward at 256 with 8.
CELL_LARGE_H_MAX = {G: {torch.float16: 1024, torch.bfloat16: 1024, torch.float32: 128,
                        torch.float64: 128 if G == 3 else 64} for G in (3, 4)}
# Hidden units per program of the cells' large-H kernels: 8, not Elman's 16 (N = 8 is the mma's own), so a
# program's G weight blocks are 4·BH·8 elements for the LSTM. Batch rows per tile: CELL_BB forward,
# CELL_BB_BACKWARD backward (tl.dot pads M to the mma's 16): with 16 the LSTM backward's G·[BB, BH] gate
# gradient spills in its loop at BH = 512 and 1024 (16-bit, 8 or 16 warps), and the fp64 GRU forward at 256.
CELL_BN = 8
CELL_BB = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 16, torch.float64: 8}
CELL_BB_BACKWARD = 8
LARGE_SLICE_BYTES = 64 * 1024
BB = 16  # batch rows per tile; tl.dot needs ≥ 16
BN = 16  # hidden units per program in the large-H kernel (large_config overrides it)
# Polls a barrier wait may make before it gives up. One poll is an L2 round trip (≈ 0.3-1 µs on a
# busy H100/H200), so this is ≈ 1-2 s; a real step waits a few µs.
MAX_POLLS = 1 << 21
# Shared memory the hardware reserves for each resident block (sm_80 and later), beyond the kernel's own.
RESERVED_SHARED_PER_BLOCK = 1024
# Least time between two reads of a barrier buffer's error word by the launches (see check_errors): a
# read is an asynchronous copy and an event, a few µs of host time, so at most one per millisecond.
ERROR_READ_INTERVAL_S = 1e-3


@dataclasses.dataclass(frozen=True)
class LargeConfig:
    """The large-H kernel's free choices: BN columns per program, warps, and K_SPLIT chunks of the
    reduction (None: the rule below). Overridden for measurement with large_config(...)."""
    BN: int = BN
    num_warps: int | None = None
    K_SPLIT: int | None = None
    flip_barrier: bool = True


_large = LargeConfig()


@contextlib.contextmanager
def large_config(BN=None, num_warps=None, K_SPLIT=None, flip_barrier=None):
    """Override the large-H kernel's BN, warps, K_SPLIT or barrier scheme (flip or the older count)
    within the block, for the GPU variant measurements (benchmarks/gpu_phases.py)."""
    global _large
    saved = _large
    changes = dict(BN=BN, num_warps=num_warps, K_SPLIT=K_SPLIT, flip_barrier=flip_barrier)
    _large = dataclasses.replace(saved, **{k: v for k, v in changes.items() if v is not None})
    try:
        yield _large
    finally:
        _large = saved


def _num_warps_small(dtype):
    """Warps of the small-H kernels, from ptxas's register report for sm_90a: 8 for 16-bit and fp32
    (no spill traffic up to BH = 256 / 64); fp64 spills with 4 or 8 (H a multiple of 16 or not) and
    fits with 2."""
    return 2 if dtype == torch.float64 else 8


def _num_warps_large(BH, dtype):
    """Warps for the large-H kernels: enough threads that the [BH, BN] weight slice and the
    [BB, BH] state tile fit in registers without spilling. Chosen from ptxas's register report for
    sm_90a (bf16: 4 warps spill at BH=2048, 8 warps spill in the backward at BH=2048, 16 do not;
    fp32 spills a few bytes in the forward with 4 warps at BH = 256 and 8 at BH = 1024, so 8 and 16; fp64
    at BH=512 needs 8)."""
    if _large.num_warps is not None:
        return _large.num_warps
    if dtype == torch.float64:
        return 4 if BH <= 256 else 8
    if dtype == torch.float32:
        return 8 if BH <= 512 else 16
    return 4 if BH <= 512 else 8 if BH <= 1024 else 16


def _num_warps_cell(BH):
    """Warps of the cells' large-H kernels (ptxas's register report for sm_90a, forward and backward, no
    spill in the loop): 4 up to BH = 256, else 8 (fp32 and fp64 stop at 128). At 16-bit BH = 1024 the LSTM
    backward uses all 255 registers of a thread on Triton 3.6 (one program per SM), and 16 warps (128
    registers at most) spill there; 8 warps spill in the fp32 LSTM backward at 256."""
    return 4 if BH <= 256 else 8


def _k_split(BH, num_warps):
    """Chunks of the reduction over H in the large-H kernels: one per warp, each ≥ 16 wide (one mma
    k-step), so each warp's dependent mma chain is BH / (16 · K_SPLIT) long instead of BH / 16."""
    return _large.K_SPLIT or min(num_warps, BH // 16)


def _bh(H):
    return max(16, next_power_of_2(H))


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
    """Whether this backend's kernels hold (H, dtype) on device by size; see fits for the grid."""
    if dtype not in SMALL_H_MAX:
        return False
    if _is_small(H, dtype, device):
        return True
    return _bh(H) * max(BN, BB) * dtype.itemsize <= LARGE_SLICE_BYTES


def check_supported(B, H, dtype, device):
    if not supports(B, H, dtype, device):
        raise ValueError(f"backend='persistent' does not hold H={H} in {dtype}: the W_hh slice and state tile "
                         f"must each fit {LARGE_SLICE_BYTES // 1024} KiB on-chip; use backend='stepwise' or 'auto'")


def fits(layout, dtype, device, opts, has_lengths=None):
    """Whether "auto" may use this backend: the size is held (supports) and, for the large kernel, the
    device holds one direction's n_col programs at once, forward and backward, by the registers and
    shared memory of the kernels such a call compiles (see _stand_in_plan). has_lengths: whether the
    call passes lengths, whose kernels need more registers (bf16, BH = 1024: 206 instead of 127);
    None (not known) asks that both fit. Computed once per layout, device and configuration."""
    if not supports(layout.B, layout.H, dtype, device):
        return False
    if _is_small(layout.H, dtype, device) or INTERPRETED:
        return True
    return _large_fits(layout, dtype, torch.device(device), opts, _large, has_lengths)


@functools.lru_cache(maxsize=1024)
def _large_fits(layout, dtype, device, opts, config, has_lengths):
    """fits for the large kernel: one cache look-up per call ("auto" asks on every call)."""
    variants = (False, True) if has_lengths is None else (bool(has_lengths),)
    return all(_stand_in_plan(kernel, layout, dtype, device, opts, config, with_lengths).fits
               for kernel in (elman_persistent_large_fwd_kernel, elman_persistent_large_bwd_kernel)
               for with_lengths in variants)


def sequential_directions(layout, dtype, device, opts, has_lengths=False):
    """Whether a bidirectional layer on the large kernel runs its directions one launch after the other
    (the device cannot hold both grids at once). False for the small kernel and under the interpreter."""
    if layout.dirs == 1 or INTERPRETED or _is_small(layout.H, dtype, device):
        return False
    plan = _stand_in_plan(elman_persistent_large_fwd_kernel, layout, dtype, torch.device(device), opts, _large,
                          has_lengths)
    return 2 * plan.n_col > plan.capacity


def forward_recurrence(xp, y, h0, weight_hh, bias, h_n, lengths, opts, layout):
    layout.check(xp, "xp")
    if y is not xp:
        layout.check(y, "y")
    tensors = (xp, y, h0, weight_hh, xp if bias is None else bias, h_n, lengths)
    _run((_forward_plan, layout, y.dtype, opts, bias is not None, None if lengths is None else lengths.dtype,
          h0.stride(), weight_hh.stride()), tensors, y.device)


def backward_recurrence(dy, dh_n, y, weight_hh, dz, lengths, opts, layout):
    """Fills dz (y's layout); returns ∂L/∂h0 (dirs, B, H) in the accumulator dtype."""
    lay = layout
    lay.check(dz, "dz")
    key = (_backward_plan, lay, y.dtype, opts, None if lengths is None else lengths.dtype, dy.stride(),
           weight_hh.stride())
    if _is_small(lay.H, y.dtype, y.device):
        dh0 = torch.empty(lay.dirs, lay.B, lay.H, dtype=accumulator_dtype(y.dtype), device=y.device)
        _run(key + (dh_n.stride(),), (dy, dh_n, y, weight_hh, dz, dh0, lengths), y.device)
        return dh0
    # The large kernel reads ∂L/∂h_n from, and leaves ∂L/∂h0 in, this (dirs, B, Hp) buffer.
    dh = torch.empty(lay.dirs, lay.B, lay.Hp, dtype=accumulator_dtype(y.dtype), device=y.device)
    if lay.Hp == lay.H:
        dh.copy_(dh_n)
    else:
        dh = dh[..., :lay.H].copy_(dh_n)  # a view of the buffer, as the caller gets ∂L/∂h0 back
    _run(key + (None,), (dy, y, weight_hh, dz, dh, lengths), y.device)
    return dh


def _cell_is_small(G, H, dtype):
    return _bh(H) <= CELL_SMALL_H_MAX[G].get(dtype, 0)


def cell_supports(G, H, dtype, device=None):
    """Whether backend='persistent' holds a G-gate cell (GRU, LSTM) of this H in dtype: the small-H kernel
    within CELL_SMALL_H_MAX, else the large-H kernel within CELL_LARGE_H_MAX whose column programs (one
    direction's) the CUDA device holds at once, by the registers and shared memory of its kernels compiled
    for it (device None: the current CUDA device; not checked under the interpreter or without CUDA).
    Computed once per (G, H, dtype, device)."""
    if _cell_is_small(G, H, dtype):
        return True
    if _bh(H) > CELL_LARGE_H_MAX[G].get(dtype, 0):
        return False
    if INTERPRETED or not torch.cuda.is_available():
        return True
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    return device.type != "cuda" or _cell_large_fits(G, H, dtype, device, _large)


@functools.lru_cache(maxsize=1024)
def _cell_large_fits(G, H, dtype, device, config):
    """Whether device holds the n_col programs of the cells' large-H kernels, forward and backward, with and
    without lengths (stand-in compiles, as _large_fits; B = 16: the batch does not change the grid's column
    count, and compiles of other B differ by a few registers)."""
    layout = Layout(1, 16, H, 1, 16 * padded(H), padded(H), False, False)
    opts = kernel_options(dtype, "tanh")
    return all(_stand_in_plan(kernel, layout, dtype, device, opts, config, with_lengths, G).fits
               for kernel in (rnn_persistent_large_fwd_kernel, rnn_persistent_large_bwd_kernel)
               for with_lengths in (False, True))


def cell_check_supported(G, H, dtype, device=None):
    if not cell_supports(G, H, dtype, device):
        small, large = CELL_SMALL_H_MAX[G].get(dtype), CELL_LARGE_H_MAX[G].get(dtype)
        if large and _bh(H) <= large:
            why = (f"this GPU cannot hold the {cdiv(padded(H), CELL_BN)} programs of its large-H kernel at once "
                   f"(next_pow2(H) ≤ {large} in {dtype})")
        else:
            why = (f"its small-H kernel holds H ≤ {small} and its large-H kernel next_pow2(H) ≤ {large} in {dtype} "
                   "(G blocks of W_hh on-chip per program, no spills)" if large else f"it holds no H in {dtype}")
        raise ValueError(f"backend='persistent' does not hold the {CELL_NAMES[G]} at H={H} in {dtype}: {why}; use "
                         "backend='stepwise' or 'auto'")


def cell_forward_recurrence(G, xp, y, gates, aux, h0, c0, weight_hh, bias, h_n, c_n, lengths, opts, layout):
    """stepwise.cell_forward_recurrence's contract (same buffers, same results) in one launch of the
    small-H or large-H kernel; gates must share xp's strides (the kernels read both through one pair).
    ValueError where the kernels do not hold H (cell_check_supported)."""
    lay = layout
    cell_check_supported(G, lay.H, y.dtype, y.device)
    lay.check(y, "y")
    assert aux.stride() == y.stride() and gates.stride() == xp.stride(), "aux shares y's strides, gates xp's"
    assert h0.stride() == c0.stride(), "h0 and c0 share strides"
    tensors = (xp, y, gates, aux, h0, c0, weight_hh, xp if bias is None else bias, h_n, c_n, lengths)
    _run((_cell_forward_plan, G, lay, y.dtype, opts, bias is not None, None if lengths is None else lengths.dtype,
          _tb_strides(xp, lay), h0.stride(), weight_hh.stride()), tensors, y.device)


def cell_backward_recurrence(G, dy, dh_n, dc_n, y, h0, gates, aux, c0, weight_hh, dz, lengths, opts, layout):
    """stepwise.cell_backward_recurrence's contract in one launch of the small-H or large-H kernel: fills dz
    and returns (∂L/∂h0, ∂L/∂c0 or None), (dirs, B, H) in the accumulator dtype (contiguous, or views of
    the large kernel's padded carries)."""
    lay = layout
    cell_check_supported(G, lay.H, y.dtype, y.device)
    lay.check(y, "y")
    acc = accumulator_dtype(y.dtype)
    small = _cell_is_small(G, lay.H, y.dtype)
    if small and G == 4 and dc_n.stride() != dh_n.stride():  # the kernel reads both through one set of strides
        dh_n, dc_n = dh_n.contiguous(), dc_n.contiguous()
    key = (_cell_backward_plan, G, lay, y.dtype, opts, None if lengths is None else lengths.dtype, dy.stride(),
           dh_n.stride() if small else None, _tb_strides(gates, lay), _tb_strides(dz, lay), h0.stride(),
           weight_hh.stride())
    if small:
        dh0 = torch.empty(lay.dirs, lay.B, lay.H, dtype=acc, device=y.device)
        dc0 = torch.empty_like(dh0) if G == 4 else dh0  # GRU: never read or written
        _run(key, (dy, dh_n, dc_n if G == 4 else dh_n, y, h0, gates, aux, c0, weight_hh, dz, dh0, dc0, lengths),
             y.device)
        return dh0, (dc0 if G == 4 else None)
    # The large kernel reads ∂L/∂h_n (∂L/∂c_n) from, and leaves ∂L/∂h0 (∂L/∂c0) in, (dirs, B, Hp) carries
    # with one set of strides (GRU: dh doubles as the dc it never touches).
    carries = torch.empty(2 if G == 4 else 1, lay.dirs, lay.B, lay.Hp, dtype=acc, device=y.device)
    dh, dc = carries[0], carries[-1]
    dh[..., :lay.H].copy_(dh_n)
    if G == 4:
        dc[..., :lay.H].copy_(dc_n)
    _run(key, (dy, y, h0, gates, aux, c0, weight_hh, dz, dh, dc, lengths), y.device)
    return dh[..., :lay.H], (dc[..., :lay.H] if G == 4 else None)


# ------------------------------------------------------------------------------------ launch plans

class _Plan:
    """Everything a call with one key needs but its tensors, built once (_PLANS): `runs`, the
    (launch, tail) pairs of its launches, each called as launch(*tensors, [words,] *tail), launch a
    compiled kernel bound to its grid and stream (or kernel[grid] under the interpreter) and tail its
    remaining arguments; for the large kernel `n_words`, the barrier words it uses, `words`, the
    eager buffer it shares (attached by the first eager call), and `what` ran, for error messages."""
    __slots__ = ("runs", "n_words", "words", "what")

    def __init__(self, runs, n_words=None, words=None, what=None):
        self.runs, self.n_words, self.words, self.what = runs, n_words, words, what


# (key, large_config, device, stream, alignment) -> _Plan. A key names the builder and every argument of
# the launch that Triton specialises on or that sizes the grid (see forward_recurrence): the layout
# (T, B, H, strides, direction order), y's dtype (ops gives h0, W_hh, h_n and dy y's dtype, the bias the
# accumulator's), the options, which optional tensors are there and the strides of the user's tensors.
# The alignment guard adds the tensors' 16-byte alignment, so a compiled kernel only ever gets
# pointers it was specialised for.
_PLANS = {}
_PLANS_MAX = 1024  # keys include T: a bound, not a cache policy


def _run(key, tensors, device):
    """Launch the kernels of key's plan on these tensors, building the plan on first use, on the tensors'
    device (multi-GPU): the device guard only when it is not the current one, since entering and
    leaving torch.cuda.device costs more host time than the rest of a call."""
    if INTERPRETED:  # host time does not matter there; a plan per call follows kernels that tests replace
        plan = key[0](tensors, device, None, *key[1:])
        words = () if plan.n_words is None else (plan.words,)
        for launch, tail in plan.runs:
            launch(*tensors, *words, *tail)
        return
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            return _run(key, tensors, device)
    stream = _current_stream(device)
    plan_key = (key, _large, device, stream, _alignment(tensors))
    plan = _PLANS.get(plan_key)
    if plan is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[plan_key] = key[0](tensors, device, stream, *key[1:])
    if plan.n_words is None:  # small kernel: no barrier
        for launch, tail in plan.runs:
            launch(*tensors, *tail)
        return
    if torch.cuda.is_current_stream_capturing():  # a buffer of the capture's own, see _barrier_words
        words = _barrier_words(device, plan.n_words)
        for launch, tail in plan.runs:
            launch(*tensors, words, *tail)
        return
    words = plan.words
    if words is None:
        words = plan.words = _barrier_words(device, plan.n_words)
    due = time.perf_counter() >= _reads.due  # time to look at the error word (see check_errors)
    if due:
        check_errors(device)
    for launch, tail in plan.runs:
        launch(*tensors, words, *tail)
    if due:
        _reads.due = time.perf_counter() + ERROR_READ_INTERVAL_S
        if not _PENDING:
            _after_launch(words, plan.what)


def _current_stream(device):
    """The handle of device's current CUDA stream, as torch.cuda.current_stream(device).cuda_stream
    gives it, without building a Stream object (a few µs)."""
    return torch._C._cuda_getCurrentRawStream(device.index)


def _alignment(tensors):
    """0 when every tensor is 16-byte aligned (the usual case: one OR per tensor), else which are not.
    Triton specialises a pointer on exactly this (aligned loads and stores, or not)."""
    bits = 0
    for t in tensors:
        if t is not None:
            bits |= t.data_ptr()
    if not bits & 15:
        return 0
    return tuple(t is not None and t.data_ptr() & 15 != 0 for t in tensors)


def _forward_plan(tensors, device, stream, lay, dtype, opts, has_bias, lengths_dtype, h0_strides, w_strides):
    meta = dict(HAS_BIAS=has_bias, HAS_LENGTHS=lengths_dtype is not None, REVERSE=lay.reverse, ACT=opts.ACT,
                FAST_TANH=opts.FAST_TANH, PRECISION=opts.PRECISION, UPCAST=opts.UPCAST, BB=BB, BH=_bh(lay.H))
    if _is_small(lay.H, dtype, device):
        return _small_plan(elman_persistent_small_fwd_kernel, lay, dtype, stream, tensors,
                           (lay.T, lay.B, lay.H, *lay.seq_strides, *h0_strides, *w_strides), meta)
    return _large_plan(elman_persistent_large_fwd_kernel, lay, dtype, device, stream, tensors, lay.T,
                       (*lay.seq_strides, *h0_strides[:2], *w_strides), meta)


def _backward_plan(tensors, device, stream, lay, dtype, opts, lengths_dtype, dy_strides, w_strides, dh_n_strides):
    meta = dict(HAS_LENGTHS=lengths_dtype is not None, REVERSE=lay.reverse, ACT=opts.ACT, PRECISION=opts.PRECISION,
                UPCAST=opts.UPCAST, BB=BB, BH=_bh(lay.H))
    dy_strides = lay.dy_strides(tensors[0])
    if _is_small(lay.H, dtype, device):
        return _small_plan(elman_persistent_small_bwd_kernel, lay, dtype, stream, tensors,
                           (lay.T, lay.B, lay.H, *dy_strides, *dh_n_strides, *lay.seq_strides, *w_strides), meta)
    dh = tensors[4]
    return _large_plan(elman_persistent_large_bwd_kernel, lay, dtype, device, stream, tensors, 2 * lay.T,
                       (*dy_strides, *lay.seq_strides, dh.stride(0), dh.stride(1), *w_strides), meta)


def _cell_forward_plan(tensors, device, stream, G, lay, dtype, opts, has_bias, lengths_dtype, x_strides, h0_strides,
                       w_strides):
    meta = dict(CELL=G, HAS_BIAS=has_bias, HAS_LENGTHS=lengths_dtype is not None, REVERSE=lay.reverse, ACT=opts.ACT,
                FAST_TANH=opts.FAST_TANH, PRECISION=opts.PRECISION, UPCAST=opts.UPCAST, BB=BB, BH=_bh(lay.H))
    if _cell_is_small(G, lay.H, dtype):
        return _small_plan(rnn_persistent_small_fwd_kernel, lay, dtype, stream, tensors,
                           (lay.T, lay.B, lay.H, *x_strides, *lay.seq_strides, *h0_strides, *w_strides), meta)
    return _large_plan(rnn_persistent_large_fwd_kernel, lay, dtype, device, stream, tensors, lay.T,
                       (*x_strides, *lay.seq_strides, *h0_strides[:2], *w_strides),
                       dict(meta, **_cell_large_meta(lay.H, dtype, backward=False)))


def _cell_backward_plan(tensors, device, stream, G, lay, dtype, opts, lengths_dtype, dy_strides, dh_n_strides,
                        x_strides, z_strides, h0_strides, w_strides):
    meta = dict(CELL=G, HAS_LENGTHS=lengths_dtype is not None, REVERSE=lay.reverse, ACT=opts.ACT,
                PRECISION=opts.PRECISION, UPCAST=opts.UPCAST, BB=BB, BH=_bh(lay.H))
    if _cell_is_small(G, lay.H, dtype):
        return _small_plan(rnn_persistent_small_bwd_kernel, lay, dtype, stream, tensors,
                           (lay.T, lay.B, lay.H, *lay.dy_strides(tensors[0]), *dh_n_strides, *lay.seq_strides,
                            *x_strides, *z_strides, *h0_strides, *w_strides), meta)
    dh = tensors[8]
    return _large_plan(rnn_persistent_large_bwd_kernel, lay, dtype, device, stream, tensors, 2 * lay.T,
                       (*lay.dy_strides(tensors[0]), *lay.seq_strides, *x_strides, *z_strides, *h0_strides[:2],
                        dh.stride(0), dh.stride(1), *w_strides),
                       dict(meta, **_cell_large_meta(lay.H, dtype, backward=True)))


def _small_plan(kernel, lay, dtype, stream, tensors, tail, meta):
    grid = (cdiv(lay.B, BB), lay.dirs)
    meta = dict(meta, num_warps=_num_warps_small(dtype))
    return _Plan([_bound_launch(kernel, grid, (*tensors, *tail), len(tensors), meta, stream)])


def _large_plan(kernel, lay, dtype, device, stream, tensors, n_units, strides, meta):
    """The large kernel's launches, sized from the kernel compiled for exactly these arguments. meta's BB,
    BN, warps and K_SPLIT (the cells') win over _large_meta's (Elman's)."""
    meta = dict(_large_meta(lay.H, dtype), **meta)
    n_col, n_tiles = cdiv(lay.Hp, meta["BN"]), cdiv(lay.B, meta["BB"])  # the programs cover the padded row
    n_lead = len(tensors) + 1  # the tensors and the barrier buffer, which each call passes

    def args(unit_begin, unit_end, dir_base, patience, words):
        return (*tensors, words, lay.T, lay.B, lay.H, unit_begin, unit_end, dir_base, patience, *strides)

    if INTERPRETED:
        # One unit (step or phase) per launch: Triton's interpreter runs programs one after another,
        # so there is no barrier (and its buffer is any int32 tensor).
        words = torch.zeros(WORD_STRIDE.value, dtype=torch.int32, device=device)
        runs = [_bound_launch(kernel, (n_col, n_tiles, lay.dirs), args(u, u + 1, 0, 0, words), n_lead,
                              dict(meta, USE_BARRIER=False), stream) for u in range(n_units)]
        return _Plan(runs, n_words=0, words=words)
    # Compiled for these very arguments: the plan describes the kernel that is launched.
    stand_in_words = torch.empty(1, dtype=torch.int32, device=device)  # any 16-byte aligned int32 buffer
    compiled, plan = _compile_large(kernel, args(0, n_units, 0, MAX_POLLS, stand_in_words), meta, lay.H, device)
    if not plan.fits:
        raise RuntimeError(f"persistent kernel {kernel.__name__} for H={lay.H} needs {plan.n_col} co-resident "
                           f"programs but this GPU holds {plan.capacity}; use backend='stepwise' or 'auto'")
    # Both directions in one grid when the device holds them; else one launch per direction.
    dirs_at_once = lay.dirs if lay.dirs * n_col <= plan.capacity else 1
    n_group = min(n_tiles, plan.capacity // (n_col * dirs_at_once))
    grid = (n_col, n_group, dirs_at_once)
    runs = [_bound_launch(kernel, grid, args(0, n_units, dir_base, MAX_POLLS, stand_in_words), n_lead, plan.meta,
                          stream, compiled) for dir_base in range(0, lay.dirs, dirs_at_once)]
    return _Plan(runs, n_words=lay.dirs * n_group, what=(kernel.__name__, lay.H, grid, len(runs)))


def _bound_launch(kernel, grid, args, n_leading, meta, stream, compiled=None):
    """(launch, tail) with launch(*args[:n_leading], *tail) == kernel[grid](*args, **meta) (fp fusion
    as config.with_fp_fusion): on GPU the compiled kernel's launcher bound to grid and stream
    (config.bound_launch), called with the full argument list, skipping Triton's per-call binding,
    specialisation, cache look-up and launch metadata; valid for any later leading arguments Triton
    specialises alike (the plan key's job)."""
    if INTERPRETED:
        return functools.partial(kernel[grid], **with_fp_fusion(meta)), args[n_leading:]
    compiled = compiled or compile_kernel(kernel, args, meta)
    tail = (*args[n_leading:], *constexpr_args(kernel, args, meta))
    return bound_launch(compiled, grid, stream), tail


@dataclasses.dataclass(frozen=True)
class LargeKernelPlan:
    """One compiled large-H kernel on one device: its meta-parameters, its n_col column programs (one
    barrier group of one direction) and how many of its programs the whole device holds at once."""
    meta: dict
    n_col: int
    capacity: int

    @property
    def fits(self):
        return self.capacity >= self.n_col


def _large_meta(H, dtype):
    """BN, K_SPLIT, warps and barrier scheme of the large-H kernel (under the current large_config)."""
    return _large_meta_cached(H, dtype, _large)


@functools.cache
def _large_meta_cached(H, dtype, config):
    BH = _bh(H)
    num_warps = _num_warps_large(BH, dtype)
    return dict(BN=config.BN, K_SPLIT=_k_split(BH, num_warps), num_warps=num_warps, FLIP=config.flip_barrier)


def _cell_large_meta(H, dtype, backward):
    """BB, BN, K_SPLIT and warps of the cells' large-H kernels; the barrier scheme as large_config says."""
    BH = _bh(H)
    num_warps = _num_warps_cell(BH)
    return dict(BB=CELL_BB_BACKWARD if backward else CELL_BB[dtype], BN=CELL_BN, K_SPLIT=min(num_warps, BH // 16),
                num_warps=num_warps, FLIP=_large.flip_barrier)


def _compile_large(kernel, args, meta, H, device):
    """(compiled, LargeKernelPlan) of the large kernel compiled for exactly these arguments and
    meta-parameters (found in Triton's cache when compiled before) as a cooperative launch."""
    meta = dict(meta, USE_BARRIER=True, launch_cooperative_grid=True)
    compiled = compile_kernel(kernel, args, meta)
    return compiled, LargeKernelPlan(meta, cdiv(padded(H), meta["BN"]),
                                     _coresident_programs(compiled, device, meta["num_warps"]))


@functools.lru_cache(maxsize=256)
def _stand_in_plan(kernel, layout, dtype, device, opts, config, has_lengths, G=1):
    """The LargeKernelPlan of the launch that a call with this layout makes, for fits (which has no
    tensors): compiled from stand-ins that Triton specialises as the tensors ops passes (16-byte
    aligned; h0 and W_hh rows padded to Hp and contiguous; dy laid out like y; a bias in the
    accumulator dtype; lengths or not), so the call's own launch finds this compile in Triton's cache.
    config (the large_config in force) is part of the cache key. G: the cell (1 Elman; 3, 4 the
    rnn_persistent_large_* kernels, with their gate buffers and fp32 aux, c0 and dc)."""
    args = _stand_in_args(kernel, layout, dtype, device, has_lengths)
    backward = "p_dz" in kernel.arg_names
    meta = _large_meta(layout.H, dtype) if G == 1 else dict(_cell_large_meta(layout.H, dtype, backward), CELL=G)
    meta = dict(meta, **_stand_in_constexprs(kernel, layout, opts, has_lengths, meta.get("BB", BB)))
    return _compile_large(kernel, args, meta, layout.H, device)[1]


def _stand_in_args(kernel, lay, dtype, device, has_lengths):
    B, H, Hp = lay.B, lay.H, lay.Hp
    accumulator = torch.empty(1, dtype=accumulator_dtype(dtype), device=device)
    tensors = {"p_len": torch.empty(B, dtype=torch.int64, device=device) if has_lengths else None,
               "p_barrier": torch.empty(1, dtype=torch.int32, device=device),
               **{name: accumulator for name in ("p_dh", "p_bias", "p_aux", "p_c0", "p_dc")}}
    stride_t, stride_b, stride_d = lay.seq_strides
    ints = dict(T=lay.T, B=B, H=H, unit_begin=0, unit_end=1, dir_base=0, patience=MAX_POLLS,
                stride_w_d=H * Hp, stride_w_n=Hp, stride_w_k=1, stride_h0_d=B * Hp, stride_h0_b=Hp,
                stride_dh_d=B * Hp, stride_dh_b=Hp, stride_dy_h=1)
    for name in ("y", "dy"):
        ints.update({f"stride_{name}_t": stride_t, f"stride_{name}_b": stride_b, f"stride_{name}_d": stride_d})
    # The cells' gate buffers (rows of dirs·slots·Hp): Triton specialises their strides as y's (multiples of 16).
    for name in ("x", "z"):
        ints.update({f"stride_{name}_t": stride_t, f"stride_{name}_b": stride_b})
    stand_in = torch.empty(1, dtype=dtype, device=device)
    names = [n for n in kernel.arg_names if n.startswith(("p_", "stride_")) or n in ints]
    return [tensors[n] if n in tensors else stand_in if n.startswith("p_") else ints[n] for n in names]


def _stand_in_constexprs(kernel, lay, opts, has_lengths, block_b=BB):
    values = dict(HAS_BIAS=True, HAS_LENGTHS=has_lengths, REVERSE=lay.reverse, BB=block_b, BH=_bh(lay.H), ACT=opts.ACT,
                  FAST_TANH=opts.FAST_TANH, PRECISION=opts.PRECISION, UPCAST=opts.UPCAST)
    return {name: value for name, value in values.items() if name in kernel.arg_names}


def _coresident_programs(compiled, device, num_warps):
    """How many programs of this compiled kernel the whole GPU holds at once (registers, shared memory,
    threads per SM), as Triton's fused-softmax tutorial computes occupancy, plus the shared memory the
    hardware reserves for each resident block (RESERVED_SHARED_PER_BLOCK). Triton reports the opt-in
    maximum per block, which is the SM's shared memory less one block's reservation (Hopper: 227 of
    228 KiB, A100: 163 of 164), so the SM's total is that plus one reservation."""
    compiled._init_handles()
    props = _device_properties(device)
    threads = 32 * num_warps
    regs = -(-compiled.n_regs // 8) * 8  # registers are allocated 256 per warp, 8 per thread
    shared_per_sm = props["max_shared_mem"] + RESERVED_SHARED_PER_BLOCK
    per_sm = min(props["max_num_regs"] // max(1, regs * threads),
                 shared_per_sm // (compiled.metadata.shared + RESERVED_SHARED_PER_BLOCK),
                 2048 // threads)
    return per_sm * props["multiprocessor_count"]


# ------------------------------------------------------------------------------------ barrier buffers

_BARRIER_WORDS = {}  # (device, stream) -> the int32 buffer that stream's eager launches share
_CAPTURED_WORDS = []  # buffers made during CUDA-graph captures: kept alive as long as the process
_PENDING = []  # reads of an error word in flight, oldest first: (event, pinned host copy, buffer, what ran)
_reads = types.SimpleNamespace(due=0.0)  # perf_counter time from which a large-H launch reads its error word


def _barrier_words(device, n_words):
    """A barrier buffer (kernels/barrier.py): the error word on line 0, then one word per barrier group,
    each on its own 128-byte line.

    Eager launches share one buffer per (device, stream): launches on one stream run one after
    another, and the kernels leave every word ready for the next. A launch recorded into a CUDA graph
    gets a buffer of its own, allocated during the capture (from the graph's memory pool) and zeroed
    by a memset that is part of the graph, so every replay starts clean; a reference is kept for the
    life of the process, because the graph's pool would otherwise hand the memory to a later
    allocation of the same capture. So replays never share a word with eager calls on any stream,
    nor with other graphs.
    """
    size = WORD_STRIDE.value * (1 + n_words)
    if torch.cuda.is_current_stream_capturing():
        words = torch.zeros(size, dtype=torch.int32, device=device)
        _CAPTURED_WORDS.append(words)
        return words
    check_errors(device)
    key = (device, torch.cuda.current_stream(device).cuda_stream)
    words = _BARRIER_WORDS.get(key)
    if words is None or words.numel() < size:
        if words is not None:  # too small: the plans that share it take the larger one, after a last
            _PLANS.clear()      # read of its error word (sticky: it covers every launch it served)
            _after_launch(words, None)
        words = torch.zeros(max(size, WORD_STRIDE.value * 257), dtype=torch.int32, device=device)
        _BARRIER_WORDS[key] = words
    return words


def _after_launch(words, what):
    """Queue a read of the buffer's error word without synchronising: an asynchronous copy of the word
    to pinned memory and an event; check_errors reads the copy once the event has completed. The
    kernels only ever set the word (it is sticky), so one read sees a timeout of this launch or of
    any earlier one on the buffer. Nothing is queued inside a graph capture."""
    if torch.cuda.is_current_stream_capturing():
        return
    flag = _pinned_flag()
    flag.copy_(words[:1], non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _PENDING.append((event, flag, words, what))


def _pinned_flag():
    """A pinned host int32 for one launch's error word (from torch's caching host allocator)."""
    return torch.empty(1, dtype=torch.int32, pin_memory=True)


def check_errors(device=None, wait=False):
    """Raise RuntimeError if a large-H launch (on device, or any) reported a barrier timeout.

    Large-H calls read their buffer's error word back lazily: at most every ERROR_READ_INTERVAL_S one
    call queues an asynchronous read (when none is in flight) and a later call looks at it, so a
    timeout is reported a few calls after it happened, never for the last calls of a run nor for
    replays of a CUDA graph. wait=True synchronises and reads every barrier buffer now, eager and
    captured: call it at the end of a run, or before trusting its results. Without wait it never
    blocks, and stops at the first read not yet complete (reads complete in order), so its cost does
    not grow with how far the CPU runs ahead of the GPU."""
    device = None if device is None else torch.device(device)
    for entry in list(_PENDING):
        event, flag, words, what = entry
        if device is not None and words.device != device:
            continue
        if wait:
            event.synchronize()
        elif not event.query():
            break
        _PENDING.remove(entry)
        if flag.item():
            _timed_out(words, what)
    if wait:
        # A CPU-only torch raises on the capture query itself (and nothing can be captured there).
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        for words in list(_BARRIER_WORDS.values()) + ([] if capturing else _CAPTURED_WORDS):
            if device is None or words.device == device:
                if words.device.type == "cuda":
                    torch.cuda.synchronize(words.device)
                if words[0].item():
                    _timed_out(words, None)


def _timed_out(words, what):
    captured = any(words is w for w in _CAPTURED_WORDS)
    _forget(words)
    if what is None:
        what = "a large-H launch captured in a CUDA graph" if captured else f"a large-H launch on {words.device}"
    else:
        name, H, grid, launches = what
        what = f"{name} (H={H}, grid={grid}, {launches} launch(es))"
    raise RuntimeError(f"{what}: a grid-barrier wait gave up after {MAX_POLLS} polls (in this call or an earlier "
                       "one on its stream since the last check), so those results are invalid. The programs of a "
                       "barrier group were not all running at once (the GPU was shared or preempted?); rerun, or "
                       "use backend='stepwise'")


def _forget(words):
    """Drop a buffer (a timed-out launch left its words half-arrived, or it is too small): the plans
    that use it and its reads in flight go too, and the next eager launch makes a new one."""
    for key, value in list(_BARRIER_WORDS.items()):
        if value is words:
            del _BARRIER_WORDS[key]
    _PENDING[:] = [entry for entry in _PENDING if entry[2] is not words]
    _PLANS.clear()


def run_barrier_loop(words, n_iters, n_programs, grid_programs=None, patience=MAX_POLLS, flip=True):
    """n_iters barriers of a group of n_programs, launched as grid_programs programs (default the same);
    raises RuntimeError if a wait gave up. With grid_programs < n_programs the group can never meet:
    the timeout path (tests run it under the interpreter)."""
    grid = (grid_programs or n_programs,)
    extra = {} if INTERPRETED else {"launch_cooperative_grid": True, "num_warps": 4}
    barrier_loop_kernel[grid](words, n_iters, n_programs, patience, **with_fp_fusion(dict(extra, FLIP=flip)))
    if INTERPRETED:
        if words[0].item():
            raise RuntimeError(f"barrier_loop_kernel (grid={grid}, group of {n_programs}): a grid-barrier wait "
                               f"gave up after {patience} polls; the group's programs were not all running")
    else:
        _after_launch(words, ("barrier_loop_kernel", None, grid, 1))


def barrier_latency_us(device=None, n_programs=None, iters=10_000, scheme="flip"):
    """Measured cost of one grid barrier (µs): a cooperative launch of n_programs (default: one per SM)
    that does nothing but `iters` barriers, minus the same launch with none. scheme: "flip" (the
    kernels' barrier) or "count" (the older one). The floor of the large-H persistent kernel is T × this."""
    device = torch.device(device or "cuda")
    if device.type != "cuda" or INTERPRETED:
        raise RuntimeError("the grid-barrier micro-benchmark needs a CUDA device (and no TRITON_INTERPRET)")
    if scheme not in ("flip", "count"):
        raise ValueError(f"unknown barrier scheme {scheme!r}; expected 'flip' or 'count'")
    if n_programs is None:
        n_programs = torch.cuda.get_device_properties(device).multi_processor_count
    words = torch.zeros(2 * WORD_STRIDE.value, dtype=torch.int32, device=device)

    def run(n):
        run_barrier_loop(words, n, n_programs, flip=scheme == "flip")

    with on_device(words):
        run(iters)  # compile and warm up
        times = []
        for n in (0, iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(n)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        check_errors(device, wait=True)
    return (times[1] - times[0]) * 1e3 / iters
