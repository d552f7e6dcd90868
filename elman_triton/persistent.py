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
    launch per direction (LargeKernelPlan.sequential_directions says which). Under Triton's
    interpreter, one launch per step (forward) or phase (backward), because there programs run one
    after another and a barrier would never open.

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

import torch
import triton

from elman_triton.config import INTERPRETED, accumulator_dtype, cdiv, next_power_of_2, on_device, padded
from elman_triton.kernels.barrier import WORD_STRIDE, barrier_loop_kernel
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
BN = 16  # hidden units per program in the large-H kernel (large_config overrides it)
# Polls a barrier wait may make before it gives up. One poll is an L2 round trip (≈ 0.3-1 µs on a
# busy H100/H200), so this is ≈ 1-2 s; a real step waits a few µs.
MAX_POLLS = 1 << 21


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
    elt = torch.empty((), dtype=dtype).element_size()
    return _bh(H) * max(BN, BB) * elt <= LARGE_SLICE_BYTES


def check_supported(B, H, dtype, device):
    if not supports(B, H, dtype, device):
        raise ValueError(f"backend='persistent' does not hold H={H} in {dtype}: the W_hh slice and state tile "
                         f"must each fit {LARGE_SLICE_BYTES // 1024} KiB on-chip; use backend='stepwise' or 'auto'")


def fits(layout, dtype, device, opts):
    """Whether "auto" may use this backend: the size is held (supports) and, for the large kernel, the
    device holds one direction's n_col programs at once (forward and backward kernels), by the compiled
    kernels' registers and shared memory. Computed once per device and configuration (cached)."""
    if not supports(layout.B, layout.H, dtype, device):
        return False
    if _is_small(layout.H, dtype, device) or INTERPRETED:
        return True
    plans = [_plan(kernel, layout.H, dtype, device, opts)
             for kernel in (elman_persistent_large_fwd_kernel, elman_persistent_large_bwd_kernel)]
    return all(plan.capacity >= plan.n_col for plan in plans)


def forward_recurrence(xp, y, h0, weight_hh, bias, h_n, lengths, opts, layout):
    lay = layout
    lay.check(xp, "xp")
    lay.check(y, "y")
    bias_arg = bias if bias is not None else xp
    h0_strides = h0.stride()  # (dirs, B, Hp) rows, see kernels/common.load_state
    meta = dict(HAS_BIAS=bias is not None, HAS_LENGTHS=lengths is not None, REVERSE=lay.reverse, ACT=opts.ACT,
                FAST_TANH=opts.FAST_TANH, PRECISION=opts.PRECISION, UPCAST=opts.UPCAST, BB=BB, BH=_bh(lay.H))
    with on_device(y):
        if _is_small(lay.H, y.dtype, y.device):
            elman_persistent_small_fwd_kernel[(cdiv(lay.B, BB), lay.dirs)](
                xp, y, h0, weight_hh, bias_arg, h_n, lengths, lay.T, lay.B, lay.H, *lay.seq_strides, *h0_strides,
                *weight_hh.stride(),
                **meta, num_warps=_num_warps_small(y.dtype))
            return
        _launch_large(elman_persistent_large_fwd_kernel, lay, y, n_units=lay.T, opts=opts,
                      pointers=(xp, y, h0, weight_hh, bias_arg, h_n, lengths),
                      strides=(*lay.seq_strides, *h0_strides[:2], *weight_hh.stride()), meta=meta)


def backward_recurrence(dy, dh_n, y, weight_hh, dz, lengths, opts, layout):
    """Fills dz (y's layout); returns ∂L/∂h0 (dirs, B, H) in the accumulator dtype."""
    lay = layout
    lay.check(dz, "dz")
    meta = dict(HAS_LENGTHS=lengths is not None, REVERSE=lay.reverse, ACT=opts.ACT, PRECISION=opts.PRECISION,
                UPCAST=opts.UPCAST, BB=BB, BH=_bh(lay.H))
    dy_strides = lay.dy_strides(dy)
    w_strides = weight_hh.stride()
    with on_device(y):
        if _is_small(lay.H, y.dtype, y.device):
            dh0 = torch.empty(lay.dirs, lay.B, lay.H, dtype=accumulator_dtype(y.dtype), device=y.device)
            elman_persistent_small_bwd_kernel[(cdiv(lay.B, BB), lay.dirs)](
                dy, dh_n, y, weight_hh, dz, dh0, lengths, lay.T, lay.B, lay.H, *dy_strides, *dh_n.stride(),
                *lay.seq_strides, *w_strides, **meta, num_warps=_num_warps_small(y.dtype))
            return dh0
        # The large kernel reads ∂L/∂h_n from, and leaves ∂L/∂h0 in, this (dirs, B, Hp) buffer.
        dh = torch.empty(lay.dirs, lay.B, lay.Hp, dtype=accumulator_dtype(y.dtype), device=y.device)
        dh[..., :lay.H].copy_(dh_n)
        _launch_large(elman_persistent_large_bwd_kernel, lay, y, n_units=2 * lay.T, opts=opts,
                      pointers=(dy, y, weight_hh, dz, dh, lengths),
                      strides=(*dy_strides, *lay.seq_strides, dh.stride(0), dh.stride(1), *w_strides), meta=meta)
        return dh[..., :lay.H]


@dataclasses.dataclass(frozen=True)
class LargeKernelPlan:
    """One large-H kernel configuration on one device: its meta-parameters and how many of its
    programs the whole device holds at once."""
    meta: dict
    n_col: int
    capacity: int


def _large_meta(H, dtype):
    """BN, K_SPLIT, warps and barrier scheme of the large-H kernel (under the current large_config)."""
    return _large_meta_cached(H, dtype, _large)


@functools.cache
def _large_meta_cached(H, dtype, config):
    BH = _bh(H)
    num_warps = _num_warps_large(BH, dtype)
    return dict(BN=_large.BN, K_SPLIT=_k_split(BH, num_warps), num_warps=num_warps, FLIP=_large.flip_barrier)


def _plan(kernel, H, dtype, device, opts):
    meta = _large_meta(H, dtype)
    return _plan_cached(kernel, H, dtype, torch.device(device), opts, tuple(sorted(meta.items())))


@functools.cache
def _plan_cached(kernel, H, dtype, device, opts, meta_items):
    """Compile the kernel once for (device, H, dtype, options) and read its registers and shared memory;
    every later call finds the answer here (no warmup per call). The stand-in arguments have the
    divisibility a contiguous batch of 16 rows gives the real ones, so Triton specialises the same way
    (registers can differ by a few in other specialisations; the cooperative launch then fails with an
    error rather than hangs)."""
    meta = dict(meta_items)
    n_col = cdiv(H, meta["BN"])
    if INTERPRETED:
        return LargeKernelPlan(meta, n_col, capacity=n_col)
    compiled = kernel.warmup(*_stand_in_args(kernel, H, dtype, device), **_stand_in_constexprs(kernel, H, opts),
                             USE_BARRIER=True, launch_cooperative_grid=True, grid=(n_col, 1, 1), **meta)
    return LargeKernelPlan(meta, n_col, _coresident_programs(compiled, device, meta["num_warps"]))


def _stand_in_args(kernel, H, dtype, device, B=16):
    Hp = padded(H)
    accumulator = torch.empty(1, dtype=accumulator_dtype(dtype), device=device)
    tensors = {"p_len": torch.empty(B, dtype=torch.int64, device=device),
               "p_barrier": torch.empty(64, dtype=torch.int32, device=device),
               "p_dh": accumulator, "p_bias": accumulator}
    ints = dict(T=B, B=B, H=H, unit_begin=0, unit_end=1, dir_base=0, patience=MAX_POLLS,
                stride_w_d=H * Hp, stride_w_n=Hp, stride_w_k=1, stride_h0_d=B * Hp, stride_h0_b=Hp,
                stride_dh_d=B * Hp, stride_dh_b=Hp)
    for name in ("y", "dy"):
        ints.update({f"stride_{name}_t": B * Hp, f"stride_{name}_b": Hp, f"stride_{name}_d": Hp, f"stride_{name}_h": 1})
    stand_in = torch.empty(1, dtype=dtype, device=device)
    names = [n for n in kernel.arg_names if n.startswith(("p_", "stride_")) or n in ints]
    return [tensors.get(n, stand_in) if n.startswith("p_") else ints[n] for n in names]


def _stand_in_constexprs(kernel, H, opts):
    values = dict(HAS_BIAS=True, HAS_LENGTHS=False, REVERSE=False, BB=BB, BH=_bh(H), ACT=opts.ACT,
                  FAST_TANH=opts.FAST_TANH, PRECISION=opts.PRECISION, UPCAST=opts.UPCAST)
    return {name: value for name, value in values.items() if name in kernel.arg_names}


def _launch_large(kernel, lay, y, n_units, opts, pointers, strides, meta):
    n_tiles = cdiv(lay.B, BB)
    meta = dict(meta, **_large_meta(lay.H, y.dtype))
    n_col = cdiv(lay.H, meta["BN"])
    if INTERPRETED:
        # One unit (step or phase) per launch: Triton's interpreter runs programs one after another.
        for u in range(n_units):
            kernel[(n_col, n_tiles, lay.dirs)](*pointers, y, lay.T, lay.B, lay.H, u, u + 1, 0, 0, *strides,
                                               **meta, USE_BARRIER=False)
        return
    capacity = _plan(kernel, lay.H, y.dtype, y.device, opts).capacity
    if n_col > capacity:
        raise RuntimeError(f"persistent kernel {kernel.__name__} for H={lay.H} needs {n_col} co-resident programs "
                           f"but this GPU holds {capacity}; use backend='stepwise' or 'auto'")
    # Both directions in one grid when the device holds them; else one launch per direction.
    dirs_at_once = lay.dirs if lay.dirs * n_col <= capacity else 1
    n_group = min(n_tiles, capacity // (n_col * dirs_at_once))
    words = _barrier_words(y.device, lay.dirs * n_group)
    grid = (n_col, n_group, dirs_at_once)
    for dir_base in range(0, lay.dirs, dirs_at_once):
        kernel[grid](*pointers, words, lay.T, lay.B, lay.H, 0, n_units, dir_base, MAX_POLLS, *strides,
                     **meta, USE_BARRIER=True, launch_cooperative_grid=True)
    _after_launch(words, (kernel.__name__, lay.H, grid, lay.dirs // dirs_at_once))


def sequential_directions(layout, dtype, device, opts):
    """Whether a bidirectional layer on the large kernel runs its directions one launch after the other
    (the device cannot hold both grids at once). False for the small kernel and under the interpreter."""
    if layout.dirs == 1 or INTERPRETED or _is_small(layout.H, dtype, device):
        return False
    plan = _plan(elman_persistent_large_fwd_kernel, layout.H, dtype, device, opts)
    return 2 * plan.n_col > plan.capacity


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


# ------------------------------------------------------------------------------------ barrier buffers

_BARRIER_WORDS = {}  # (device, stream) -> the int32 buffer that stream's eager launches share
_CAPTURED_WORDS = []  # buffers made during CUDA-graph captures: kept alive as long as the process
_PENDING = []  # (event, pinned host copy of the error word, buffer key, what ran) not yet checked


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
        words = torch.zeros(max(size, WORD_STRIDE.value * 257), dtype=torch.int32, device=device)
        _BARRIER_WORDS[key] = words
    return words


def _after_launch(words, what):
    """Queue a check of the launch's error word without synchronising: an asynchronous copy of the word
    to pinned memory and an event; check_errors reads it once the event has completed (at the next
    large-H launch on the device, or when called). Nothing is queued inside a graph capture."""
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
    """Raise RuntimeError if a finished large-H launch (on device, or any) reported a barrier timeout.
    Launches still running are left for later unless wait=True (which synchronises on them)."""
    for entry in list(_PENDING):
        event, flag, words, what = entry
        if device is not None and words.device != torch.device(device):
            continue
        if not (wait and (event.synchronize() or True)) and not event.query():
            continue
        _PENDING.remove(entry)
        if flag.item():
            _forget(words)
            name, H, grid, launches = what
            raise RuntimeError(f"{name} (H={H}, grid={grid}, {launches} launch(es)): a grid-barrier wait gave up after {MAX_POLLS} polls, so the result is "
                               "invalid. The programs of a barrier group were not all running at once (the GPU "
                               "was shared or preempted?); rerun, or use backend='stepwise'")


def _forget(words):
    """Drop a buffer whose words a timed-out launch left half-arrived; the next launch makes a new one."""
    for key, value in list(_BARRIER_WORDS.items()):
        if value is words:
            del _BARRIER_WORDS[key]


def run_barrier_loop(words, n_iters, n_programs, grid_programs=None, patience=MAX_POLLS, flip=True):
    """n_iters barriers of a group of n_programs, launched as grid_programs programs (default the same);
    raises RuntimeError if a wait gave up. With grid_programs < n_programs the group can never meet:
    the timeout path (tests run it under the interpreter)."""
    grid = (grid_programs or n_programs,)
    extra = {} if INTERPRETED else {"launch_cooperative_grid": True, "num_warps": 4}
    barrier_loop_kernel[grid](words, n_iters, n_programs, patience, FLIP=flip, **extra)
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
