"""What every Triton launcher shares: compile-time options (activation id, tanh form, dot precision), the
layout of a layer's sequence buffers, the device guard and the direct launch of a compiled kernel."""
import contextlib
from dataclasses import dataclass, field

import torch
from triton import knobs
from triton.knobs import HookChain
from triton.runtime.jit import JITFunction

from elman_triton.kernels import stepwise as _stepwise_kernels

ACTIVATION_IDS = {"tanh": 0, "relu": 1}
HALF_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Triton picks interpreter or compiler when a kernel is decorated, that is when elman_triton.kernels
# is imported with or without TRITON_INTERPRET=1; ask the kernel object rather than the environment.
INTERPRETED = not isinstance(_stepwise_kernels.elman_step_fwd_kernel, JITFunction)

# Floating-point contraction (a·b + c as one fma) for every kernel, passed to every launch and warmup
# (enable_fp_fusion) rather than left to Triton's default, which is on up to 3.9 and turns off in 3.10
# (3.9 warns about it): that would change the kernels' rounding and speed under users with a Triton
# upgrade. On, because one rounding per multiply-add is at least as accurate as two, and it is what
# every tolerance and timing of this project was measured with.
FP_FUSION = True


@dataclass(frozen=True)
class KernelOptions:
    ACT: int
    FAST_TANH: bool
    PRECISION: str
    UPCAST: bool


def kernel_options(dtype, nonlinearity, fast_tanh=None):
    """fast_tanh=None picks hardware tanh for 16-bit storage on GPU only (see kernels/common.py).

    fp32 products are exact IEEE unless the user enabled TF32 in torch
    (torch.backends.cuda.matmul.allow_tf32), matching what torch does for its own matmuls.
    """
    if fast_tanh is None:
        fast_tanh = dtype in HALF_DTYPES and not INTERPRETED
    if fast_tanh and INTERPRETED:
        raise ValueError("fast_tanh uses inline PTX, which Triton's interpreter cannot run")
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return KernelOptions(
        ACT=ACTIVATION_IDS[nonlinearity],
        FAST_TANH=bool(fast_tanh) and nonlinearity == "tanh",
        PRECISION="tf32" if tf32 else "ieee",
        UPCAST=INTERPRETED and dtype in HALF_DTYPES,
    )


def accumulator_dtype(dtype):
    """fp32 carried state and accumulation for 16- and 32-bit storage, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cdiv(a, b):
    """⌈a / b⌉ in plain Python: triton.cdiv and triton.next_power_of_2 are jit-wrapped and cost ≈ 10 µs
    per host call."""
    return -(-a // b)


def next_power_of_2(n):
    return 1 << max(0, n - 1).bit_length()


def padded(H):
    """H rounded up to a multiple of 16: the row length of the package's own buffers. Triton specialises
    an integer argument that is a multiple of 16 (divisibility), so with it every row starts 16-element
    aligned and the kernels load 16-byte vectors for any H, not one element at a time."""
    return cdiv(H, 16) * 16


@dataclass(frozen=True)
class Layout:
    """A layer's sequence buffers (Xp / y and dz): element (t, b, d, h) of direction d sits at
    t·stride_t + b·stride_b + d·Hp + h. Time-major buffers are (T, B, dirs·Hp), batch-first ones
    (B, T, dirs·Hp); Hp = padded(H). `reverse` is the single direction's time order (bidirectional
    layers: direction 0 forward, 1 reverse)."""
    T: int
    B: int
    H: int
    dirs: int
    stride_t: int
    stride_b: int
    batch_first: bool
    reverse: bool
    Hp: int = field(init=False, repr=False, compare=False)  # padded(H), kept: the launchers read it per call

    def __post_init__(self):
        object.__setattr__(self, "Hp", padded(self.H))

    @staticmethod
    def of(buf, H, dirs, batch_first, reverse):
        T, B = (buf.shape[1], buf.shape[0]) if batch_first else buf.shape[:2]
        assert buf.shape[2] == dirs * padded(H) and buf.stride(2) == 1, "a sequence buffer is (·, ·, dirs·Hp), rows contiguous"
        stride_t, stride_b = (buf.stride(1), buf.stride(0)) if batch_first else (buf.stride(0), buf.stride(1))
        return Layout(T, B, H, dirs, stride_t, stride_b, batch_first, reverse)

    def check(self, buf, name):
        """The launchers index the buffers this package allocates through this layout."""
        row = self.dirs * self.Hp
        if buf.stride(2) != 1 or buf.size(2) != row or buf.numel() != self.T * self.B * row:
            raise AssertionError(f"{name} does not have the layer's buffer layout {self}")

    @property
    def seq_strides(self):
        """(t, b, direction) strides of the sequence buffers."""
        return (self.stride_t, self.stride_b, self.Hp)

    def dy_strides(self, dy):
        """(t, b, direction, h) strides of a gradient of y: y's shape, any strides."""
        t_dim, b_dim = (1, 0) if self.batch_first else (0, 1)
        return (dy.stride(t_dim), dy.stride(b_dim), self.Hp * dy.stride(2), dy.stride(2))


def on_device(tensor):
    """Launch on the tensor's device, not the current one (multi-GPU); nothing to do on CPU."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def with_fp_fusion(meta):
    """A launch's meta-parameters with fp fusion chosen: FP_FUSION unless meta says otherwise."""
    return meta if "enable_fp_fusion" in meta else dict(meta, enable_fp_fusion=FP_FUSION)


def compile_kernel(kernel, args, meta):
    """kernel compiled for these arguments and meta-parameters (Triton's warmup: from its cache when it
    was compiled before), with fp fusion chosen (with_fp_fusion)."""
    return kernel.warmup(*args, grid=(1,), **with_fp_fusion(meta))


def constexpr_args(kernel, args, meta):
    """The values of kernel's parameters after args, from meta: a compiled kernel takes them too."""
    return tuple(meta[name] for name in kernel.arg_names[len(args):])


def direct_launcher(kernel, grid, args, meta):
    """launch(*args) for kernel[grid] with these argument kinds and meta-parameters, with Triton's
    per-call binding done once: on GPU the kernel is compiled (or found in Triton's cache) by warmup,
    and every later launch calls the compiled kernel with the full argument list, skipping the
    specialisation and cache look-up that kernel[grid](...) repeats per call (most of the stepwise
    launcher's host time per step). Only arguments that the kernel does not specialise on (listed
    in its do_not_specialize, such as the step index) may differ between calls. Under the
    interpreter it is kernel[grid] itself. fp fusion as with_fp_fusion."""
    if INTERPRETED:
        launch, meta = kernel[grid], with_fp_fusion(meta)
        return lambda *call_args: launch(*call_args, **meta)
    runner = compile_kernel(kernel, args, meta)[grid]
    constexprs = constexpr_args(kernel, args, meta)
    return lambda *call_args: runner(*call_args, *constexprs)


def bound_launch(compiled, grid, stream):
    """launch(*args) == compiled[grid](*args, stream=stream) for a compiled kernel on a fixed grid and
    stream, calling Triton's launcher directly: compiled[grid]'s runner builds launch metadata for
    Triton's launch hooks on every call (a handle check and a dict, ≈ 1 µs of a persistent call's
    host time) even when no hook is installed. While Triton's launch-hook chains are empty it
    passes no hooks and no metadata, as the runner's launch then amounts to; a profiler that adds a
    hook (or sets one directly) gets the runner, with its metadata, from that launch on."""
    runner = compiled[grid]  # loads the module and function handles
    head = (*grid, stream, compiled.function, compiled.packed_metadata, None, None, None)
    run, hooks = compiled.run, knobs.runtime

    def launch(*args):
        enter, leave = hooks.launch_enter_hook, hooks.launch_exit_hook
        if type(enter) is HookChain and type(leave) is HookChain and not enter.calls and not leave.calls:
            run(*head, *args)
        else:
            runner(*args, stream=stream)
    return launch
