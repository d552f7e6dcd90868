"""Host (Python) time of the Triton launchers per step and per call, on CPU, with the GPU launch stubbed.

    python benchmarks/host_overhead.py                        # prints a markdown table
    python benchmarks/host_overhead.py --root /tmp/before     # the launchers of another checkout

Two levels, each with a fake CUDA device (132 SMs, as an H200) and tensors left on the CPU:
  * launcher: every @triton.jit kernel the launcher modules hold is replaced by a fake whose launch
    and warmup do nothing, so only this package's Python is timed.
  * + Triton: the real kernels, compiled for sm_90a once (Triton ships ptxas, so this needs no GPU),
    dispatched by Triton's own runtime (argument binding, specialisation, cache lookup, warmup)
    through a fake driver whose launcher does nothing. That is the host time a GPU launch costs
    before the driver call.
The stepwise figures are per time step: (time at T=64 − time at T=16) / 48, so per-call costs cancel.
The persistent figures are per call of the large-H launcher (H = 1024, bf16: 64 column programs).
Each figure is the best of several repeats: on a shared machine other work only adds time.
--clock cpu times this process's CPU time instead of the wall clock: on a machine with more runnable
work than cores it leaves out the time the process waits for a core (caches shared with that work
still slow it down).
"""
import argparse
import contextlib
import functools
import inspect
import os
import sys
import time
from types import SimpleNamespace
from unittest import mock

import torch

B, H, DTYPE = 16, 1024, torch.bfloat16
T_SHORT, T_LONG = 16, 64
DEVICE_PROPERTIES = {"max_num_regs": 65536, "max_shared_mem": 232448, "multiprocessor_count": 132,
                     "max_threads_per_multiprocessor": 2048, "warpSize": 32}


class FakeCompiled(SimpleNamespace):
    """What the launchers read from a compiled kernel (registers, shared memory, the handles that
    config.bound_launch passes to Triton's launcher), and its launch: the launcher itself (`run`) or
    Triton's runner (compiled[grid])."""
    function, packed_metadata = None, None

    def run(self, *args):
        pass

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class FakeKernel:
    """A @triton.jit kernel whose launch and warmup cost nothing; warmup returns a FakeCompiled."""

    def __init__(self, kernel):
        self.arg_names, self.__name__ = kernel.arg_names, kernel.__name__
        self.compiled = FakeCompiled(n_regs=128, n_spills=0, metadata=SimpleNamespace(shared=65536, num_warps=8),
                                     _init_handles=lambda: None)

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **meta):
        pass

    def warmup(self, *args, **meta):
        return self.compiled

    def run(self, *args, **meta):
        return self.compiled


class FakeDriver:
    """Triton's active driver for a GPU that is not there: an sm_90a target, device 0, stream 0, a
    loader that loads nothing and a launcher that launches nothing."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", 90, 32)
        self.utils = SimpleNamespace(get_device_properties=lambda device: dict(DEVICE_PROPERTIES),
                                     load_binary=lambda name, kernel, shared, device: (1, 1, 128, 0, 1024))

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def launcher_cls(self, src, metadata):
        return lambda *args: None


@contextlib.contextmanager
def fake_gpu(level):
    """torch.cuda and Triton's driver as on a one-GPU machine; kernels stubbed at level 'launcher'."""
    import triton
    from elman_triton import persistent, stepwise
    from triton.runtime.jit import JITFunction
    patches = [
        mock.patch.object(torch.cuda, "current_device", lambda: 0),
        mock.patch.object(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0)),
        mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: False),
        mock.patch.object(torch.cuda, "device", lambda device: contextlib.nullcontext()),
        mock.patch.object(torch.cuda, "Event", lambda **kwargs: SimpleNamespace(record=lambda: None, query=lambda: True)),
        # The launcher's raw stream handle (cached plans): Triton's driver asks torch the same way.
        mock.patch.object(persistent, "_current_stream", lambda device: 0, create=True),
        # The launcher's error-word check (v0.3): a pinned host int32 where there is no GPU.
        mock.patch.object(persistent, "_pinned_flag", lambda: torch.empty(1, dtype=torch.int32), create=True),
        mock.patch.object(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(
            multi_processor_count=DEVICE_PROPERTIES["multiprocessor_count"])),
    ]
    if level == "launcher":
        for module in (stepwise, persistent):
            patches += [mock.patch.object(module, name, FakeKernel(value))
                        for name, value in vars(module).items() if isinstance(value, JITFunction)]
    caches = [value.cache_clear for value in vars(persistent).values() if hasattr(value, "cache_clear")]
    plans = getattr(persistent, "_PLANS", {})  # cached launch plans: each made with one level's kernels
    caches.append(plans.clear)
    for clear in caches:  # caches of device facts and compiled kernels: start empty, end empty
        clear()
    driver = triton.runtime.driver
    previous = driver._active  # None where no GPU driver is active (a CPU machine): reset_active would raise
    driver.set_active(FakeDriver())
    try:
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            yield
    finally:
        driver._active = previous
        for clear in caches:
            clear()


def bind(fn, **available):
    """fn bound to the arguments it names, from `available` (bound once: inspecting a signature costs
    more than a launch). The launchers' signatures grow over versions (strides, lengths); arguments
    with defaults that are not available keep their defaults."""
    params = inspect.signature(fn).parameters
    missing = [n for n, p in params.items() if p.default is p.empty and n not in available
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise TypeError(f"{fn.__module__}.{fn.__name__} needs {missing}: teach benchmarks/host_overhead.py")
    return functools.partial(fn, **{n: v for n, v in available.items() if n in params})


def problem(T, fn):
    """The arguments of one direction's call. Launchers since v0.3 take the layer layout: a direction
    axis on h0, W_hh, bias, h_n and dh_n, and a config.Layout; older ones take plain (B, H) tensors."""
    from elman_triton import config
    y = torch.randn(T, B, H).to(DTYPE)
    args = dict(xp=y, y=y, h0=torch.randn(B, H).to(DTYPE), weight_hh=torch.randn(H, H).to(DTYPE) * H ** -0.5,
                bias=torch.randn(H).to(DTYPE), opts=config.kernel_options(DTYPE, "tanh", fast_tanh=False),
                reverse=False, dy=torch.randn(T, B, H).to(DTYPE),
                dh_n=torch.randn(B, H, dtype=config.accumulator_dtype(DTYPE)), dz=torch.empty(T, B, H, dtype=DTYPE),
                lengths=None)
    if "layout" in inspect.signature(fn).parameters:
        args = {k: v.unsqueeze(0) if k in ("h0", "weight_hh", "bias", "dh_n") else v for k, v in args.items()}
        args.update(h_n=torch.empty(1, B, H, dtype=DTYPE), layout=config.Layout.of(y, H, 1, False, False))
    return args


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_time_us(fn, repeats, number, clock=time.perf_counter):
    fn()  # first call compiles (level '+ Triton') and fills caches
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        for _ in range(number):
            fn()
        best = min(best, (clock() - start) / number)
    return best * 1e6


def calls_per_call(fn, number=50):
    """Python and C function calls per call of fn, as sys.setprofile sees them: a figure that other work
    on the machine cannot move, for comparing launchers where timings are noisy."""
    fn()
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        count += event in ("call", "c_call")
    sys.setprofile(profile)
    try:
        for _ in range(number):
            fn()
    finally:
        sys.setprofile(None)
    return count / number


def measure(level, repeats=15, clock=time.perf_counter, calls=False):
    """{figure name: µs} for one level (and function calls per persistent call with calls=True)."""
    from elman_triton import persistent, stepwise
    results = {}
    with fake_gpu(level):
        for direction in ("forward", "backward"):
            fn = getattr(stepwise, f"{direction}_recurrence")
            short, long_ = problem(T_SHORT, fn), problem(T_LONG, fn)
            t_short = best_time_us(bind(fn, **short), repeats, 20, clock)
            t_long = best_time_us(bind(fn, **long_), repeats, 20, clock)
            results[f"stepwise {direction}, per step"] = (t_long - t_short) / (T_LONG - T_SHORT)
        for direction in ("forward", "backward"):
            fn = getattr(persistent, f"{direction}_recurrence")
            args = problem(T_SHORT, fn)
            results[f"persistent large-H {direction}, per call"] = best_time_us(bind(fn, **args), repeats, 200, clock)
            if calls:
                results[f"persistent large-H {direction}, function calls per call"] = calls_per_call(bind(fn, **args))
    return results


LEVELS = {"launcher": "launcher (kernel stubbed)", "triton": "+ Triton dispatch (fake driver)"}


def table(by_level):
    names = list(next(iter(by_level.values())))
    lines = ["| host time, µs | " + " | ".join(LEVELS[lv] for lv in by_level) + " |",
             "|---|" + "---:|" * len(by_level)]
    lines += [f"| {name} | " + " | ".join(f"{by_level[lv][name]:.1f}" for lv in by_level) + " |" for name in names]
    return "\n".join(lines)


def use_checkout(root):
    """Import elman_triton, and its kernels (the top-level kernels/ folder, which an editable install
    maps to elman_triton.kernels), from the checkout at root instead of the installed one."""
    import importlib.util
    sys.path.insert(0, root)
    kernels = os.path.join(root, "kernels")
    spec = importlib.util.spec_from_file_location("elman_triton.kernels", os.path.join(kernels, "__init__.py"),
                                                  submodule_search_locations=[kernels])
    sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--level", choices=[*LEVELS, "both"], default="both")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--clock", choices=CLOCKS, default="wall", help="wall clock or this process's CPU time")
    parser.add_argument("--calls", action="store_true", help="also count function calls per persistent call")
    parser.add_argument("--root", help="a checkout whose elman_triton to time (default: the importable one)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET=1: this times the launchers' GPU branch")
    if args.root:
        use_checkout(os.path.abspath(args.root))
    import elman_triton
    levels = list(LEVELS) if args.level == "both" else [args.level]
    by_level = {level: measure(level, args.repeats, CLOCKS[args.clock], args.calls) for level in levels}
    print(f"B={B}, H={H}, {str(DTYPE).replace('torch.', '')}; elman_triton from "
          f"{os.path.dirname(elman_triton.__file__)}, kernels from {os.path.dirname(sys.modules['elman_triton.kernels'].__file__)}; "
          f"torch {torch.__version__}, triton {__import__('triton').__version__}; {args.clock} clock, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print(table(by_level))


if __name__ == "__main__":
    main()
