"""elman_rnn: the public op, its input checks, backend dispatch and the autograd Function.

The Triton backends share everything except the recurrence itself:

    forward:  xp = x W_ihᵀ (one GEMM over all T·B rows), then the recurrence kernels fill y.
    backward: the recurrence kernels run BPTT in reverse time and write dz_t = ∂L/∂z_t; then
              dx = dz W_ih, dW_ih = Σ_t dz_tᵀ x_t, dW_hh = Σ_t dz_tᵀ h_{t-1}, db = Σ_t dz_t
              are big GEMMs/reductions. No atomics anywhere, so gradients are deterministic.

Only y (which holds every h_t) is saved for backward; pre-activations are not. The forward writes y
over xp, so its only (T, B, H) buffer is the output itself.
"""
import torch
from torch.autograd.function import once_differentiable

from elman_triton import persistent, stepwise
from elman_triton.config import INTERPRETED, SUPPORTED_DTYPES, accumulator_dtype, kernel_options
from elman_triton.reference import ACTIVATIONS, elman_rnn_reference

BACKENDS = ("auto", "stepwise", "persistent", "reference")
TRITON_BACKENDS = {"stepwise": stepwise, "persistent": persistent}


def elman_rnn(x, h0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *,
              nonlinearity="tanh", backend="auto", reverse=False):
    """One Elman RNN layer, one direction: h_t = act(x_t W_ihᵀ + b_ih + h_{t-1} W_hhᵀ + b_hh).

    x: (T, B, D), time-major, T ≥ 1 (B = 0 gives empty outputs, as in nn.RNN). h0: (B, H) or None for zeros. weight_ih: (H, D), weight_hh: (H, H),
    bias_ih / bias_hh: (H,) or None (torch.nn.RNN's layout). Returns y (T, B, H) and h_n (B, H).

    backend: "stepwise" (one fused Triton launch per step), "persistent" (one launch for the whole
    sequence), "reference" (the plain PyTorch loop) or "auto". On CUDA, "auto" picks the faster
    Triton path (see persistent.supports); on CPU it runs PyTorch's native RNN kernel. The Triton
    backends take CPU tensors only under TRITON_INTERPRET=1.
    reverse=True runs time backwards (torch.nn.RNN's reverse direction); y stays in input order.
    """
    _check_inputs(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, backend)
    if x.shape[1] == 0:  # an empty batch, which nn.RNN accepts: empty outputs, zero weight gradients
        backend = "reference"
    if backend == "auto":
        backend = _auto_backend(x, weight_hh)
    if backend == "reference":
        return elman_rnn_reference(x, h0, weight_ih, weight_hh, bias_ih, bias_hh,
                                   nonlinearity=nonlinearity, reverse=reverse)
    if backend == "native":
        return _torch_native(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, reverse)
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(f"backend={backend!r} runs Triton kernels, which need CUDA tensors; on CPU set "
                           "TRITON_INTERPRET=1 before importing elman_triton, or use backend='auto'")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend={backend!r} supports {SUPPORTED_DTYPES}, got {x.dtype}")
    recurrence = TRITON_BACKENDS[backend]
    if backend == "persistent":
        persistent.check_supported(x.shape[1], weight_hh.shape[0], x.dtype, x.device)
    return ElmanRNNFunction.apply(x, h0, weight_ih, weight_hh, bias_ih, bias_hh,
                                  nonlinearity, reverse, recurrence)


def _auto_backend(x, weight_hh):
    if x.device.type != "cuda":
        return "native"
    B, H = x.shape[1], weight_hh.shape[0]
    return "persistent" if persistent.supports(B, H, x.dtype, x.device) else "stepwise"


class ElmanRNNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, reverse, recurrence):
        T, B, _ = x.shape
        H = weight_hh.shape[0]
        if h0 is None:
            h0 = x.new_zeros(B, H)
        opts = kernel_options(x.dtype, nonlinearity)
        xp = torch.matmul(x, weight_ih.T)  # [T, B, H], one GEMM for all steps
        # y overwrites xp in place: each xp element is read only by the program that then writes the
        # y element at the same place, before it does, so the forward holds one (T, B, H) buffer, not two.
        y = xp
        recurrence.forward_recurrence(xp, h0, weight_hh, _combined_bias(bias_ih, bias_hh, H, x), y, opts, reverse)
        h_n = (y[0] if reverse else y[-1]).clone()
        ctx.save_for_backward(x, h0, weight_ih, weight_hh, y)
        ctx.opts, ctx.reverse, ctx.recurrence = opts, reverse, recurrence
        ctx.has_bias = (bias_ih is not None, bias_hh is not None)
        return y, h_n

    @staticmethod
    @once_differentiable  # the kernels are not differentiable themselves: refuse double backward
    def backward(ctx, dy, dh_n):
        x, h0, weight_ih, weight_hh, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        dz = torch.empty_like(y)
        dh0 = ctx.recurrence.backward_recurrence(dy, dh_n, y, weight_hh, dz, ctx.opts, ctx.reverse)
        dx = torch.matmul(dz, weight_ih) if need[0] else None
        dW_ih = torch.tensordot(dz, x, dims=([0, 1], [0, 1])) if need[2] else None
        dW_hh = _recurrent_weight_grad(dz, y, h0, ctx.reverse) if need[3] else None
        db = dz.sum((0, 1)) if need[4] or need[5] else None
        return (dx, dh0.to(h0.dtype) if need[1] else None, dW_ih, dW_hh,
                db if need[4] else None, db if need[5] else None, None, None, None)


def _recurrent_weight_grad(dz, y, h0, reverse):
    """dW_hh = Σ_t dz_tᵀ h_{t-1}, with h_{t-1} = h0 at the first step, without concatenating h0 onto y."""
    if reverse:
        first, rest = dz[-1].T @ h0, torch.tensordot(dz[:-1], y[1:], dims=([0, 1], [0, 1]))
    else:
        first, rest = dz[0].T @ h0, torch.tensordot(dz[1:], y[:-1], dims=([0, 1], [0, 1]))
    return first + rest


def _combined_bias(bias_ih, bias_hh, H, x):
    """b_ih + b_hh in the accumulator dtype, so the 16-bit sum is not rounded twice; None if neither."""
    if bias_ih is None and bias_hh is None:
        return None
    bias = torch.zeros(H, dtype=accumulator_dtype(x.dtype), device=x.device)
    for b in (bias_ih, bias_hh):
        if b is not None:
            bias += b
    return bias


def _torch_native(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, reverse):
    """PyTorch's own RNN kernel (what nn.RNN runs): the fast path for CPU tensors."""
    B, H = x.shape[1], weight_hh.shape[0]
    has_bias = bias_ih is not None or bias_hh is not None
    weights = [weight_ih, weight_hh]
    if has_bias:
        weights += [b if b is not None else weight_hh.new_zeros(H) for b in (bias_ih, bias_hh)]
    hx = (x.new_zeros(B, H) if h0 is None else h0).unsqueeze(0)
    run = torch.rnn_tanh if nonlinearity == "tanh" else torch.rnn_relu
    # Positional: (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    y, h_n = run(x.flip(0) if reverse else x, hx, weights, has_bias, 1, 0.0, False, False, False)
    return (y.flip(0) if reverse else y), h_n[0]


def _check_inputs(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, backend):
    if nonlinearity not in ACTIVATIONS:
        raise ValueError(f"unknown nonlinearity {nonlinearity!r}; expected one of {tuple(ACTIVATIONS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D (T, B, D), got shape {tuple(x.shape)}")
    T, B, D = x.shape
    if T == 0:
        raise ValueError(f"x must have T ≥ 1, got shape {tuple(x.shape)}")
    if weight_hh.dim() != 2 or weight_hh.shape[0] != weight_hh.shape[1]:
        raise ValueError(f"weight_hh must be (H, H), got shape {tuple(weight_hh.shape)}")
    H = weight_hh.shape[0]
    if tuple(weight_ih.shape) != (H, D):
        raise ValueError(f"weight_ih must be (H, D) = ({H}, {D}), got shape {tuple(weight_ih.shape)}")
    named = {"x": x, "weight_ih": weight_ih, "weight_hh": weight_hh}
    for name, t, shape in (("h0", h0, (B, H)), ("bias_ih", bias_ih, (H,)), ("bias_hh", bias_hh, (H,))):
        if t is not None:
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
            named[name] = t
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; all tensors must share one dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share one device")
