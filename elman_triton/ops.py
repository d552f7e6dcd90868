"""elman_rnn: the public op, its input checks, backend dispatch and the autograd Function.

The Triton backends share everything except the recurrence itself:

    forward:  xp = x W_ihᵀ (one GEMM over all T·B rows), then the recurrence kernels fill y.
    backward: the recurrence kernels run BPTT in reverse time and write dz_t = ∂L/∂z_t; then
              dx = dz W_ih, dW_ih = Σ_t dz_tᵀ x_t, dW_hh = Σ_t dz_tᵀ h_{t-1}, db = Σ_t dz_t
              are big GEMMs/reductions. No atomics anywhere, so gradients are deterministic.

Only y (which holds every h_t) is saved for backward; pre-activations are not. The forward writes y
over xp, so its only (T, B, H) buffer is the output itself.

Two entry points share that code: ElmanRNNFunction (an autograd.Function) eagerly, and the custom ops
torch.ops.elman_triton.elman_rnn / .backward_recurrence under torch.compile.
"""
import torch
from torch.autograd.function import once_differentiable

from elman_triton import persistent, stepwise
from elman_triton.config import INTERPRETED, SUPPORTED_DTYPES, accumulator_dtype, kernel_options
from elman_triton.diagnostics import check_norms_buffer, state_gradient_norms
from elman_triton.reference import ACTIVATIONS, elman_rnn_reference

BACKENDS = ("auto", "stepwise", "persistent", "reference")
TRITON_BACKENDS = {"stepwise": stepwise, "persistent": persistent}


def elman_rnn(x, h0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *,
              nonlinearity="tanh", backend="auto", reverse=False, state_grad_norms=None):
    """One Elman RNN layer, one direction: h_t = act(x_t W_ihᵀ + b_ih + h_{t-1} W_hhᵀ + b_hh).

    x: (T, B, D), time-major, T ≥ 1 (B = 0 gives empty outputs, as in nn.RNN). h0: (B, H) or None
    for zeros. weight_ih: (H, D), weight_hh: (H, H), bias_ih / bias_hh: (H,) or None (torch.nn.RNN's
    layout). Returns y (T, B, H) and h_n (B, H).

    backend: "stepwise" (one fused Triton launch per step), "persistent" (one launch for the whole
    sequence), "reference" (the plain PyTorch loop) or "auto". On CUDA, "auto" picks the faster
    Triton path (see persistent.supports); on CPU it runs PyTorch's native RNN kernel. The Triton
    backends take CPU tensors only under TRITON_INTERPRET=1.
    reverse=True runs time backwards (torch.nn.RNN's reverse direction); y stays in input order.

    Under torch.compile the Triton backends run as the custom op torch.ops.elman_triton.elman_rnn
    (opaque to the compiler, no graph break); eagerly, as an autograd.Function, which costs less
    per call.

    state_grad_norms: None, or a float32 (T, B) tensor on x's device that the backward fills with
    ‖∂L/∂h_t[b, :]‖₂, the total gradient of the state at step t (input order), from the gradients it
    already computes (one extra GEMM; see elman_triton.diagnostics). With backend="auto" on CPU this
    runs the reference loop instead of PyTorch's native kernel, which does not expose them.
    """
    _check_inputs(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, backend)
    check_norms_buffer(state_grad_norms, x)
    if x.shape[1] == 0:  # an empty batch, which nn.RNN accepts: empty outputs, zero weight gradients
        backend = "reference"
    if backend == "auto" and x.device.type != "cuda":
        backend = "native" if state_grad_norms is None else "reference"
    if backend == "reference":
        return elman_rnn_reference(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity=nonlinearity,
                                   reverse=reverse, state_grad_norms=state_grad_norms)
    if backend == "native":
        return _torch_native(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, reverse)
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(f"backend={backend!r} runs Triton kernels, which need CUDA tensors; on CPU set "
                           "TRITON_INTERPRET=1 before importing elman_triton, or use backend='auto'")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend={backend!r} supports {SUPPORTED_DTYPES}, got {x.dtype}")
    args = (x, h0, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, reverse, backend, state_grad_norms)
    if torch.compiler.is_compiling():
        return torch.ops.elman_triton.elman_rnn(*args)
    return ElmanRNNFunction.apply(*args)


def _recurrence(backend, B, H, dtype, device):
    """The launcher module for a Triton backend; "auto" (CUDA) is persistent where it holds the shape."""
    if backend == "auto":
        backend = "persistent" if persistent.supports(B, H, dtype, device) else "stepwise"
    elif backend == "persistent":
        persistent.check_supported(B, H, dtype, device)
    return TRITON_BACKENDS[backend]


def _forward(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, reverse, backend):
    """(y, h_n) through the Triton recurrence: xp = x W_ihᵀ as one GEMM, then the kernels write y over
    xp in place (each xp element is read only by the program that then writes the y element at the
    same place, before it does), so the forward holds one (T, B, H) buffer, not two."""
    T, B, _ = x.shape
    H = weight_hh.shape[0]
    recurrence = _recurrence(backend, B, H, x.dtype, x.device)
    if h0 is None:
        h0 = x.new_zeros(B, H)
    y = torch.matmul(x, weight_ih.T)  # xp, [T, B, H], one GEMM for all steps; becomes y
    recurrence.forward_recurrence(y, h0, weight_hh, _combined_bias(bias_ih, bias_hh, H, x), y,
                                  kernel_options(x.dtype, nonlinearity), reverse)
    return y, (y[0] if reverse else y[-1]).clone()


def _backward_recurrence(dy, dh_n, y, weight_hh, nonlinearity, reverse, backend):
    """(dz, dh0) of the reverse-time loop; dh0 in the accumulator dtype."""
    T, B, H = y.shape
    dz = torch.empty_like(y)
    recurrence = _recurrence(backend, B, H, y.dtype, y.device)
    dh0 = recurrence.backward_recurrence(dy, dh_n, y, weight_hh, dz, kernel_options(y.dtype, nonlinearity), reverse)
    return dz, dh0


def _save(ctx, inputs, y):
    x, h0, weight_ih, weight_hh, _, _, nonlinearity, reverse, backend, state_grad_norms = inputs
    ctx.save_for_backward(x, h0, weight_ih, weight_hh, y)
    ctx.nonlinearity, ctx.reverse, ctx.backend = nonlinearity, reverse, backend
    ctx.state_grad_norms = state_grad_norms  # an output buffer the backward writes, not an input to save


def _gradients(ctx, dy, dh_n, backward_recurrence):
    """Gradients of every forward input: the reverse loop (backward_recurrence) writes dz_t, then
    dx = dz W_ih, dW_ih = Σ_t dz_tᵀ x_t, dW_hh = Σ_t dz_tᵀ h_{t-1} and db = Σ_t dz_t are GEMMs and a
    reduction, in plain torch (so torch.compile sees them)."""
    x, h0, weight_ih, weight_hh, y = ctx.saved_tensors
    need = ctx.needs_input_grad
    dy = torch.zeros_like(y) if dy is None else dy
    dh_n = torch.zeros_like(y[0]) if dh_n is None else dh_n
    dz, dh0 = backward_recurrence(dy, dh_n, y, weight_hh, ctx.nonlinearity, ctx.reverse, ctx.backend)
    if ctx.state_grad_norms is not None:
        state_gradient_norms(dy, dz, dh_n, weight_hh, ctx.reverse, ctx.state_grad_norms)
    dx = torch.matmul(dz, weight_ih) if need[0] else None
    dW_ih = torch.tensordot(dz, x, dims=([0, 1], [0, 1])) if need[2] else None
    dW_hh = _recurrent_weight_grad(dz, y, h0, ctx.reverse) if need[3] else None
    db = dz.sum((0, 1)) if need[4] or need[5] else None
    return (dx, dh0.to(x.dtype) if need[1] else None, dW_ih, dW_hh,
            db if need[4] else None, db if need[5] else None, None, None, None, None)


class ElmanRNNFunction(torch.autograd.Function):
    """The eager path: the least Python between the call and the kernels."""

    @staticmethod
    def forward(ctx, *inputs):
        y, h_n = _forward(*inputs[:-1])  # all but state_grad_norms, which only the backward writes
        _save(ctx, inputs, y)
        return y, h_n

    @staticmethod
    @once_differentiable  # the kernels are not differentiable themselves: refuse double backward
    def backward(ctx, dy, dh_n):
        return _gradients(ctx, dy, dh_n, _backward_recurrence)


# The torch.compile path: the same two pieces as custom ops, so the compiler treats the Triton launches
# as opaque calls with known output shapes and traces the GEMMs around them.
@torch.library.custom_op("elman_triton::elman_rnn", mutates_args=())
def _elman_rnn_op(x: torch.Tensor, h0: torch.Tensor | None, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
                  bias_ih: torch.Tensor | None, bias_hh: torch.Tensor | None, nonlinearity: str, reverse: bool,
                  backend: str, state_grad_norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, reverse, backend)


@_elman_rnn_op.register_fake
def _(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, reverse, backend, state_grad_norms=None):
    T, B, _ = x.shape
    H = weight_hh.shape[0]
    return x.new_empty(T, B, H), x.new_empty(B, H)


@torch.library.custom_op("elman_triton::backward_recurrence", mutates_args=())
def _backward_recurrence_op(dy: torch.Tensor, dh_n: torch.Tensor, y: torch.Tensor, weight_hh: torch.Tensor,
                            nonlinearity: str, reverse: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward_recurrence(dy, dh_n, y, weight_hh, nonlinearity, reverse, backend)


@_backward_recurrence_op.register_fake
def _(dy, dh_n, y, weight_hh, nonlinearity, reverse, backend):
    return torch.empty_like(y), y.new_empty(y.shape[1:], dtype=accumulator_dtype(y.dtype))


def _op_setup_context(ctx, inputs, output):
    _save(ctx, inputs, output[0])


def _op_backward(ctx, dy, dh_n):
    return _gradients(ctx, dy, dh_n, torch.ops.elman_triton.backward_recurrence)


_elman_rnn_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _recurrent_weight_grad(dz, y, h0, reverse):
    """dW_hh = Σ_t dz_tᵀ h_{t-1}, with h_{t-1} = h0 (None: zeros) at the first step, without
    concatenating h0 onto y."""
    if reverse:
        first, rest = dz[-1], torch.tensordot(dz[:-1], y[1:], dims=([0, 1], [0, 1]))
    else:
        first, rest = dz[0], torch.tensordot(dz[1:], y[:-1], dims=([0, 1], [0, 1]))
    return rest if h0 is None else rest + first.T @ h0


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
