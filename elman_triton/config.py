"""Compile-time options shared by every Triton launcher: activation id, tanh form, dot precision."""
from dataclasses import dataclass

import torch
from triton.runtime.jit import JITFunction

from elman_triton.kernels import stepwise as _stepwise_kernels

ACTIVATION_IDS = {"tanh": 0, "relu": 1}
HALF_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Triton picks interpreter or compiler when a kernel is decorated, that is when elman_triton.kernels
# is imported with or without TRITON_INTERPRET=1; ask the kernel object rather than the environment.
INTERPRETED = not isinstance(_stepwise_kernels.elman_step_fwd_kernel, JITFunction)


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


def check_buffer(buf, shape, dtype, name):
    """The launchers index the buffers this package allocates (xp, y, dz) as contiguous tensors."""
    assert buf.shape == shape and buf.dtype == dtype and buf.is_contiguous(), \
        f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)}"
