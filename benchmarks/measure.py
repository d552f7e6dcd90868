"""Timing, memory and machine measurements, and the run's environment metadata."""
import datetime
import math
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import triton
from triton.testing import do_bench

from elman_triton import persistent

QUANTILES = (0.5, 0.2, 0.8)
# Every CPU time the suite shows carries this label: CPU runs are timed on one thread to show the suite
# works, they measure no kernel of this project (its Triton kernels run only in the interpreter there).
CPU_NOTE = "CPU: not a performance result"
CPU_CACHE_BYTES = 32 << 20  # a typical last-level cache; the CPU run is a smoke test, not a measurement
MAX_ROTATION_SETS = 4
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float
    calls: int  # every call the timer made, warm-up included


def make_timer(device, rep_ms):
    """A function (fn, grads) -> Timing. `grads` are tensors whose .grad is reset before each timed
    call, so backward passes do not accumulate into (and time) a growing gradient."""
    if device.type == "cuda":
        def timer(fn, grads):
            calls = 0

            def counted():
                nonlocal calls
                calls += 1
                fn()
            # do_bench warms up, flushes L2 before every call and times each call with CUDA events.
            median, q20, q80 = do_bench(counted, warmup=25, rep=rep_ms, grad_to_none=list(grads) or None,
                                        quantiles=list(QUANTILES))
            return Timing(median, q20, q80, calls)
        timer.description = f"triton.testing.do_bench(warmup=25 ms, rep={rep_ms} ms), median and q20/q80"
        return timer

    def timer(fn, grads):
        warmups = warm_up(fn, grads, budget_s=WARM_UP_BUDGETS * rep_ms / 1e3)
        samples, start = [], time.perf_counter()
        while len(samples) < 3 or (len(samples) < 50 and time.perf_counter() - start < rep_ms / 1e3):
            samples.append(_timed_call(fn, grads))
        median, q20, q80 = np.quantile(samples, QUANTILES) * 1e3
        return Timing(float(median), float(q20), float(q80), len(samples) + warmups)
    timer.description = (f"time.perf_counter; warm-up until {STABLE_WINDOW} calls in a row agree within "
                         f"{STABLE_SPREAD:.0%} (at most {WARM_UP_BUDGETS * rep_ms:g} ms), then 3-50 calls within {rep_ms:g} ms, "
                         "median and q20/q80")
    return timer


STABLE_WINDOW, STABLE_SPREAD = 3, 0.25
WARM_UP_BUDGETS = 5  # the CPU warm-up may take up to this many timing budgets (rep_ms)


def _timed_call(fn, grads):
    for t in grads:
        t.grad = None
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def warm_up(fn, grads, budget_s, max_calls=200):
    """Call fn until its time is stable: the last STABLE_WINDOW calls within STABLE_SPREAD of their
    fastest, and that fastest within STABLE_SPREAD of the fastest call so far, so one-off costs
    (first-call dispatch, lazy initialisation, allocator growth; once 40× a step's time on the first
    CPU shape) stay out of the samples. Stops after budget_s or max_calls regardless. Returns the
    number of calls made."""
    times, start = [], time.perf_counter()
    while len(times) < max_calls:
        times.append(_timed_call(fn, grads))
        window = times[-STABLE_WINDOW:]
        if len(times) > STABLE_WINDOW and max(window) <= (1 + STABLE_SPREAD) * min(window) \
                and min(window) <= (1 + STABLE_SPREAD) * min(times):
            break
        if time.perf_counter() - start > budget_s:
            break
    return len(times)


def rotation_count(set_bytes, cache_bytes, memory_budget):
    """How many input sets to rotate among so a call does not find the previous call's inputs in cache.

    A set larger than the cache evicts itself, so one suffices; otherwise enough sets that the others
    fill the cache, at most MAX_ROTATION_SETS, and never more than the memory budget holds.
    """
    if set_bytes > cache_bytes:
        wanted = 1
    else:
        wanted = min(MAX_ROTATION_SETS, 1 + math.ceil(cache_bytes / max(set_bytes, 1)))
    return max(1, min(wanted, memory_budget // max(set_bytes, 1)))


def cache_and_budget(device):
    """(cache bytes, memory budget for the rotated input sets)."""
    if device.type != "cuda":
        return CPU_CACHE_BYTES, 1 << 30
    props = torch.cuda.get_device_properties(device)
    free, _ = torch.cuda.mem_get_info(device)
    return getattr(props, "L2_cache_size", 50 << 20), free // 4  # leave room for activations and grads


def peak_training_memory(run, problem):
    """Bytes allocated at peak by one forward+backward beyond what was allocated before it
    (activations, workspaces, gradients). (None, reason) off CUDA."""
    if problem.x.device.type != "cuda":
        return None, "torch.cuda.max_memory_allocated needs a GPU"
    for t in problem.args:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    problem.backward(run())
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in problem.args:
        t.grad = None
    return peak, "torch.cuda.max_memory_allocated over one fwd+bwd, minus the allocation before it"


def machine_figures(device, dtypes, timer):
    """Measured once per run: dense matmul TFLOP/s per dtype, copy bandwidth, grid-barrier latency."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 512
    matmul = {}
    for name, dtype in dtypes.items():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = timer(lambda: torch.matmul(a, b), ()).median_ms
        matmul[name] = 2 * n ** 3 / (t * 1e-3) / 1e12
        del a, b
    elems = (1 << 28) if cuda else (1 << 24)  # 1 GiB / 64 MiB of fp32
    src = torch.empty(elems, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src), ()).median_ms
    copy_gbps = 2 * src.numel() * src.element_size() / (t * 1e-3) / 1e9  # read + write
    del src, dst
    barrier_us, barrier_by_programs, barrier_note = barrier_latency(device)
    return {
        "matmul_tflops": matmul,
        "matmul_size": n,
        "fp32_matmul_tf32": bool(cuda and torch.backends.cuda.matmul.allow_tf32),
        "copy_gbps": copy_gbps,
        "copy_bytes": 2 * elems * 4,
        "barrier_us": barrier_us,
        "barrier_us_by_programs": barrier_by_programs,
        "barrier_note": barrier_note,
    }


BARRIER_GROUP_SIZES = (16, 64, 128)  # programs per barrier group of the large-H kernel at H = 256, 1024, 2048


def barrier_latency(device):
    """(µs per grid barrier across one program per SM, {programs: µs} for the group sizes the large-H
    kernel uses, how it was obtained), or (None, {}, why it is unavailable)."""
    if device.type != "cuda":
        return None, {}, "unavailable: the grid barrier needs a GPU"
    try:
        full = persistent.barrier_latency_us(device)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        groups = {n: persistent.barrier_latency_us(device, n_programs=n) for n in BARRIER_GROUP_SIZES if n <= sms}
    except Exception as e:
        return None, {}, f"unavailable: barrier_latency_us raised {type(e).__name__}: {e}"
    return float(full), groups, "elman_triton.persistent.barrier_latency_us (one program per SM)"


def environment(device):
    """Metadata for the whole run; the fields in ROW_METADATA are copied into every row."""
    cuda = device.type == "cuda"
    commit, dirty = _git_state()
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": cuda,
    }


ROW_METADATA = ("device", "torch", "triton", "cuda", "date", "git_commit")


def _git_state():
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
