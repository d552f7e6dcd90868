"""lstm / gru / lstm_layer / gru_layer: the LSTM and GRU ops, beside elman_rnn / elman_rnn_layer, with the
same options (backend, reverse, both directions in one launch, lengths in the kernels, batch_first
through strides) and PyTorch's maths and gate order (elman_triton.reference, kernels/cells.py).

The Triton path is the Elman op's with G gates (G = 3 GRU, 4 LSTM; the kernels' CELL constexpr):

    forward:  xp = x W_ihᵀ, one GEMM over all T·B rows, all gates and both directions, into a gate buffer
              of dirs·G·Hp columns (each gate's block padded to Hp = H rounded up to 16); then one fused
              launch per step (kernels/stepwise.py), or one for the whole sequence (persistent: the
              small-H or the large-H kernel, kernels/persistent_small.py / persistent_large.py), writes y, the activated gates and aux (LSTM's c_t, GRU's
              ĥ_t = h W_hnᵀ + b_hn) for the backward.
    backward: the reverse loop, the same way, writes dz (the gradients of every gate's pre-activation);
              dW_hh, db, and (through the GEMM's autograd) dx and dW_ih are GEMMs and sums after it.

Saved for the backward, per step and unit: h_t (y, the output), the G activated gates (storage dtype)
and aux (fp32; fp64 for fp64). That is (G + 1) storage values and one fp32 per unit and step; the
alternative, recomputing the gates, would repeat the h W_hhᵀ GEMM of every step in the backward.
LSTM's c is carried between steps in that fp32 aux sequence (never rounded to 16 bits), GRU's h in y.

Backends: "stepwise" (Triton); "persistent" (Triton: the small-H kernel within
persistent.CELL_SMALL_H_MAX, e.g. 128 in 16-bit, beyond it the large-H kernel within CELL_LARGE_H_MAX
where x's device holds its programs, else ValueError; persistent.cell_supports); "reference" (the
PyTorch loop); "auto": on CUDA persistent where it holds the layer, else stepwise, on CPU PyTorch's own torch.lstm / torch.gru (the loop where those cannot serve: a
reverse-only layer with lengths, state_grad_norms, torch.func transforms and forward-mode AD).
LSTM with proj_size (weights_hr) runs the reference loop on the Triton backends: a slower path that
gives the same values and gradients.

Double backward, as the Elman op's (elman_triton.ops): the first backward always runs on the kernels; their
reverse loop is itself a function (_CellRecurrenceBackward) whose derivatives are those of a differentiable
PyTorch loop over the saved tensors (_differentiable_backward), recomputed only when a second derivative
is asked for. The saved gates and aux are differentiable outputs of the forward for that: a double
backward reaches them through the loop, and the forward's backward then runs the loop too, which takes
their cotangents (the first-order backward never sees any). Eval mode changes nothing here (no dropout
inside a layer).

state_grad_norms (run_cell_layer): ‖∂L/∂h_t‖ (and the LSTM's ‖∂L/∂c_t‖) per step, row and direction, from
the gradients the backward computes anyway (elman_triton.state_gradients.cell_state_gradient_norms).

torch.func and forward-mode AD: _CellRecurrence has the functorch form (setup_context), as ops._Recurrence:
vmap folds a vmapped dimension of the per-row inputs into B with shared weights (ops._vmap_rows), runs
one model after the other with vmapped weights; jvp is the tangent recurrence as a PyTorch loop over the
saved tensors (_tangent_loop). auto on CPU runs the reference loop under these transforms (torch.gru has
no vmap rule, pytorch #134606). Under torch.compile the recurrence is the custom ops
elman_triton::cell_recurrence / cell_recurrence_backward, and torch.func there runs the layer eagerly.
"""
import torch
import torch.nn.functional as F

from elman_triton import persistent, stepwise
from elman_triton.config import INTERPRETED, SUPPORTED_DTYPES, Layout, accumulator_dtype, kernel_options, padded
from elman_triton.ops import (BACKENDS, TRITON_BACKENDS, _padded_rows, _recurrent_weight_grad, _reversed,
                              _shape_layout, _stack, _time_major, _transformed, _vmap_rows, check_layer_inputs,
                              check_lengths, native_layer, native_params)
from elman_triton.state_gradients import cell_state_gradient_norms, check_norms_buffer
from elman_triton.reference import gru_reference, lstm_reference

GATES = {"gru": 3, "lstm": 4}


def lstm(x, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_hr=None, *, backend="auto", reverse=False,
         lengths=None, batch_first=False, state_grad_norms=None):
    """One LSTM layer, one direction (torch.nn.LSTM's maths, gates i, f, g, o).

    x: (T, B, D), or (B, T, D) with batch_first. hx: None (zeros) or (h0, c0), h0 (B, P), c0 (B, H).
    weight_ih (4H, D), weight_hh (4H, P), bias_ih / bias_hh (4H,) or None, weight_hr (P, H) or None
    (proj_size P; without it P = H), as nn.LSTM lays them out. Returns y (T, B, P) ((B, T, P) with
    batch_first) and (h_n (B, P), c_n (B, H)). backend, reverse and lengths as elman_rnn.
    state_grad_norms: None, or a zeroed float32 (2, T, B) tensor that the backward fills with ‖∂L/∂h_t[b]‖₂
    and ‖∂L/∂c_t[b]‖₂ (see run_cell_layer).
    """
    h0, c0 = (None, None) if hx is None else hx
    y, (h_n, c_n) = lstm_layer(x, None if hx is None else (_unsqueeze(h0), _unsqueeze(c0)), (weight_ih,), (weight_hh,),
                               _one(bias_ih), _one(bias_hh), _one(weight_hr), backend=backend, reverse=reverse,
                               lengths=lengths, batch_first=batch_first,
                               state_grad_norms=None if state_grad_norms is None else state_grad_norms.unsqueeze(1))
    return y, (h_n[0], c_n[0])


def gru(x, h0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *, backend="auto", reverse=False, lengths=None,
        batch_first=False, state_grad_norms=None):
    """One GRU layer, one direction (torch.nn.GRU's maths, gates r, z, n). weight_ih (3H, D), weight_hh
    (3H, H), biases (3H,) or None; h0 (B, H) or None. Returns y and h_n (B, H); the rest as lstm
    (state_grad_norms: (T, B), ‖∂L/∂h_t[b]‖₂)."""
    y, h_n = gru_layer(x, _unsqueeze(h0), (weight_ih,), (weight_hh,), _one(bias_ih), _one(bias_hh), backend=backend,
                       reverse=reverse, lengths=lengths, batch_first=batch_first,
                       state_grad_norms=_unsqueeze(state_grad_norms))
    return y, h_n[0]


def lstm_layer(x, hx, weights_ih, weights_hh, biases_ih=None, biases_hh=None, weights_hr=None, *, backend="auto",
               reverse=False, lengths=None, batch_first=False, state_grad_norms=None):
    """One LSTM layer with one or two directions, run together (one launch per step and pass).
    weights_* / biases_*: one tensor per direction in nn.LSTM's layout (biases_* and weights_hr may be
    None); with two, direction 0 runs forward and direction 1 in reverse. hx: None or (h0, c0), each
    (dirs, B, ·) or None. Returns y (T, B, dirs·P) and (h_n, c_n), (dirs, B, P) and (dirs, B, H).
    state_grad_norms: None or float32 (2, dirs, T, B) (see run_cell_layer)."""
    h0, c0 = (None, None) if hx is None else hx
    return run_cell_layer("lstm", x, h0, c0, weights_ih, weights_hh, biases_ih, biases_hh, weights_hr, backend=backend,
                          reverse=reverse, lengths=lengths, batch_first=batch_first, state_grad_norms=state_grad_norms)


def gru_layer(x, h0, weights_ih, weights_hh, biases_ih=None, biases_hh=None, *, backend="auto", reverse=False,
              lengths=None, batch_first=False, state_grad_norms=None):
    """One GRU layer with one or two directions (see lstm_layer). h0: (dirs, B, H) or None. Returns y
    (T, B, dirs·H) and h_n (dirs, B, H). state_grad_norms: None or float32 (dirs, T, B) (see run_cell_layer)."""
    y, (h_n, _) = run_cell_layer("gru", x, h0, None, weights_ih, weights_hh, biases_ih, biases_hh, None,
                                 backend=backend, reverse=reverse, lengths=lengths, batch_first=batch_first,
                                 state_grad_norms=state_grad_norms)
    return y, h_n


def run_cell_layer(cell, x, h0, c0, weights_ih, weights_hh, biases_ih=None, biases_hh=None, weights_hr=None, *,
                   backend="auto", reverse=False, lengths=None, batch_first=False, state_grad_norms=None,
                   lengths_are_valid=False):
    """lstm_layer / gru_layer for every caller: returns y and (h_n, c_n) (c_n None for GRU). Callers that
    built lengths themselves (from a PackedSequence) pass lengths_are_valid=True: not read back.

    state_grad_norms: None, or a zeroed float32 tensor on x's device that the backward fills (once, from
    the gradients it computes anyway; elman_triton.state_gradients): GRU (dirs, T, B) ‖∂L/∂h_t[b]‖₂; LSTM
    (2, dirs, T, B), [0] ‖∂L/∂h_t[b]‖₂ (h the projected state with proj_size) and [1] ‖∂L/∂c_t[b]‖₂,
    the total derivatives (every path), t in input order; padding steps (t ≥ lengths[b]) stay 0. With
    backend="auto" on CPU it runs the reference loop instead of PyTorch's native kernel."""
    if torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is not None:
        # torch.func under torch.compile: the layer runs eagerly (a graph break), as ops.run_layer's
        return _run_cell_layer_eagerly(cell, x, h0, c0, weights_ih, weights_hh, biases_ih, biases_hh, weights_hr,
                                       backend=backend, reverse=reverse, lengths=lengths, batch_first=batch_first,
                                       state_grad_norms=state_grad_norms, lengths_are_valid=lengths_are_valid)
    G = GATES[cell]
    T, B, H = _check_inputs(cell, x, h0, c0, weights_ih, weights_hh, biases_ih, biases_hh, weights_hr, backend,
                            batch_first)
    if lengths is not None:
        check_lengths(lengths, T, B, x.device, values=not lengths_are_valid)
    dirs = len(weights_hh)
    if state_grad_norms is not None:
        check_norms_buffer(state_grad_norms, (2, dirs, T, B) if G == 4 else (dirs, T, B), x.device,
                           "(2, dirs, T, B)" if G == 4 else "(dirs, T, B)", f" for the {cell.upper()}")
    if backend == "persistent" and B > 0 and weights_hr is None:  # proj_size: the reference loop
        persistent.cell_check_supported(G, H, x.dtype, x.device)
    if B == 0:  # an empty batch, which nn.LSTM / nn.GRU accept: empty outputs, zero weight gradients
        backend = "reference"
    if backend == "auto":
        backend = auto_backend(cell, H, x.dtype, x.device, has_lengths=lengths is not None, reverse=reverse,
                               recording=state_grad_norms is not None)
    if backend in TRITON_BACKENDS and weights_hr is not None:
        backend = "reference"  # proj_size: the documented slower path
    if backend == "reference":
        return _reference_layer(cell, x, h0, c0, weights_ih, weights_hh, biases_ih, biases_hh, weights_hr, reverse,
                                lengths, batch_first, state_grad_norms)
    if backend == "native":
        return _torch_native(cell, x, h0, c0, weights_ih, weights_hh, biases_ih, biases_hh, weights_hr, reverse,
                             lengths, batch_first)
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(f"backend={backend!r} runs Triton kernels, which need CUDA tensors; on CPU set "
                           "TRITON_INTERPRET=1 before importing elman_triton, or use backend='auto'")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend={backend!r} supports {SUPPORTED_DTYPES}, got {x.dtype}")

    # Plain, differentiable torch around the recurrence: each gate's block of W_ih padded to Hp rows, one
    # GEMM for every step, gate and direction; W_hh's rows padded to Hp columns; the bias slots.
    Hp = padded(H)
    w_ih = _stack(weights_ih).unflatten(1, (G, H))
    if Hp != H:
        w_ih = F.pad(w_ih, (0, 0, 0, Hp - H))
    xp = torch.matmul(x, w_ih.reshape(dirs * G * Hp, -1).T)  # (T, B, dirs·G·Hp) or (B, T, ·)
    w_hh = _padded_rows(_stack(weights_hh), Hp)
    bias = _bias_slots(cell, biases_ih, biases_hh, dirs, H, x)
    h0 = x.new_zeros(dirs, B, H) if h0 is None else h0
    c0 = (x.new_zeros(dirs, B, H) if c0 is None else c0) if G == 4 else h0
    args = (xp, h0, c0, w_hh, bias, lengths, state_grad_norms, G, reverse, batch_first, backend)
    if torch.compiler.is_compiling():
        y, h_n, c_n, _, _ = torch.ops.elman_triton.cell_recurrence(*args)
    else:
        y, h_n, c_n, _, _ = _CellRecurrence.apply(*args)
    if Hp != H:  # drop the padding columns: nn's contiguous (·, ·, dirs·H) output, one copy
        y = y.unflatten(2, (dirs, Hp))[..., :H].contiguous().flatten(2)
    return y, (h_n, c_n if G == 4 else None)


_run_cell_layer_eagerly = torch.compiler.disable(run_cell_layer)


def auto_backend(cell, H, dtype, device, *, has_lengths=False, reverse=False, recording=False):
    """The backend that backend="auto" runs for one layer of cell ("lstm" or "gru") with this H, dtype and
    device, in the current context (run_cell_layer asks it on every call; the benchmarks, to say what auto
    ran). On CUDA "persistent" where persistent.cell_supports holds the cell (its small- or large-H kernel,
    with the grid co-resident on device), else "stepwise". On CPU "native", PyTorch's own torch.lstm /
    torch.gru, except where it cannot serve: a reverse-only layer with lengths (has_lengths, reverse: it
    has none), torch.export (which would unroll it over T; the reference loop exports as a scan),
    recording state-gradient norms (it exposes no per-step gradient), torch.func transforms and
    forward-mode AD (torch.gru has no vmap rule, pytorch #134606): "reference", the loop, there."""
    device = torch.device(device)
    if device.type == "cuda":
        return "persistent" if persistent.cell_supports(GATES[cell], H, dtype, device) else "stepwise"
    compiling = torch.compiler.is_compiling()
    native = not (has_lengths and (reverse or compiling)) and not recording and not torch.compiler.is_exporting()
    return "native" if native and (compiling or not _transformed()) else "reference"


def _bias_slots(cell, biases_ih, biases_hh, dirs, H, x):
    """(dirs, S, H) in the accumulator dtype, the kernels' bias: per gate b_ih + b_hh, except GRU's n gate,
    whose hidden side (b_hn, scaled by r) and input side (b_in) get a slot each (slots r, z, b_hn, b_in).
    None if there is no bias. Differentiable: autograd hands b_ih and b_hh their gradients."""
    if biases_ih is None and biases_hh is None:
        return None
    G, acc = GATES[cell], accumulator_dtype(x.dtype)
    b_ih, b_hh = (_stack(b).to(acc).unflatten(1, (G, H)) if b is not None else x.new_zeros(dirs, G, H, dtype=acc)
                  for b in (biases_ih, biases_hh))
    if G == 4:
        return b_ih + b_hh
    return torch.cat([b_ih[:, :2] + b_hh[:, :2], b_hh[:, 2:], b_ih[:, 2:]], dim=1)


# The launchers run eagerly even when reached from code torch.compile is running (after a graph break, as
# under torch.func): Dynamo must not trace into a launch (ops._forward's reason).
@torch.compiler.disable
def _cell_forward(xp, h0, c0, w_hh, bias, lengths, G, reverse, batch_first, backend):
    """Run the recurrence on backend ("stepwise" or "persistent"): (y, h_n, c_n, gates, aux), y in the
    padded sequence layout; gates and aux are what the backward reads (see the module docstring). GRU's
    c_n is an empty (dirs, B, 0) placeholder."""
    dirs, _, Hp = w_hh.shape
    H = w_hh.shape[1] // G
    T, B = (xp.shape[1], xp.shape[0]) if batch_first else xp.shape[:2]
    y = xp.new_empty((B, T, dirs * Hp) if batch_first else (T, B, dirs * Hp))
    gates = torch.empty_like(xp)
    aux = torch.empty_like(y, dtype=accumulator_dtype(xp.dtype))
    h_n = xp.new_empty(dirs, B, H)
    c_n = xp.new_empty(dirs, B, H if G == 4 else 0)
    h0p, c0p = _padded_states(h0, c0, Hp)
    TRITON_BACKENDS[backend].cell_forward_recurrence(G, xp, y, gates, aux, h0p, c0p, w_hh, bias, h_n, c_n, lengths,
                                                     kernel_options(xp.dtype, "tanh"),
                                                     Layout.of(y, H, dirs, batch_first, reverse))
    return y, h_n, c_n, gates, aux


@torch.compiler.disable
def _cell_backward(dy, dh_n, dc_n, y, h0, c0, w_hh, gates, aux, lengths, G, reverse, batch_first, backend):
    """The reverse loop: (dz, dh0, dc0), dz with S = gate_slots(G) slots per direction (GRU's dc0 an empty
    (dirs, B, 0) placeholder)."""
    dirs, _, Hp = w_hh.shape
    lay = Layout.of(y, w_hh.shape[1] // G, dirs, batch_first, reverse)
    S = stepwise.gate_slots(G)
    dz = y.new_empty((lay.B, lay.T, dirs * S * Hp) if batch_first else (lay.T, lay.B, dirs * S * Hp))
    h0p, c0p = _padded_states(h0, c0, Hp)
    dh0, dc0 = TRITON_BACKENDS[backend].cell_backward_recurrence(G, dy, dh_n, dc_n if G == 4 else None, y, h0p, gates,
                                                                 aux, c0p, w_hh, dz, lengths,
                                                                 kernel_options(y.dtype, "tanh"), lay)
    return dz, dh0.contiguous(), dc0.contiguous() if G == 4 else dh0.new_empty(*dh0.shape[:2], 0)


def _padded_states(h0, c0, Hp):
    """h0 and c0 (dirs, B, H) as the kernels read them: rows padded to Hp, one set of strides, c0 in the
    accumulator dtype (the kernels read a row's c from c0 or from the fp32 aux sequence alike)."""
    return _padded_rows(h0.contiguous(), Hp), _padded_rows(c0.to(accumulator_dtype(c0.dtype)).contiguous(), Hp)


def _save(ctx, inputs, outputs):
    xp, h0, c0, w_hh, bias, lengths, norms, G, reverse, batch_first, backend = inputs
    y, _, _, gates, aux = outputs
    ctx.save_for_backward(h0, c0, w_hh, y, gates, aux, lengths)
    ctx.save_for_forward(h0, c0, w_hh, y, gates, aux, lengths)  # the tangent (jvp) reads the same
    ctx.G, ctx.reverse, ctx.batch_first, ctx.has_bias = G, reverse, batch_first, bias is not None
    ctx.norms, ctx.backend = norms, backend  # norms: an output buffer the backward writes


def _saved_layout(ctx):
    """The saved tensors and the Layout of the sequence buffers from their shapes alone (the code around
    the kernels may see torch.func's batched tensors, whose strides are not the kernels' business)."""
    saved = ctx.saved_tensors
    w_hh, y = saved[2], saved[3]
    return saved, _shape_layout(y, w_hh.shape[1] // ctx.G, w_hh.shape[0], ctx.batch_first, ctx.reverse)


def _gradients(ctx, dy, dh_n, dc_n, dgates, daux, backward):
    """Gradients of (xp, h0, c0, w_hh, bias): the reverse loop (backward: _CellRecurrenceBackward.apply, or
    its custom op under torch.compile) writes dz; dxp is dz's input-side slots, dW_hh = Σ_t dz_tᵀ h_{t∓1}
    per gate and db = Σ_t dz_t per slot are GEMMs and sums in plain torch (so torch.compile and
    torch.func see them). dgates / daux, cotangents of the saved gates and aux, come only from a double
    backward (the saved tensors' use in _differentiable_backward): then the reverse loop is that
    PyTorch loop, which takes them."""
    (h0, c0, w_hh, y, gates, aux, lengths), lay = _saved_layout(ctx)
    G, dirs, Hp, H = ctx.G, lay.dirs, lay.Hp, lay.H
    S = stepwise.gate_slots(G)
    dy = torch.zeros_like(y) if dy is None else dy
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
    dc_n = torch.zeros_like(h0) if dc_n is None or G != 4 else dc_n
    if dgates is None and daux is None:
        dz, dh0, dc0 = backward(dy, dh_n, dc_n, y, h0, c0, w_hh, gates, aux, lengths, G, ctx.reverse,
                                ctx.batch_first, ctx.backend)
        if ctx.norms is not None:
            _record_norms(ctx.norms, dy, dz, dh_n, dc_n, w_hh, gates, aux, lengths, G, lay)
    else:
        dz, dh0, dc0 = _differentiable_backward(dy, dh_n, dc_n, y, h0, c0, w_hh, gates, aux, lengths, G, lay, dgates,
                                                daux)
    slots = dz.unflatten(2, (dirs, S, Hp))
    # GRU's input side of n is slot 3 (its slot 2 is the hidden side, scaled by r): one gather.
    dxp = dz if S == G else slots[:, :, :, [0, 1, 3]].flatten(2)
    need = ctx.needs_input_grad
    dw_hh = None
    if need[3]:
        per_dir = []
        for d in range(dirs):
            one = Layout(lay.T, lay.B, H, 1, 0, 0, lay.batch_first, _reversed(lay, d))
            y_d = y[..., d * Hp:(d + 1) * Hp]
            per_dir.append(torch.cat([_recurrent_weight_grad(dz[..., (d * S + g) * Hp:(d * S + g + 1) * Hp], y_d, h0[d],
                                                             lengths, one, 0) for g in range(G)]))
        dw_hh = F.pad(torch.stack(per_dir), (0, Hp - H))
    db = slots[..., :H].sum((0, 1), dtype=accumulator_dtype(y.dtype)) if ctx.has_bias and need[4] else None
    dh0 = dh0.to(y.dtype) if need[1] else None
    dc0 = dc0.to(y.dtype) if G == 4 and need[2] else None
    return dxp, dh0, dc0, dw_hh, db, None, None, None, None, None, None


def _record_norms(norms, dy, dz, dh_n, dc_n, w_hh, gates, aux, lengths, G, lay):
    """state_grad_norms: each direction's ‖∂L/∂h_t‖ (and LSTM's ‖∂L/∂c_t‖) from the gradients this
    backward already has (elman_triton.state_gradients)."""
    S, H = stepwise.gate_slots(G), lay.H
    for d in range(lay.dirs):
        def blocks(buf, width, count, d=d):  # (T, B, count, H): `count` of direction d's `width` blocks
            return torch.stack([_time_major(buf, lay, d * width + k) for k in range(count)], dim=2)
        cell_state_gradient_norms(G, _time_major(dy, lay, d), blocks(dz, S, G), dh_n[d], dc_n[d], w_hh[d, :, :H],
                                  blocks(gates, G, G), _time_major(aux, lay, d), _reversed(lay, d),
                                  norms[:, d] if G == 4 else norms[d], lengths)


def _tangents(ctx, dxp, dh0, dc0, dw_hh, dbias):
    """Forward mode (jvp): the tangents of (y, h_n, c_n, gates, aux), by _tangent_loop over the saved tensors."""
    (h0, c0, w_hh, y, gates, aux, lengths), lay = _saved_layout(ctx)
    dy, dh_n, dc_n, dgates, daux = _tangent_loop(dxp, dh0, dc0 if ctx.G == 4 else None, dw_hh, dbias, y, h0, c0, w_hh,
                                                 gates, aux, lengths, ctx.G, lay)
    return dy, dh_n, dc_n if ctx.G == 4 else None, dgates, daux  # GRU's c_n: not differentiable


class _CellRecurrence(torch.autograd.Function):
    """The eager path: (xp, h0, c0, w_hh, bias, lengths, state_grad_norms, G, reverse, batch_first, backend) →
    (y, h_n, c_n, gates, aux), y in the padded sequence layout; gates and aux are saved for the backward,
    not for the caller (differentiable outputs all the same: a double backward differentiates through
    them). backward, jvp and vmap make it compose with torch.autograd, forward_ad and torch.func."""

    @staticmethod
    def forward(*inputs):
        return _cell_forward(*inputs[:6], *inputs[7:])

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs, output)
        ctx.set_materialize_grads(False)  # no cotangent on gates / aux: None, not zeros
        if inputs[7] != 4:
            ctx.mark_non_differentiable(output[2])  # GRU's c_n placeholder

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n, dgates, daux):
        return _gradients(ctx, dy, dh_n, dc_n, dgates, daux, _CellRecurrenceBackward.apply)

    @staticmethod
    def jvp(ctx, dxp, dh0, dc0, dw_hh, dbias, *_):
        return _tangents(ctx, dxp, dh0, dc0, dw_hh, dbias)

    @staticmethod
    def vmap(info, in_dims, *inputs):
        return _vmap_cell(_CellRecurrence.apply, info, in_dims, inputs)


class _CellRecurrenceBackward(torch.autograd.Function):
    """The kernels' reverse loop, (dy, dh_n, dc_n, y, h0, c0, w_hh, gates, aux) → (dz, dh0, dc0), as a
    function that torch.autograd and torch.func can differentiate again (double backward,
    forward-over-reverse): its own derivatives are those of _differentiable_backward, the same maths as
    a PyTorch loop, recomputed from the saved inputs only when asked for."""

    @staticmethod
    def forward(*inputs):
        return _cell_backward(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:10])
        ctx.save_for_forward(*inputs[:10])
        ctx.options = inputs[10:]
        if inputs[10] != 4:
            ctx.mark_non_differentiable(output[2])  # GRU's dc0 placeholder

    @staticmethod
    def backward(ctx, g_dz, g_dh0, g_dc0):
        primals, loop = _loop_backward(ctx)
        outputs, pullback = torch.func.vjp(loop, *primals)
        cotangents = [torch.zeros_like(o) if c is None else c for o, c in zip(outputs, (g_dz, g_dh0, g_dc0))]
        return *pullback(tuple(cotangents)), None, None, None, None, None

    @staticmethod
    def jvp(ctx, *tangents):
        primals, loop = _loop_backward(ctx)
        tangents = [torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents)]
        dz, dh0, dc0 = torch.func.jvp(loop, primals, tuple(tangents))[1]
        return dz, dh0, dc0 if ctx.options[0] == 4 else None  # GRU's dc0: not differentiable

    @staticmethod
    def vmap(info, in_dims, *inputs):
        return _vmap_cell(_CellRecurrenceBackward.apply, info, in_dims, inputs, backward=True)


def _loop_backward(ctx):
    """The saved (dy, dh_n, dc_n, y, h0, c0, w_hh, gates, aux) and _differentiable_backward as a function of them."""
    *primals, lengths = ctx.saved_tensors
    G, reverse, batch_first, _ = ctx.options
    w_hh, y = primals[6], primals[3]
    lay = _shape_layout(y, w_hh.shape[1] // G, w_hh.shape[0], batch_first, reverse)
    return tuple(primals), lambda *p: _differentiable_backward(*p, lengths, G, lay)


def _vmap_cell(apply, info, in_dims, inputs, backward=False):
    """The vmap rule of the recurrence (forward or backward), ops._vmap_rows': a vmapped dimension of the
    per-row inputs with shared weights folds into B (one launch for every model's rows), vmapped
    weights run one model after the other. state_grad_norms has no vmapped form."""
    if backward:  # dy, dh_n, dc_n, y, h0, c0, w_hh, gates, aux, lengths, G, reverse, batch_first, backend
        kinds = ("seq", "state", "state", "seq", "state", "state", "weight", "seq", "seq", "lengths")
        batch_first, outs = inputs[12], ("seq", "state", "state")
    else:  # xp, h0, c0, w_hh, bias, lengths, state_grad_norms, G, reverse, batch_first, backend
        if inputs[6] is not None:
            raise ValueError("state_grad_norms is not supported under torch.func.vmap")
        kinds, batch_first = ("seq", "state", "state", "weight", "weight", "lengths"), inputs[9]
        outs = ("seq", "state", "state", "seq", "seq")
    return _vmap_rows(apply, info, in_dims, inputs, kinds, outs, batch_first)


# The torch.compile path: the same two pieces as custom ops (opaque launches with known output shapes), the
# GEMMs around them traced. A custom op's outputs are all differentiable, and its autograd gets zeros for
# the gates and aux nobody reads: that path takes them as first-order only (AOTAutograd, which compiles
# it, has no double backward; eagerly the layer runs _CellRecurrence). Under torch.func the layer runs
# eagerly (run_cell_layer): a custom op's autograd has no torch.func support (pytorch #168393).
@torch.library.custom_op("elman_triton::cell_recurrence", mutates_args=())
def _cell_recurrence_op(xp: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor,
                        bias: torch.Tensor | None, lengths: torch.Tensor | None, state_grad_norms: torch.Tensor | None,
                        G: int, reverse: bool, batch_first: bool,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cell_forward(xp, h0, c0, w_hh, bias, lengths, G, reverse, batch_first, backend)


@_cell_recurrence_op.register_fake
def _(xp, h0, c0, w_hh, bias, lengths, state_grad_norms, G, reverse, batch_first, backend):
    dirs, _, Hp = w_hh.shape
    T, B = (xp.shape[1], xp.shape[0]) if batch_first else xp.shape[:2]
    y = xp.new_empty((B, T, dirs * Hp) if batch_first else (T, B, dirs * Hp))
    return (y, xp.new_empty(h0.shape), xp.new_empty(h0.shape if G == 4 else (*h0.shape[:2], 0)),
            torch.empty_like(xp), torch.empty_like(y, dtype=accumulator_dtype(xp.dtype)))


@torch.library.custom_op("elman_triton::cell_recurrence_backward", mutates_args=())
def _cell_backward_op(dy: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor, y: torch.Tensor, h0: torch.Tensor,
                      c0: torch.Tensor, w_hh: torch.Tensor, gates: torch.Tensor, aux: torch.Tensor,
                      lengths: torch.Tensor | None, G: int, reverse: bool, batch_first: bool,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cell_backward(dy, dh_n, dc_n, y, h0, c0, w_hh, gates, aux, lengths, G, reverse, batch_first, backend)


@_cell_backward_op.register_fake
def _(dy, dh_n, dc_n, y, h0, c0, w_hh, gates, aux, lengths, G, reverse, batch_first, backend):
    S, dirs, Hp = stepwise.gate_slots(G), w_hh.shape[0], w_hh.shape[2]
    dz = y.new_empty((*y.shape[:2], dirs * S * Hp))
    acc = accumulator_dtype(y.dtype)
    return dz, h0.new_empty(h0.shape, dtype=acc), h0.new_empty(h0.shape if G == 4 else (*h0.shape[:2], 0), dtype=acc)


def _op_setup_context(ctx, inputs, output):
    _save(ctx, inputs, output)


def _op_backward(ctx, dy, dh_n, dc_n, _gates, _aux):
    return _gradients(ctx, dy, dh_n, dc_n, None, None, torch.ops.elman_triton.cell_recurrence_backward)


_cell_recurrence_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ------------------------------------------------------------------- the recurrence as PyTorch loops

def _differentiable_backward(dy, dh_n, dc_n, y, h0, c0, w_hh, gates, aux, lengths, G, lay, dgates=None, daux=None):
    """(dz, dh0, dc0) as the kernels' reverse loop computes them (kernels/cells.py, cell_backward), by a
    PyTorch loop over the saved tensors that autograd can differentiate: the derivatives of
    _CellRecurrenceBackward (double backward). dgates, daux: None, or cotangents of the saved gates and
    aux (a double backward's, which reach them through this loop): the gradient a gate's activation or
    aux receives besides the recurrence's, added where the kernels' maths meets it (σ' = a(1 − a),
    tanh' = 1 − a², from the saved activations; LSTM's aux is c_t, GRU's ĥ_t the hidden side of n).
    Padding steps pass the carries through and give dz = 0. Cost: T small ops per direction, only in a
    double backward."""
    acc = accumulator_dtype(y.dtype)
    H, S = lay.H, stepwise.gate_slots(G)
    active = _active(lengths, lay, y.device)
    blocks, dh0, dc0 = [], [], []
    for d in range(lay.dirs):
        def seq(buf, width=1, k=0, d=d):  # direction d's (T, B, H) block k of `width` (None: zeros)
            return None if buf is None else _time_major(buf, lay, d * width + k)
        order = list(reversed(range(lay.T))) if _reversed(lay, d) else list(range(lay.T))
        y_d, aux_d, dy_d, daux_d = seq(y), seq(aux), seq(dy), seq(daux)
        gates_d = [seq(gates, G, k) for k in range(G)]
        extra_d = [seq(dgates, G, k) for k in range(G)]
        w = w_hh[d, :, :H].to(acc)  # (G·H, H)
        h_prev, c_prev = _previous_states(y_d, aux_d if G == 4 else None, h0[d], c0[d], order, active, acc)
        g, gc = dh_n[d].to(acc), dc_n[d].to(acc)
        dz_d = [None] * lay.T
        for t in reversed(order):
            a = [gate[t].to(acc) for gate in gates_d]

            def extra(k, t=t):  # the double backward's cotangent of gate k's activation
                return 0.0 if extra_d[k] is None else extra_d[k][t].to(acc)
            extra_aux = 0.0 if daux_d is None else daux_d[t].to(acc)
            dh = dy_d[t].to(acc) + g
            if G == 4:
                i, f, gg, o = a
                tc = torch.tanh(aux_d[t].to(acc))
                dc = gc + dh * o * (1 - tc * tc) + extra_aux
                slots = [(dc * gg + extra(0)) * i * (1 - i), (dc * c_prev[t] + extra(1)) * f * (1 - f),
                         (dc * i + extra(2)) * (1 - gg * gg), (dh * tc + extra(3)) * o * (1 - o)]
                dh_prev, dc_prev = torch.cat(slots, dim=1) @ w, dc * f
            else:
                r, z, n = a
                dx_n = (dh * (1 - z) + extra(2)) * (1 - n * n)
                slots = [(dx_n * aux_d[t].to(acc) + extra(0)) * r * (1 - r),
                         (dh * (h_prev[t] - n) + extra(1)) * z * (1 - z), dx_n * r + extra_aux, dx_n]
                dh_prev, dc_prev = torch.cat(slots[:3], dim=1) @ w + dh * z, gc
            g, gc = torch.where(active[t], dh_prev, g), torch.where(active[t], dc_prev, gc)
            dz_d[t] = [torch.where(active[t], s, 0.0) for s in slots]
        blocks += [torch.stack([dz_d[t][k] for t in range(lay.T)]) for k in range(S)]
        dh0.append(g)
        dc0.append(gc if G == 4 else g[..., :0])
    return _sequence(blocks, lay, y.dtype), torch.stack(dh0), torch.stack(dc0)


def _tangent_loop(dxp, dh0, dc0, dw_hh, dbias, y, h0, c0, w_hh, gates, aux, lengths, G, lay):
    """Forward mode (jvp): the tangents of (y, h_n, c_n, gates, aux) by a PyTorch loop over the saved
    tensors. The tangent of the recurrence is a linear recurrence through the saved activations:
        ȧ_g = ẋp_g + ḃ_g + ḣ_{t∓1} W_hh,gᵀ + h_{t∓1} Ẇ_hh,gᵀ   per gate (GRU's n: hidden side ĥ̇ and input side apart),
        LSTM  ċ = ḟ c_{t∓1} + f ċ_{t∓1} + i̇ g + i ġ,   ḣ = ȯ tanh c + o (1 − tanh² c) ċ
        GRU   ṅ = (1 − n²)(ẋ_n + ṙ ĥ + r ĥ̇),   ḣ = (1 − z) ṅ − ż n + ż h_{t∓1} + z ḣ_{t∓1}
    with each activation's derivative from its saved value; padding steps pass the tangents through and
    give zeros. Any tangent may be None (zero). Cost: T small ops per direction; it is differentiable, so
    higher orders compose."""
    acc = accumulator_dtype(y.dtype)
    H, S = lay.H, stepwise.gate_slots(G)
    active = _active(lengths, lay, y.device)
    zero = y.new_zeros((), dtype=acc)
    dys, gate_blocks, aux_blocks, dh_n, dc_n = [], [], [], [], []
    for d in range(lay.dirs):
        def seq(buf, width=1, k=0, d=d):
            return None if buf is None else _time_major(buf, lay, d * width + k)
        order = list(reversed(range(lay.T))) if _reversed(lay, d) else list(range(lay.T))
        y_d, aux_d = seq(y), seq(aux)
        gates_d = [seq(gates, G, k) for k in range(G)]
        dxp_d = [seq(dxp, G, k) for k in range(G)]
        w = w_hh[d, :, :H].to(acc)
        dw = None if dw_hh is None else dw_hh[d, :, :H].to(acc)
        db = [zero] * S if dbias is None else [dbias[d, k].to(acc) for k in range(S)]
        h, c = h0[d].to(acc), c0[d].to(acc)
        dh = zero.expand_as(h) if dh0 is None else dh0[d].to(acc)
        dc = zero.expand_as(h) if dc0 is None else dc0[d].to(acc)
        dy_d, dgates_d, daux_d = [None] * lay.T, [None] * lay.T, [None] * lay.T
        for t in order:
            a = [gate[t].to(acc) for gate in gates_d]
            hidden = dh @ w.T if dw is None else dh @ w.T + h @ dw.T  # (B, G·H): the h side of every gate
            da = [hidden[:, k * H:(k + 1) * H] + db[k] + (0.0 if dxp_d[k] is None else dxp_d[k][t].to(acc))
                  for k in range(G)]
            c_t = aux_d[t].to(acc)
            if G == 4:
                i, f, gg, o = a
                dgs = [da[0] * i * (1 - i), da[1] * f * (1 - f), da[2] * (1 - gg * gg), da[3] * o * (1 - o)]
                tc = torch.tanh(c_t)
                dc_t = dgs[1] * c + f * dc + dgs[0] * gg + i * dgs[2]
                dh_t = dgs[3] * tc + o * (1 - tc * tc) * dc_t
                daux_t = dc_t
            else:
                r, z, n = a
                dhat = hidden[:, 2 * H:] + db[2]  # ĥ̇ (da[2] is the input side: ẋ_n + ḃ_in, below)
                dx_n = (0.0 if dxp_d[2] is None else dxp_d[2][t].to(acc)) + db[3]
                dr, dz = da[0] * r * (1 - r), da[1] * z * (1 - z)
                dn = (1 - n * n) * (dx_n + dr * c_t + r * dhat)
                dgs = [dr, dz, dn]
                dh_t = (1 - z) * dn - dz * n + dz * h + z * dh
                daux_t = dhat
            keep = active[t]
            dy_d[t] = torch.where(keep, dh_t, 0.0)
            dgates_d[t] = [torch.where(keep, x, 0.0) for x in dgs]
            daux_d[t] = torch.where(keep, daux_t, 0.0)
            dh, h = torch.where(keep, dh_t, dh), torch.where(keep, y_d[t].to(acc), h)
            if G == 4:
                dc, c = torch.where(keep, dc_t, dc), torch.where(keep, c_t, c)
        dys.append(torch.stack(dy_d))
        gate_blocks += [torch.stack([dgates_d[t][k] for t in range(lay.T)]) for k in range(G)]
        aux_blocks.append(torch.stack(daux_d))
        dh_n.append(dh)
        dc_n.append(dc if G == 4 else dh[..., :0])
    return (_sequence(dys, lay, y.dtype), torch.stack(dh_n).to(y.dtype), torch.stack(dc_n).to(y.dtype),
            _sequence(gate_blocks, lay, gates.dtype), _sequence(aux_blocks, lay, aux.dtype))


def _active(lengths, lay, device):
    """(T, B, 1): whether step t of row b is one of its own (not padding)."""
    return (torch.arange(lay.T, device=device).unsqueeze(1) < (lay.T if lengths is None else lengths)).unsqueeze(2)


def _previous_states(y_d, aux_d, h0, c0, order, active, acc):
    """The state each step read, per step t: (h_{t∓1}, c_{t∓1}), h0 / c0 at a row's first step (c: LSTM only)."""
    h, c = h0.to(acc), c0.to(acc)
    h_prev, c_prev = [None] * len(order), [None] * len(order)
    for t in order:
        h_prev[t], c_prev[t] = h, c
        h = torch.where(active[t], y_d[t].to(acc), h)
        if aux_d is not None:
            c = torch.where(active[t], aux_d[t].to(acc), c)
    return h_prev, c_prev


def _sequence(blocks, lay, dtype):
    """A sequence buffer from its (T, B, H) blocks in column order (each padded to Hp), in lay's layout."""
    buf = torch.cat([F.pad(b, (0, lay.Hp - lay.H)) for b in blocks], dim=2).to(dtype)
    return buf.transpose(0, 1) if lay.batch_first else buf


# ------------------------------------------------------------------------------- non-Triton backends

def _reference_layer(cell, x, h0, c0, weights_ih, weights_hh, biases_ih, biases_hh, weights_hr, reverse, lengths,
                     batch_first, norms=None):
    """The plain PyTorch loop, one direction after the other; norms (state_grad_norms) through hooks on
    each step's state."""
    x = x.transpose(0, 1) if batch_first else x
    ys, h_n, c_n = [], [], []
    for d in range(len(weights_hh)):
        pick = (lambda s: None if s is None else s[d])  # noqa: E731
        common = dict(reverse=(d == 1) != reverse, lengths=lengths,
                      state_grad_norms=None if norms is None else norms[0, d] if cell == "lstm" else norms[d])
        if cell == "lstm":
            y, h, c = lstm_reference(x, pick(h0), pick(c0), weights_ih[d], weights_hh[d], pick(biases_ih),
                                     pick(biases_hh), pick(weights_hr), cell_grad_norms=None if norms is None
                                     else norms[1, d], **common)
            c_n.append(c)
        else:
            y, h = gru_reference(x, pick(h0), weights_ih[d], weights_hh[d], pick(biases_ih), pick(biases_hh), **common)
        ys.append(y)
        h_n.append(h)
    y = torch.cat(ys, dim=2) if len(ys) > 1 else ys[0]
    y = y.transpose(0, 1).contiguous() if batch_first else y  # nn's contiguous y
    return y, (torch.stack(h_n), torch.stack(c_n) if c_n else None)


def _torch_native(cell, x, h0, c0, weights_ih, weights_hh, biases_ih, biases_hh, weights_hr, reverse, lengths,
                  batch_first):
    """PyTorch's own torch.lstm / torch.gru (what nn.LSTM / nn.GRU run): the fast path for CPU tensors
    (ops.native_layer, as the Elman op's)."""
    dirs = len(weights_hh)
    H, P = weights_hh[0].shape[0] // GATES[cell], weights_hh[0].shape[1]  # P: the state's width (proj_size)
    B = x.shape[0] if batch_first else x.shape[1]
    params, has_bias = native_params(weights_ih, weights_hh, biases_ih, biases_hh, weights_hr)
    h0 = x.new_zeros(dirs, B, P) if h0 is None else h0
    if cell == "lstm":
        hx, run = (h0, x.new_zeros(dirs, B, H) if c0 is None else c0), torch.lstm
    else:
        hx, run = h0, torch.gru
    y, state = native_layer(run, x, hx, params, has_bias, dirs == 2, reverse, lengths, batch_first)
    return y, (state[0], state[1] if cell == "lstm" else None)


# ------------------------------------------------------------------------------------------ checks

def _check_inputs(cell, x, h0, c0, weights_ih, weights_hh, biases_ih, biases_hh, weights_hr, backend, batch_first):
    """Shapes, dtypes and devices of a layer's inputs; returns (T, B, H)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    G = GATES[cell]

    def shapes(T, B, D, dirs):
        w = weights_hh[0]
        if w.dim() != 2 or w.shape[0] % G:
            raise ValueError(f"weight_hh must be ({G}·H, {'P' if cell == 'lstm' else 'H'}), got shape "
                             f"{tuple(w.shape)}")
        H = w.shape[0] // G
        if weights_hr is not None and cell != "lstm":
            raise ValueError("weights_hr (proj_size) is for the LSTM only")
        if weights_hr is not None and len(weights_hr) != dirs:
            raise ValueError(f"expected {dirs} weight_hr, got {len(weights_hr)}")
        P = H if weights_hr is None else weights_hr[0].shape[0]
        named = {}
        for d in range(dirs):
            suffix = "" if dirs == 1 else f" (direction {d})"
            expected = {"weight_ih": (weights_ih, (G * H, D)), "weight_hh": (weights_hh, (G * H, P)),
                        "bias_ih": (biases_ih, (G * H,)), "bias_hh": (biases_hh, (G * H,)),
                        "weight_hr": (weights_hr, (P, H))}
            for name, (tensors, shape) in expected.items():
                if tensors is None:
                    continue
                if tuple(tensors[d].shape) != shape:
                    raise ValueError(f"{name}{suffix} must have shape {shape}, got {tuple(tensors[d].shape)}")
                named[name + suffix] = tensors[d]
        for name, state, width in (("h0", h0, P), ("c0", c0, H)):
            if state is not None:
                if tuple(state.shape) != (dirs, B, width):
                    raise ValueError(f"{name} must have shape {(dirs, B, width)}, got {tuple(state.shape)}")
                named[name] = state
        return named
    T, B = check_layer_inputs(x, weights_ih, weights_hh, batch_first, shapes)
    return T, B, weights_hh[0].shape[0] // G


def _one(t):
    return None if t is None else (t,)


def _unsqueeze(t):
    return None if t is None else t.unsqueeze(0)
