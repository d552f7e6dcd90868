"""elman_rnn / elman_rnn_layer: the public ops, their input checks, backend dispatch and autograd.

One layer, one or both directions (a bidirectional layer is one launch forward and one backward, the
direction a grid axis). The Triton backends share everything except the recurrence itself:

    forward:  xp = x W_ihᵀ, one GEMM over all T·B rows and both directions, into the layer's sequence
              buffer; then the recurrence kernels write y over xp in place, each direction into its
              own half. It is plain torch before the recurrence, so autograd (and torch.compile)
              handles dx and dW_ih.
    backward: the recurrence kernels run BPTT in reverse time and write dz_t = ∂L/∂z_t (the gradient
              of xp); dW_hh = Σ_t dz_tᵀ h_{t∓1} and db = Σ_t dz_t are GEMMs and reductions after
              the loop. No atomics anywhere, so gradients are deterministic.

The sequence buffer is time-major (T, B, dirs·Hp) or, with batch_first, (B, T, dirs·Hp): x is read and
y written in the caller's order, without transposed copies. Hp is H rounded up to 16 (config.padded),
so that every row and direction starts 16-element aligned; for H a multiple of 16 the buffer is the
returned y itself, otherwise y is one copy of it without the padding columns.

Only y (which holds every h_t) is saved for backward; pre-activations are not.

Variable lengths (lengths=(B,) ints): row b's steps t ≥ lengths[b] are padding inside the kernels:
they read and write no state, y there is 0, h_n is each row's state after its own last step, and a
reverse row starts at its own end. No gathers, no copies of x or y.

Double backward: the reverse loop is itself a function (_RecurrenceBackward) whose derivatives are
those of a differentiable PyTorch loop over the saved y (_differentiable_backward), recomputed only when
a second derivative is asked for; the first backward always runs on the kernels.

torch.func and forward-mode AD: _Recurrence has the functorch form (setup_context) with
  - vmap: a vmapped dimension of the per-row inputs (x, h0, lengths; dy, dh_n in the backward) with
    shared weights folds into B, one launch for every model's rows; vmapped weights (an ensemble) run
    one model after the other (the kernels' grid has no model axis);
  - jvp: the tangent recurrence as a PyTorch loop over the saved y (_tangent_loop).
The GEMMs around the recurrence (dW_ih, dW_hh, db) are plain torch, so under vmap they stay per sample.
auto on CPU, whose native kernel has no vmap rule, runs that kernel inside _Recurrence under these
transforms ("native_recurrence"), so it folds the same way.

Two entry points share the code: _Recurrence (an autograd.Function) eagerly, and the custom ops
torch.ops.elman_triton.recurrence / .recurrence_backward under torch.compile, with the same autograd
and vmap rules. torch.func under torch.compile runs the layer eagerly (a graph break): a custom op's
autograd has no torch.func support (pytorch #168393). auto on CPU is a custom op under torch.compile
too (elman_triton::native_layer), so the compiler neither unrolls PyTorch's RNN over T nor
recompiles for a new T; the reference backend runs through torch's scan under torch.export (reference._recur).
"""
from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from elman_triton import persistent, stepwise
from elman_triton.config import (INTERPRETED, SUPPORTED_DTYPES, Layout, accumulator_dtype, kernel_options,
                                 padded)
from elman_triton.state_gradients import check_norms_buffer, state_gradient_norms
from elman_triton.reference import ACTIVATIONS, elman_rnn_reference

BACKENDS = ("auto", "stepwise", "persistent", "reference")
TRITON_BACKENDS = {"stepwise": stepwise, "persistent": persistent}


def elman_rnn(x: torch.Tensor, h0: torch.Tensor | None, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
              bias_ih: torch.Tensor | None = None, bias_hh: torch.Tensor | None = None, *, nonlinearity: str = "tanh",
              backend: str = "auto", reverse: bool = False, lengths: torch.Tensor | None = None,
              batch_first: bool = False,
              state_grad_norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One Elman RNN layer, one direction: h_t = act(x_t W_ihᵀ + b_ih + h_{t∓1} W_hhᵀ + b_hh).

    x: (T, B, D), or (B, T, D) with batch_first; T ≥ 1 (B = 0 gives empty outputs, as in nn.RNN).
    h0: (B, H) or None for zeros. weight_ih: (H, D), weight_hh: (H, H), bias_ih / bias_hh: (H,) or
    None (torch.nn.RNN's layout). Returns y (T, B, H) ((B, T, H) with batch_first) and h_n (B, H).

    backend: "stepwise" (one fused Triton launch per step), "persistent" (one launch for the whole
    sequence), "reference" (the plain PyTorch loop) or "auto". On CUDA, "auto" picks the persistent
    kernels where they hold the shape and the device holds their grid, else stepwise; on CPU it runs
    PyTorch's native RNN kernel. The Triton backends take CPU tensors only under TRITON_INTERPRET=1.
    reverse=True runs time backwards (torch.nn.RNN's reverse direction); y stays in input order.

    lengths: None, or a (B,) integer tensor on x's device: row b has lengths[b] valid steps
    (1 ≤ lengths[b] ≤ T, any order); its later steps neither read nor write state and give y = 0,
    h_n is its state after its own last step, and in reverse it starts at its own end. Checking the
    values reads them, so with CUDA lengths that synchronises once per call.

    state_grad_norms: None, or a float32 (T, B) tensor on x's device that the backward fills with
    ‖∂L/∂h_t[b, :]‖₂, the total gradient of the state at step t (input order), from the gradients it
    already computes (one extra GEMM; see elman_triton.diagnostics). With backend="auto" on CPU this
    runs the reference loop instead of PyTorch's native kernel, which does not expose them.
    """
    if weight_hh.dim() != 2:
        raise ValueError(f"weight_hh must be (H, H), got shape {tuple(weight_hh.shape)}")
    if h0 is not None and h0.dim() != 2:
        raise ValueError(f"h0 must have shape (B, H), got {tuple(h0.shape)}")
    if state_grad_norms is not None:
        check_norms_buffer(state_grad_norms, x.shape[1::-1] if batch_first else x.shape[:2], x.device)
        state_grad_norms = state_grad_norms.unsqueeze(0)
    y, h_n = elman_rnn_layer(x, None if h0 is None else h0.unsqueeze(0), (weight_ih,), (weight_hh,),
                             None if bias_ih is None else (bias_ih,), None if bias_hh is None else (bias_hh,),
                             nonlinearity=nonlinearity, backend=backend, reverse=reverse, lengths=lengths,
                             batch_first=batch_first, state_grad_norms=state_grad_norms)
    return y, h_n[0]


def elman_rnn_layer(x: torch.Tensor, h0: torch.Tensor | None, weights_ih: Sequence[torch.Tensor],
                    weights_hh: Sequence[torch.Tensor], biases_ih: Sequence[torch.Tensor] | None = None,
                    biases_hh: Sequence[torch.Tensor] | None = None, *, nonlinearity: str = "tanh",
                    backend: str = "auto", reverse: bool = False, lengths: torch.Tensor | None = None,
                    batch_first: bool = False,
                    state_grad_norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One Elman RNN layer with one or two directions, run together (one launch per pass).

    weights_ih / weights_hh / biases_*: sequences with one tensor per direction, in torch.nn.RNN's
    layout ((H, D), (H, H), (H,)); biases_* may be None. With two, direction 0 runs forward and
    direction 1 in reverse (nn.RNN's bidirectional layer); with one, `reverse` picks its order.
    h0: (dirs, B, H) or None. Returns y (T, B, dirs·H) ((B, T, dirs·H) with batch_first), each
    direction's outputs in its half as nn.RNN lays them out, and h_n (dirs, B, H).
    state_grad_norms: None or float32 (dirs, T, B). Everything else as elman_rnn.
    """
    return run_layer(x, h0, weights_ih, weights_hh, biases_ih, biases_hh, nonlinearity=nonlinearity, backend=backend,
                     reverse=reverse, lengths=lengths, batch_first=batch_first, state_grad_norms=state_grad_norms)


def run_layer(x, h0, weights_ih, weights_hh, biases_ih=None, biases_hh=None, *, nonlinearity="tanh", backend="auto",
              reverse=False, lengths=None, batch_first=False, state_grad_norms=None, lengths_are_valid=False):
    """elman_rnn_layer, for callers that built lengths themselves (ElmanRNN, from a PackedSequence):
    with lengths_are_valid=True their values are not read back (no synchronisation per layer)."""
    if torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is not None:
        # torch.func under torch.compile: Dynamo hands a custom op torch.func's wrapped tensors, and a
        # custom op's autograd has no torch.func support (pytorch #168393, #179652), so the layer runs
        # eagerly (a graph break), where the autograd.Functions below carry the transforms.
        return _run_layer_eagerly(x, h0, weights_ih, weights_hh, biases_ih, biases_hh, nonlinearity=nonlinearity,
                                  backend=backend, reverse=reverse, lengths=lengths, batch_first=batch_first,
                                  state_grad_norms=state_grad_norms, lengths_are_valid=lengths_are_valid)
    dirs = len(weights_hh)
    T, B = _check_inputs(x, h0, weights_ih, weights_hh, biases_ih, biases_hh, nonlinearity, backend, batch_first)
    H = weights_hh[0].shape[0]
    if lengths is not None:
        check_lengths(lengths, T, B, x.device, values=not lengths_are_valid)
    if state_grad_norms is not None and tuple(state_grad_norms.shape) != (dirs, T, B):
        raise ValueError(f"state_grad_norms must have shape (dirs, T, B) = {(dirs, T, B)}, "
                         f"got {tuple(state_grad_norms.shape)}")
    if B == 0:  # an empty batch, which nn.RNN accepts: empty outputs, zero weight gradients
        backend = "reference"
    if backend == "auto" and x.device.type != "cuda":
        # PyTorch's native kernel, except where it cannot serve: it exposes no per-step gradients, has no
        # reverse-only layer for variable lengths, and takes those as a PackedSequence, whose packing
        # torch.compile does not trace (under torch.compile it is a custom op: _native_op). It has no
        # vmap rule (aten::rnn_tanh, nor its backward) and no forward-mode AD for packing, so under eager
        # torch.func transforms (where jacrev, say, vmaps the backward of a forward it has already run)
        # and forward-mode AD it runs inside _Recurrence ("native_recurrence": _native_recurrence), whose
        # rules serve the transforms as for the Triton backends; with lengths, the reference loop.
        compiling = torch.compiler.is_compiling()
        transformed = not compiling and _transformed()
        if state_grad_norms is None and (lengths is None or not (reverse or compiling)) and not transformed:
            backend = "native"
        elif state_grad_norms is None and lengths is None and transformed and x.dtype in SUPPORTED_DTYPES:
            backend = "native_recurrence"
        else:
            backend = "reference"
    if backend == "reference":
        return _reference_layer(x, h0, weights_ih, weights_hh, biases_ih, biases_hh, nonlinearity, reverse, lengths,
                                batch_first, state_grad_norms)
    if backend == "native" and torch.compiler.is_compiling():  # lengths is None here
        return _native_op(x, h0, weights_ih, weights_hh, biases_ih, biases_hh, nonlinearity, reverse, batch_first)
    if backend == "native":
        return _torch_native(x, h0, weights_ih, weights_hh, biases_ih, biases_hh, nonlinearity, reverse, lengths,
                             batch_first)
    if x.device.type == "cpu" and not INTERPRETED and backend != "native_recurrence":
        raise RuntimeError(f"backend={backend!r} runs Triton kernels, which need CUDA tensors; on CPU set "
                           "TRITON_INTERPRET=1 before importing elman_triton, or use backend='auto'")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend={backend!r} supports {SUPPORTED_DTYPES}, got {x.dtype}")

    # Plain, differentiable torch around the recurrence: stack the directions' weights (a copy of two
    # (H, H) and (H, D) matrices for a bidirectional layer; a view for one direction), add the biases
    # in the accumulator dtype, pad W_ih's rows to Hp with zeros, and project x for every step and
    # direction in one GEMM.
    Hp = padded(H)
    w_hh = _stack(weights_hh)
    w_ih = _stack(weights_ih)
    if Hp != H:
        w_ih = F.pad(w_ih, (0, 0, 0, Hp - H))
    xp = torch.matmul(x, w_ih.reshape(dirs * Hp, -1).T)  # the sequence buffer: (T, B, dirs·Hp) or (B, T, ·)
    bias = _combined_bias(biases_ih, biases_hh, dirs, H, x)
    if h0 is None:
        h0 = x.new_zeros(dirs, B, H)
    args = (xp, h0, w_hh, bias, lengths, state_grad_norms, nonlinearity, reverse, batch_first, backend)
    if torch.compiler.is_compiling():
        y, h_n = torch.ops.elman_triton.recurrence(*args)
    else:
        y, h_n = _Recurrence.apply(*args, not _transformed())
    if Hp != H:  # drop the padding columns: nn.RNN's contiguous (·, ·, dirs·H) output, one copy
        y = y.unflatten(2, (dirs, Hp))[..., :H].contiguous().flatten(2)
    return y, h_n


_run_layer_eagerly = torch.compiler.disable(run_layer)


def _transformed():
    """Whether a torch.func transform or a forward-AD level is active (then _Recurrence cannot write y
    over its input)."""
    return torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0


def check_lengths(lengths, T, B, device, values=True):
    """lengths must be a (B,) integer tensor on x's device with every value in [1, T]. The value check
    reads the tensor (one synchronisation for CUDA lengths); under torch.compile it is left out."""
    if not torch.is_tensor(lengths):
        raise TypeError(f"lengths must be a (B,) integer tensor, got {type(lengths).__name__}")
    if lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"lengths must be int32 or int64, got {lengths.dtype}")
    if tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must have shape (B,) = ({B},), got {tuple(lengths.shape)}")
    if lengths.device != device:
        raise ValueError(f"lengths is on {lengths.device} but x is on {device}; put them on one device")
    if values and B and not torch.compiler.is_compiling():
        values = _unwrapped(lengths)  # under torch.func: every model's lengths at once
        low, high = values.min().item(), values.max().item()
        if low < 1 or high > T:
            raise ValueError(f"every length must be in [1, T] = [1, {T}], got values from {low} to {high}")


def _unwrapped(t):
    """The plain tensor under torch.func's wrappers (a vmapped tensor: all of its values)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _stack(tensors):
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _recurrence(backend, layout, dtype, device, opts, has_lengths):
    """The launcher module for a Triton backend. "auto" (CUDA) is persistent where its kernels hold the
    shape and the device holds their grid at once (persistent.fits, for the kernels this call compiles:
    with lengths they need more registers), else stepwise."""
    if backend == "auto":
        backend = "persistent" if persistent.fits(layout, dtype, device, opts, has_lengths) else "stepwise"
    elif backend == "persistent":
        persistent.check_supported(layout.B, layout.H, dtype, device)
    return TRITON_BACKENDS[backend]


# The launchers run eagerly even when reached from code torch.compile is running (after a graph break,
# as under torch.func): Dynamo must not trace into a launch (under TRITON_INTERPRET=1, into the
# interpreter). Costs under a microsecond per call.
@torch.compiler.disable
def _forward(xp, y, h0, w_hh, bias, lengths, nonlinearity, reverse, batch_first, backend):
    """Run the recurrence from xp into y (y may be xp); returns h_n (dirs, B, H)."""
    dirs, _, H = w_hh.shape
    lay = Layout.of(xp, H, dirs, batch_first, reverse)
    if backend == "native_recurrence":
        return _native_recurrence(xp, y, h0, w_hh, bias, nonlinearity, lay)
    opts = kernel_options(xp.dtype, nonlinearity)
    h_n = xp.new_empty(dirs, lay.B, H)
    _recurrence(backend, lay, xp.dtype, xp.device, opts, lengths is not None).forward_recurrence(
        xp, y, _padded_rows(h0, lay.Hp), _padded_rows(w_hh, lay.Hp), bias, h_n, lengths, opts, lay)
    return h_n


@torch.compiler.disable
def _backward(dy, dh_n, y, w_hh, lengths, nonlinearity, reverse, batch_first, backend):
    """(dz, dh0): dz in y's layout, dh0 (dirs, B, H) in the accumulator dtype."""
    dirs, _, H = w_hh.shape
    if backend == "native_recurrence":  # the reverse loop in PyTorch: PyTorch's kernel has no such pass
        return _differentiable_backward(dy, dh_n, y, w_hh, lengths, nonlinearity,
                                        _shape_layout(y, H, dirs, batch_first, reverse))
    lay = Layout.of(y, H, dirs, batch_first, reverse)
    opts = kernel_options(y.dtype, nonlinearity)
    dz = torch.empty_like(y)
    dh0 = _recurrence(backend, lay, y.dtype, y.device, opts, lengths is not None).backward_recurrence(
        dy, dh_n, y, _padded_rows(w_hh, lay.Hp), dz, lengths, opts, lay)
    return dz, dh0.contiguous()  # the launchers may leave it in their padded carry: a (dirs, B, H) copy


def _padded_rows(t, Hp):
    """t (·, ·, H) with its rows padded with zeros to Hp elements and contiguous, as the kernels read h0
    and W_hh (aligned, vectorised loads for any H): t itself when it already is, else a copy of it
    (dirs·B·Hp or dirs·H·Hp elements, once per call)."""
    H = t.shape[-1]
    if Hp == H and t.is_contiguous():
        return t
    return F.pad(t, (0, Hp - H)) if Hp != H else t.contiguous()


def _save(ctx, inputs, y):
    _, h0, w_hh, bias, lengths, norms, nonlinearity, reverse, batch_first, backend = inputs
    ctx.save_for_backward(h0, w_hh, y, lengths)
    ctx.save_for_forward(h0, w_hh, y, lengths)  # the tangent (jvp) reads the same
    ctx.has_bias, ctx.norms = bias is not None, norms  # norms: an output buffer the backward writes
    ctx.nonlinearity, ctx.reverse, ctx.batch_first, ctx.backend = nonlinearity, reverse, batch_first, backend


def _shape_layout(buf, H, dirs, batch_first, reverse):
    """The Layout of a sequence buffer from its shape alone: for the PyTorch code around the kernels,
    which may see the batched tensors of torch.func (whose strides are not the kernels' business)."""
    T, B = (buf.shape[1], buf.shape[0]) if batch_first else buf.shape[:2]
    return Layout(T, B, H, dirs, 0, 0, batch_first, reverse)


def _gradients(ctx, dy, dh_n, backward):
    """Gradients of (xp, h0, w_hh, bias): the reverse loop (backward: _RecurrenceBackward.apply, or its
    custom op under torch.compile) writes dz = ∂L/∂xp, then dW_hh = Σ_t dz_tᵀ h_{t∓1} and db = Σ_t dz_t
    are GEMMs and a reduction, in plain torch (so torch.compile and torch.func see them: under vmap
    they stay per sample)."""
    h0, w_hh, y, lengths = ctx.saved_tensors
    dirs, _, H = w_hh.shape
    lay = _shape_layout(y, H, dirs, ctx.batch_first, ctx.reverse)
    dy = torch.zeros_like(y) if dy is None else dy
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
    dz, dh0 = backward(dy, dh_n, y, w_hh, lengths, ctx.nonlinearity, ctx.reverse, ctx.batch_first, ctx.backend)
    if ctx.norms is not None:
        for d in range(dirs):
            state_gradient_norms(_time_major(dy, lay, d), _time_major(dz, lay, d), dh_n[d], w_hh[d],
                                 _reversed(lay, d), ctx.norms[d], lengths)
    need = ctx.needs_input_grad
    dw_hh = torch.stack([_recurrent_weight_grad(dz, y, h0[d], lengths, lay, d) for d in range(dirs)]) if need[2] else None
    db = (torch.stack([_columns(dz, lay, d).sum(0, dtype=accumulator_dtype(y.dtype)) for d in range(dirs)])
          if ctx.has_bias and need[3] else None)
    return dz, dh0.to(y.dtype) if need[1] else None, dw_hh, db, None, None, None, None, None, None


def _tangents(ctx, dxp, dh0, dw_hh, dbias):
    """Forward mode (jvp): the tangents of (y, h_n), by _tangent_loop over the saved y."""
    h0, w_hh, y, lengths = ctx.saved_tensors
    lay = _shape_layout(y, w_hh.shape[2], w_hh.shape[0], ctx.batch_first, ctx.reverse)
    return _tangent_loop(dxp, dh0, dw_hh, dbias, y, h0, w_hh, lengths, ctx.nonlinearity, lay)


class _Recurrence(torch.autograd.Function):
    """The eager path. Outside torch.func transforms and forward-mode AD (inplace=True) the recurrence
    writes y over xp (mark_dirty), the least memory and Python between the call and the kernels; under
    them (inplace=False) y is a buffer of its own, as functorch requires of an autograd.Function.
    backward, jvp and vmap make it compose with torch.autograd, torch.autograd.forward_ad and torch.func."""

    @staticmethod
    def forward(xp, h0, w_hh, bias, lengths, norms, nonlinearity, reverse, batch_first, backend, inplace):
        y = xp if inplace else torch.empty_like(xp)
        return y, _forward(xp, y, h0, w_hh, bias, lengths, nonlinearity, reverse, batch_first, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        if inputs[-1]:
            ctx.mark_dirty(inputs[0])
        _save(ctx, inputs[:-1], output[0])

    @staticmethod
    def backward(ctx, dy, dh_n):
        return *_gradients(ctx, dy, dh_n, _RecurrenceBackward.apply), None

    @staticmethod
    def jvp(ctx, dxp, dh0, dw_hh, dbias, *_):
        return _tangents(ctx, dxp, dh0, dw_hh, dbias)

    @staticmethod
    def vmap(info, in_dims, *inputs):
        return _vmap_recurrence(lambda *args: _Recurrence.apply(*args, False), info, in_dims[:-1], inputs[:-1])


class _RecurrenceBackward(torch.autograd.Function):
    """The kernels' reverse loop, (dy, dh_n, y, w_hh) -> (dz, dh0), as a function that torch.autograd
    and torch.func can differentiate again (double backward, forward-over-reverse): its own derivatives
    are those of _differentiable_backward, the same maths as a PyTorch loop, recomputed from the saved
    inputs only when asked for."""

    @staticmethod
    def forward(dy, dh_n, y, w_hh, lengths, nonlinearity, reverse, batch_first, backend):
        return _backward(dy, dh_n, y, w_hh, lengths, nonlinearity, reverse, batch_first, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_backward(ctx, inputs)

    @staticmethod
    def backward(ctx, g_dz, g_dh0):
        return _backward_vjp(ctx, g_dz, g_dh0)

    @staticmethod
    def jvp(ctx, *tangents):
        return _backward_jvp(ctx, tangents[:4])

    @staticmethod
    def vmap(info, in_dims, *inputs):
        return _vmap_recurrence(_RecurrenceBackward.apply, info, in_dims, inputs, backward=True)


def _save_backward(ctx, inputs):
    ctx.save_for_backward(*inputs[:5])
    ctx.save_for_forward(*inputs[:5])
    ctx.options = inputs[5:]


def _loop_backward(ctx):
    """The saved (dy, dh_n, y, w_hh) and _differentiable_backward as a function of them."""
    dy, dh_n, y, w_hh, lengths = ctx.saved_tensors
    nonlinearity, reverse, batch_first, _ = ctx.options
    lay = _shape_layout(y, w_hh.shape[2], w_hh.shape[0], batch_first, reverse)
    return (dy, dh_n, y, w_hh), lambda *p: _differentiable_backward(*p, lengths, nonlinearity, lay)


def _backward_vjp(ctx, g_dz, g_dh0):
    primals, loop = _loop_backward(ctx)
    _, pullback = torch.func.vjp(loop, *primals)
    return *pullback((g_dz, g_dh0)), None, None, None, None, None


def _backward_jvp(ctx, tangents):
    primals, loop = _loop_backward(ctx)
    tangents = [torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents)]
    return torch.func.jvp(loop, primals, tuple(tangents))[1]


def _vmap_recurrence(apply, info, in_dims, inputs, backward=False):
    """The vmap rule of the recurrence (forward or backward): a vmapped dimension of the per-row inputs
    (sequence buffers, states, lengths) with shared weights folds into B, the N models' rows side by
    side in one launch: a free reshape for batch-first buffers, one copy of each time-major buffer (N
    moves next to B) and of any unbatched per-row input (expanded to N). Vmapped weights (an
    ensemble) run one model after the other (N launches, stacked): the kernels' grid has no model
    axis. state_grad_norms has no vmapped form."""
    if backward:  # dy, dh_n, y, w_hh, lengths, nonlinearity, reverse, batch_first, backend
        kinds, batch_first, outs = ("seq", "state", "seq", "weight", "lengths"), inputs[7], ("seq", "state")
    else:  # xp, h0, w_hh, bias, lengths, state_grad_norms, nonlinearity, reverse, batch_first, backend
        if inputs[5] is not None:
            raise ValueError("state_grad_norms is not supported under torch.func.vmap")
        kinds, batch_first, outs = ("seq", "state", "weight", "weight", "lengths"), inputs[8], ("seq", "state")
    return _vmap_rows(apply, info, in_dims, inputs, kinds, outs, batch_first)


def _vmap_rows(apply, info, in_dims, inputs, kinds, out_kinds, batch_first):
    """A vmap rule over per-row arguments (kinds: "seq" (T, B, ·) or (B, T, ·) with batch_first, "state"
    (dirs, B, ·), "lengths" (B,), "weight" (shared by every row); the rest pass through): folded into B when no weight is vmapped, else a loop over the models."""
    n = info.batch_size
    weights_vmapped = any(d is not None for d, kind in zip(in_dims, kinds) if kind == "weight")
    if weights_vmapped:
        return _vmap_loop(apply, info, in_dims, inputs)
    args = list(inputs)
    for k, (a, d, kind) in enumerate(zip(inputs, in_dims, kinds)):
        if a is not None and kind != "weight":
            j = _row_dim(kind, batch_first)
            a = a.unsqueeze(j).expand(*a.shape[:j], n, *a.shape[j:]) if d is None else a.movedim(d, j)
            args[k] = a.flatten(j, j + 1)
    results = apply(*args)
    dims = tuple(_row_dim(kind, batch_first) for kind in out_kinds)
    return tuple(r.unflatten(j, (n, -1)) for r, j in zip(results, dims)), dims


def _vmap_loop(apply, info, in_dims, inputs):
    """A vmap rule by a loop over the vmapped dimension: one call per model, outputs stacked."""
    results = [apply(*(_select(a, d, i) for a, d in zip(inputs, in_dims))) for i in range(info.batch_size)]
    return tuple(torch.stack(r) for r in zip(*results)), (0,) * len(results[0])


def _row_dim(kind, batch_first):
    return {"seq": 0 if batch_first else 1, "state": 1, "lengths": 0}[kind]


def _select(a, d, i):
    return a if d is None else a.select(d, i)


# The torch.compile path: the same two pieces as custom ops, so the compiler treats the Triton launches
# as opaque calls with known output shapes and traces the GEMMs around them. A custom op's output may not
# alias its input, so here y is a buffer of its own. Their autograd and vmap registrations are the eager
# Functions' (forward-mode AD has no custom-op registration: jvp runs eagerly).
@torch.library.custom_op("elman_triton::recurrence", mutates_args=())
def _recurrence_op(xp: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor, bias: torch.Tensor | None,
                   lengths: torch.Tensor | None, state_grad_norms: torch.Tensor | None, nonlinearity: str,
                   reverse: bool, batch_first: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.empty_like(xp)
    return y, _forward(xp, y, h0, w_hh, bias, lengths, nonlinearity, reverse, batch_first, backend)


@_recurrence_op.register_fake
def _(xp, h0, w_hh, bias, lengths, state_grad_norms, nonlinearity, reverse, batch_first, backend):
    return torch.empty_like(xp), xp.new_empty(h0.shape)


@torch.library.custom_op("elman_triton::recurrence_backward", mutates_args=())
def _recurrence_backward_op(dy: torch.Tensor, dh_n: torch.Tensor, y: torch.Tensor, w_hh: torch.Tensor,
                            lengths: torch.Tensor | None, nonlinearity: str, reverse: bool, batch_first: bool,
                            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dy, dh_n, y, w_hh, lengths, nonlinearity, reverse, batch_first, backend)


@_recurrence_backward_op.register_fake
def _(dy, dh_n, y, w_hh, lengths, nonlinearity, reverse, batch_first, backend):
    return torch.empty_like(y), dh_n.new_empty(dh_n.shape, dtype=accumulator_dtype(y.dtype))


def _op_setup_context(ctx, inputs, output):
    _save(ctx, inputs, output[0])


def _op_backward(ctx, dy, dh_n):
    return _gradients(ctx, dy, dh_n, torch.ops.elman_triton.recurrence_backward)


_recurrence_op.register_autograd(_op_backward, setup_context=_op_setup_context)
_recurrence_op.register_vmap(lambda info, in_dims, *inputs: _vmap_recurrence(
    torch.ops.elman_triton.recurrence, info, in_dims, inputs))
_recurrence_backward_op.register_autograd(_backward_vjp, setup_context=lambda ctx, inputs, output:
                                          _save_backward(ctx, inputs))
_recurrence_backward_op.register_vmap(lambda info, in_dims, *inputs: _vmap_recurrence(
    torch.ops.elman_triton.recurrence_backward, info, in_dims, inputs, backward=True))


# ------------------------------------------------------------------------- views of the sequence buffers

def _columns(buf, lay, d):
    """Direction d's (rows, H) block of a sequence buffer, rows in buffer order (a strided view)."""
    return buf.reshape(-1, buf.shape[2])[:, d * lay.Hp: d * lay.Hp + lay.H]  # a view (reshape: vmap too)


def _time_major(buf, lay, d):
    """Direction d's (T, B, H) view of a sequence buffer (strided: no copy)."""
    block = buf[..., d * lay.Hp: d * lay.Hp + lay.H]
    return block.transpose(0, 1) if lay.batch_first else block


def _reversed(lay, d):
    return (d == 1) != lay.reverse


def _first_steps(lengths, lay, d, device):
    """(B,) the step at which each row of direction d starts (reads h0)."""
    if not _reversed(lay, d):
        return torch.zeros(lay.B, dtype=torch.int64, device=device)
    if lengths is None:
        return torch.full((lay.B,), lay.T - 1, dtype=torch.int64, device=device)
    return lengths.long() - 1


def _recurrent_weight_grad(dz, y, h0, lengths, lay, d):
    """dW_hh of direction d = Σ_t dz_tᵀ h_{t∓1}, where a row's first step pairs with h0.

    Time-major buffers: step t∓1 of row b is the row B·(∓1) away in the flat buffer, so the sum over
    every other step is one GEMM over strided views (no copy); padding steps contribute nothing (dz
    and y are 0 there, so a reverse row's first step meets the zero y of the padding after it). The
    first steps are one small gather and a GEMM with h0. Batch-first buffers put a row's steps next to
    each other, and flattening the (B, T − 1) views copies them once.
    """
    dz_d, y_d = _time_major(dz, lay, d), _time_major(y, lay, d)
    later, earlier = (slice(None, -1), slice(1, None)) if _reversed(lay, d) else (slice(1, None), slice(None, -1))
    # flatten + mm rather than tensordot: with a data-dependent B (a sorted PackedSequence under
    # torch.compile), tensordot's reshape guards on B and breaks the graph; flatten does not.
    grad = dz_d[later].flatten(0, 1).T @ y_d[earlier].flatten(0, 1)
    first = _first_steps(lengths, lay, d, dz.device)
    dz_first = dz_d[first, torch.arange(lay.B, device=dz.device)]  # (B, H)
    return grad + dz_first.T @ h0


def _differentiable_backward(dy, dh_n, y, w_hh, lengths, nonlinearity, lay):
    """(dz, dh0) by a PyTorch loop over the saved y that autograd can differentiate: the double-backward
    path. dz_t = (dy_t + dh_{t±1}) ⊙ act'(h_t) with act' written through h (tanh' = 1 − h², relu' = [h > 0]),
    dh_t = dz_t W_hh, padding steps pass dh through. Its gradient reaches y, whose own backward is the
    kernels'. Cost: T small ops per direction, only when create_graph=True."""
    dzs, dh0 = [], []
    steps = torch.arange(lay.T, device=y.device)
    for d in range(lay.dirs):
        y_d, dy_d = _time_major(y, lay, d), _time_major(dy, lay, d)
        active = (steps.unsqueeze(1) < (lay.T if lengths is None else lengths)).unsqueeze(2)  # (T, B, 1)
        g = dh_n[d].to(accumulator_dtype(y.dtype))
        dz_d = [None] * lay.T
        order = range(lay.T) if _reversed(lay, d) else reversed(range(lay.T))
        for t in order:
            h = y_d[t].to(g.dtype)
            grad = 1 - h * h if nonlinearity == "tanh" else (h > 0).to(g.dtype)
            dz = torch.where(active[t], (dy_d[t].to(g.dtype) + g) * grad, 0.0)
            g = torch.where(active[t], dz.to(y.dtype).to(g.dtype) @ w_hh[d].to(g.dtype), g)
            dz_d[t] = dz.to(y.dtype)
        dzs.append(F.pad(torch.stack(dz_d), (0, lay.Hp - lay.H)))
        dh0.append(g)
    dz = torch.cat(dzs, dim=2)
    return (dz.transpose(0, 1) if lay.batch_first else dz), torch.stack(dh0)


def _tangent_loop(dxp, dh0, dw_hh, dbias, y, h0, w_hh, lengths, nonlinearity, lay):
    """Forward mode (jvp): the tangents (dy in y's layout, dh_n (dirs, B, H)) by a PyTorch loop over the
    saved y. The tangent of the recurrence is itself a linear recurrence,
        dh_t = act'(z_t) ⊙ (dxp_t + db + dh_{t∓1} W_hhᵀ + h_{t∓1} dW_hhᵀ),   dh_{-1} = dh0,
    with act' written through h_t as in _differentiable_backward; padding steps pass the tangent
    through and give dy = 0. Any tangent may be None (zero). Cost: T small ops per direction; it is
    differentiable, so higher orders compose."""
    acc = accumulator_dtype(y.dtype)
    active = (torch.arange(lay.T, device=y.device).unsqueeze(1) < (lay.T if lengths is None else lengths)).unsqueeze(2)
    dys, dh_n = [], []
    for d in range(lay.dirs):
        y_d = _time_major(y, lay, d)
        dxp_d = None if dxp is None else _time_major(dxp, lay, d)
        h = h0[d].to(acc)
        g = torch.zeros_like(h) if dh0 is None else dh0[d].to(acc)
        dy_d = [None] * lay.T
        for t in (reversed(range(lay.T)) if _reversed(lay, d) else range(lay.T)):
            u = g @ w_hh[d].to(acc).T
            if dxp_d is not None:
                u = u + dxp_d[t].to(acc)
            if dbias is not None:
                u = u + dbias[d].to(acc)
            if dw_hh is not None:
                u = u + h @ dw_hh[d].to(acc).T
            h_t = y_d[t].to(acc)
            g_t = u * (1 - h_t * h_t if nonlinearity == "tanh" else (h_t > 0).to(acc))
            g, h = torch.where(active[t], g_t, g), torch.where(active[t], h_t, h)
            dy_d[t] = torch.where(active[t], g_t, 0.0).to(y.dtype)
        dys.append(F.pad(torch.stack(dy_d), (0, lay.Hp - lay.H)))
        dh_n.append(g.to(y.dtype))
    dy = torch.cat(dys, dim=2)
    return (dy.transpose(0, 1) if lay.batch_first else dy), torch.stack(dh_n)


# ------------------------------------------------------------------------------- non-Triton backends

def _reference_layer(x, h0, weights_ih, weights_hh, biases_ih, biases_hh, nonlinearity, reverse, lengths,
                     batch_first, state_grad_norms):
    """The plain PyTorch loop, one direction after the other."""
    x = x.transpose(0, 1) if batch_first else x
    ys, h_n = [], []
    for d in range(len(weights_hh)):
        y, h = elman_rnn_reference(x, None if h0 is None else h0[d], weights_ih[d], weights_hh[d],
                                   None if biases_ih is None else biases_ih[d],
                                   None if biases_hh is None else biases_hh[d], nonlinearity=nonlinearity,
                                   reverse=(d == 1) != reverse, lengths=lengths,
                                   state_grad_norms=None if state_grad_norms is None else state_grad_norms[d])
        ys.append(y)
        h_n.append(h)
    y = torch.cat(ys, dim=2) if len(ys) > 1 else ys[0]
    return (y.transpose(0, 1).contiguous() if batch_first else y), torch.stack(h_n)  # nn.RNN's contiguous y


def _native_recurrence(xp, y, h0, w_hh, bias, nonlinearity, lay):
    """The recurrence of backend "native_recurrence" (auto on CPU under torch.func and forward-mode AD):
    PyTorch's native kernel over each direction's block of the sequence buffer xp, read through an
    identity W_ih (one extra H×H GEMM over the sequence), y written into its block; returns h_n. Its
    backward is _differentiable_backward's loop: so a vmapped batch folds into B and the weight
    gradients stay GEMMs per model (one native call for B·N rows, not N)."""
    run = _native_kernel(nonlinearity)
    eye, zeros = torch.eye(lay.H, dtype=xp.dtype, device=xp.device), xp.new_zeros(lay.H)
    h_n = []
    for d in range(lay.dirs):
        backwards = _reversed(lay, d)
        block = _time_major(xp, lay, d)
        block = block.flip(0) if backwards else block
        b = zeros if bias is None else bias[d].to(xp.dtype)
        # (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        out, h = run(block, h0[d:d + 1], [eye, w_hh[d], b, zeros], True, 1, 0.0, False, False, False)
        _time_major(y, lay, d).copy_(out.flip(0) if backwards else out)
        h_n.append(h[0])
    if lay.Hp != lay.H:  # the padding columns, as the kernels leave them
        y.unflatten(2, (lay.dirs, lay.Hp))[..., lay.H:].zero_()
    return torch.stack(h_n)


def _torch_native(x, h0, weights_ih, weights_hh, biases_ih, biases_hh, nonlinearity, reverse, lengths,
                  batch_first):
    """PyTorch's own RNN kernel (what nn.RNN runs): the fast path for CPU tensors (native_layer)."""
    dirs, H = len(weights_hh), weights_hh[0].shape[0]
    B = x.shape[0] if batch_first else x.shape[1]
    params, has_bias = native_params(weights_ih, weights_hh, biases_ih, biases_hh)
    hx = x.new_zeros(dirs, B, H) if h0 is None else h0
    y, (h_n,) = native_layer(_native_kernel(nonlinearity), x, hx, params, has_bias, dirs == 2, reverse, lengths,
                             batch_first)
    return y, h_n


def native_params(weights_ih, weights_hh, biases_ih, biases_hh, weights_hr=None):
    """PyTorch's RNN kernels' flat parameter list (w_ih, w_hh[, b_ih, b_hh][, w_hr] per direction; a
    missing bias as zeros) and has_biases, for the Elman, GRU and LSTM (weights_hr: its proj_size) alike."""
    has_bias = biases_ih is not None or biases_hh is not None
    params = []
    for d in range(len(weights_hh)):
        params += [weights_ih[d], weights_hh[d]]
        if has_bias:
            params += [b[d] if b is not None else weights_hh[d].new_zeros(weights_hh[d].shape[0])
                       for b in (biases_ih, biases_hh)]
        if weights_hr is not None:
            params.append(weights_hr[d])
    return params, has_bias


def native_layer(run, x, hx, params, has_bias, bidirectional, reverse, lengths, batch_first):
    """One layer of PyTorch's own RNN kernel run (torch.rnn_tanh, rnn_relu, gru or lstm) over a padded
    batch: hx its initial state ((h0, c0) for torch.lstm), params its flat list (native_params). Variable
    lengths run through its packed-sequence form (a pack and an unpack of x and y, as nn's modules; it has
    no reverse-only layer for them). Returns y, contiguous (a batch-first y comes back from the kernel as a
    transposed view; the modules return a contiguous one), and the list of its final states."""
    time_dim = 1 if batch_first else 0
    if lengths is None:
        x_in = x.flip(time_dim) if reverse else x
        # Positional: (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        y, *state = run(x_in, hx, params, has_bias, 1, 0.0, False, bidirectional, batch_first)
        return (y.flip(time_dim) if reverse else y).contiguous(), state
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=batch_first, enforce_sorted=False)
    hx = tuple(s.index_select(1, packed.sorted_indices) for s in hx) if isinstance(hx, tuple) else \
        hx.index_select(1, packed.sorted_indices)
    # Packed: (data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional)
    data, *state = run(packed.data, packed.batch_sizes, hx, params, has_bias, 1, 0.0, False, bidirectional)
    y, _ = pad_packed_sequence(PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                                              packed.unsorted_indices),
                               batch_first=batch_first, total_length=x.shape[time_dim])
    return y.contiguous(), [h.index_select(1, packed.unsorted_indices) for h in state]


def _native_kernel(nonlinearity):
    return torch.rnn_tanh if nonlinearity == "tanh" else torch.rnn_relu


def _native_op(x, h0, weights_ih, weights_hh, biases_ih, biases_hh, nonlinearity, reverse, batch_first):
    """The native kernel under torch.compile: one opaque custom op, so the compiler neither unrolls
    PyTorch's RNN into T steps (compile work growing with T) nor recompiles for a new T. Its weights go
    in stacked per direction (a small copy for two directions), missing biases as zeros (no Tensor[]
    arguments: a custom op's autograd for those has no torch.func support)."""
    dirs, H = len(weights_hh), weights_hh[0].shape[0]
    hx = x.new_zeros(dirs, x.shape[0] if batch_first else x.shape[1], H) if h0 is None else h0
    biases = [x.new_zeros(dirs, H) if b is None else _stack(b) for b in (biases_ih, biases_hh)]
    return torch.ops.elman_triton.native_layer(x, hx, _stack(weights_ih), _stack(weights_hh), *biases, nonlinearity,
                                               reverse, batch_first)


def _native_stacked(x, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse, batch_first):
    params = [w[d] for d in range(w_hh.shape[0]) for w in (w_ih, w_hh, b_ih, b_hh)]
    y, (h_n,) = native_layer(_native_kernel(nonlinearity), x, hx, params, True, w_hh.shape[0] == 2, reverse, None,
                             batch_first)
    return y, h_n


@torch.library.custom_op("elman_triton::native_layer", mutates_args=())
def _native_layer_op(x: torch.Tensor, hx: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
                     b_hh: torch.Tensor, nonlinearity: str, reverse: bool,
                     batch_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _native_stacked(x, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse, batch_first)


@_native_layer_op.register_fake
def _(x, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse, batch_first):
    return x.new_empty(*x.shape[:2], hx.shape[0] * hx.shape[2]), hx.new_empty(hx.shape)


@torch.library.custom_op("elman_triton::native_layer_backward", mutates_args=())
def _native_layer_backward_op(dy: torch.Tensor, dh_n: torch.Tensor, x: torch.Tensor, hx: torch.Tensor,
                              w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor, b_hh: torch.Tensor,
                              nonlinearity: str, reverse: bool, batch_first: bool) -> tuple[
                                  torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (x, hx, w_ih, w_hh, b_ih, b_hh): PyTorch's own backward of its kernel, after
    recomputing the forward (the op saves only its inputs). By torch.func.vjp, as a custom op's body
    runs below autograd, where torch.autograd.grad would see no graph."""
    _, pullback = torch.func.vjp(lambda *a: _native_stacked(*a, nonlinearity, reverse, batch_first),
                                 x, hx, w_ih, w_hh, b_ih, b_hh)
    return pullback((dy, dh_n))


@_native_layer_backward_op.register_fake
def _(dy, dh_n, x, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse, batch_first):
    return tuple(torch.empty_like(t) for t in (x, hx, w_ih, w_hh, b_ih, b_hh))


def _native_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.options = inputs[6:]


def _native_backward(ctx, dy, dh_n):
    return *torch.ops.elman_triton.native_layer_backward(dy, dh_n, *ctx.saved_tensors, *ctx.options), None, None, None


_native_layer_op.register_autograd(_native_backward, setup_context=_native_setup_context)
# vmap: shared weights fold the models' rows into B (one call); the backward loops over the models,
# as its weight gradients are per model.
_native_layer_op.register_vmap(lambda info, in_dims, *inputs: _vmap_rows(
    torch.ops.elman_triton.native_layer, info, in_dims, inputs, ("seq", "state", "weight", "weight", "weight", "weight"),
    ("seq", "state"), batch_first=inputs[8]))
_native_layer_backward_op.register_vmap(lambda info, in_dims, *inputs: _vmap_loop(
    torch.ops.elman_triton.native_layer_backward, info, in_dims, inputs))


def _combined_bias(biases_ih, biases_hh, dirs, H, x):
    """(dirs, H) b_ih + b_hh in the accumulator dtype, so the 16-bit sum is not rounded twice; None if
    neither. Differentiable: autograd hands each bias its gradient."""
    if biases_ih is None and biases_hh is None:
        return None
    acc = accumulator_dtype(x.dtype)
    total = 0
    for biases in (biases_ih, biases_hh):
        if biases is not None:
            total = total + _stack(biases).to(acc)
    return total


def _check_inputs(x, h0, weights_ih, weights_hh, biases_ih, biases_hh, nonlinearity, backend, batch_first):
    """Shapes, dtypes and devices of a layer's inputs; returns (T, B)."""
    if nonlinearity not in ACTIVATIONS:
        raise ValueError(f"unknown nonlinearity {nonlinearity!r}; expected one of {tuple(ACTIVATIONS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def shapes(T, B, D, dirs):
        w = weights_hh[0]
        if w.dim() != 2 or w.shape[0] != w.shape[1]:
            raise ValueError(f"weight_hh must be (H, H), got shape {tuple(w.shape)}")
        H = w.shape[0]
        named = {}
        for d in range(dirs):
            suffix = "" if dirs == 1 else f" (direction {d})"
            if tuple(weights_ih[d].shape) != (H, D):
                raise ValueError(f"weight_ih{suffix} must be (H, D) = ({H}, {D}), got shape "
                                 f"{tuple(weights_ih[d].shape)}")
            if tuple(weights_hh[d].shape) != (H, H):
                raise ValueError(f"weight_hh{suffix} must be (H, H) = ({H}, {H}), got shape "
                                 f"{tuple(weights_hh[d].shape)}")
            named.update({"weight_ih" + suffix: weights_ih[d], "weight_hh" + suffix: weights_hh[d]})
            for name, biases in (("bias_ih", biases_ih), ("bias_hh", biases_hh)):
                if biases is not None:
                    if tuple(biases[d].shape) != (H,):
                        raise ValueError(f"{name}{suffix} must have shape {(H,)}, got {tuple(biases[d].shape)}")
                    named[name + suffix] = biases[d]
        if h0 is not None:
            if tuple(h0.shape) != (dirs, B, H):
                raise ValueError(f"h0 must have shape {(B, H) if dirs == 1 else (dirs, B, H)}, "
                                 f"got {tuple(h0.shape[1:] if dirs == 1 and h0.dim() == 3 else h0.shape)}")
            named["h0"] = h0
        return named
    return check_layer_inputs(x, weights_ih, weights_hh, batch_first, shapes)


def check_layer_inputs(x, weights_ih, weights_hh, batch_first, shapes):
    """The checks every layer op (Elman, LSTM, GRU) shares: x is 3-D ((T, B, D), or (B, T, D) with
    batch_first) with T ≥ 1, one or two directions' weights, and every tensor that shapes(T, B, D, dirs)
    checks and returns ({name: tensor}) shares x's dtype and device. Returns (T, B)."""
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D ({'B, T' if batch_first else 'T, B'}, D), got shape {tuple(x.shape)}")
    T, B, D = (x.shape[1], x.shape[0], x.shape[2]) if batch_first else x.shape
    if T == 0:
        raise ValueError(f"x must have T ≥ 1, got shape {tuple(x.shape)}")
    dirs = len(weights_hh)
    if dirs not in (1, 2) or len(weights_ih) != dirs:
        raise ValueError(f"expected one or two directions' weights, got {len(weights_ih)} weight_ih and {dirs} weight_hh")
    named = {"x": x, **shapes(T, B, D, dirs)}
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; all tensors must share one dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share one device")
    return T, B
