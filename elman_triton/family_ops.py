"""lstm / gru / lstm_layer / gru_layer: the LSTM and GRU ops, beside elman_rnn / elman_rnn_layer, with the
same options (backend, reverse, both directions in one launch, lengths in the kernels, batch_first
through strides) and PyTorch's maths and gate order (elman_triton.reference, kernels/cells.py).

The Triton path is the Elman op's with G gates (G = 3 GRU, 4 LSTM; the kernels' CELL constexpr):

    forward:  xp = x W_ihᵀ, one GEMM over all T·B rows, all gates and both directions, into a gate buffer
              of dirs·G·Hp columns (each gate's block padded to Hp = H rounded up to 16); then one fused
              launch per step (kernels/stepwise.py), or one for the whole sequence (persistent small-H,
              kernels/persistent_small.py), writes y, the activated gates and aux (LSTM's c_t, GRU's
              ĥ_t = h W_hnᵀ + b_hn) for the backward.
    backward: the reverse loop, the same way, writes dz (the gradients of every gate's pre-activation);
              dW_hh, db, and (through the GEMM's autograd) dx and dW_ih are GEMMs and sums after it.

Saved for the backward, per step and unit: h_t (y, the output), the G activated gates (storage dtype)
and aux (fp32; fp64 for fp64). That is (G + 1) storage values and one fp32 per unit and step; the
alternative, recomputing the gates, would repeat the h W_hhᵀ GEMM of every step in the backward.
LSTM's c is carried between steps in that fp32 aux sequence (never rounded to 16 bits), GRU's h in y.

Backends: "stepwise" (Triton); "persistent" (Triton, the small-H kernel: H within
persistent.CELL_SMALL_H_MAX, e.g. 128 in 16-bit; beyond it ValueError, the persistent-large kernel takes
only the Elman cell); "reference" (the PyTorch loop); "auto": on CUDA persistent within those limits,
else stepwise, on CPU PyTorch's own torch.lstm / torch.gru (the loop where those cannot serve: a
reverse-only layer with lengths).
LSTM with proj_size (weights_hr) runs the reference loop on the Triton backends: a slower path that
gives the same values and gradients.

Double backward through the Triton path is not implemented (it raises); the reference backend has it.
"""
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from elman_triton import persistent, stepwise
from elman_triton.config import INTERPRETED, SUPPORTED_DTYPES, Layout, accumulator_dtype, kernel_options, padded
from elman_triton.ops import (BACKENDS, TRITON_BACKENDS, _padded_rows, _recurrent_weight_grad, _reversed, _stack,
                              check_layer_inputs, check_lengths)
from elman_triton.reference import gru_reference, lstm_reference

GATES = {"gru": 3, "lstm": 4}


def lstm(x, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_hr=None, *, backend="auto", reverse=False,
         lengths=None, batch_first=False):
    """One LSTM layer, one direction (torch.nn.LSTM's maths, gates i, f, g, o).

    x: (T, B, D), or (B, T, D) with batch_first. hx: None (zeros) or (h0, c0), h0 (B, P), c0 (B, H).
    weight_ih (4H, D), weight_hh (4H, P), bias_ih / bias_hh (4H,) or None, weight_hr (P, H) or None
    (proj_size P; without it P = H), as nn.LSTM lays them out. Returns y (T, B, P) ((B, T, P) with
    batch_first) and (h_n (B, P), c_n (B, H)). backend, reverse and lengths as elman_rnn.
    """
    h0, c0 = (None, None) if hx is None else hx
    y, (h_n, c_n) = lstm_layer(x, None if hx is None else (_unsqueeze(h0), _unsqueeze(c0)), (weight_ih,), (weight_hh,),
                               _one(bias_ih), _one(bias_hh), _one(weight_hr), backend=backend, reverse=reverse,
                               lengths=lengths, batch_first=batch_first)
    return y, (h_n[0], c_n[0])


def gru(x, h0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *, backend="auto", reverse=False, lengths=None,
        batch_first=False):
    """One GRU layer, one direction (torch.nn.GRU's maths, gates r, z, n). weight_ih (3H, D), weight_hh
    (3H, H), biases (3H,) or None; h0 (B, H) or None. Returns y and h_n (B, H); the rest as lstm."""
    y, h_n = gru_layer(x, _unsqueeze(h0), (weight_ih,), (weight_hh,), _one(bias_ih), _one(bias_hh), backend=backend,
                       reverse=reverse, lengths=lengths, batch_first=batch_first)
    return y, h_n[0]


def lstm_layer(x, hx, weights_ih, weights_hh, biases_ih=None, biases_hh=None, weights_hr=None, *, backend="auto",
               reverse=False, lengths=None, batch_first=False):
    """One LSTM layer with one or two directions, run together (one launch per step and pass).
    weights_* / biases_*: one tensor per direction in nn.LSTM's layout (biases_* and weights_hr may be
    None); with two, direction 0 runs forward and direction 1 in reverse. hx: None or (h0, c0), each
    (dirs, B, ·) or None. Returns y (T, B, dirs·P) and (h_n, c_n), (dirs, B, P) and (dirs, B, H)."""
    h0, c0 = (None, None) if hx is None else hx
    return run_cell_layer("lstm", x, h0, c0, weights_ih, weights_hh, biases_ih, biases_hh, weights_hr, backend=backend,
                          reverse=reverse, lengths=lengths, batch_first=batch_first)


def gru_layer(x, h0, weights_ih, weights_hh, biases_ih=None, biases_hh=None, *, backend="auto", reverse=False,
              lengths=None, batch_first=False):
    """One GRU layer with one or two directions (see lstm_layer). h0: (dirs, B, H) or None. Returns y
    (T, B, dirs·H) and h_n (dirs, B, H)."""
    y, (h_n, _) = run_cell_layer("gru", x, h0, None, weights_ih, weights_hh, biases_ih, biases_hh, None,
                                 backend=backend, reverse=reverse, lengths=lengths, batch_first=batch_first)
    return y, h_n


def run_cell_layer(cell, x, h0, c0, weights_ih, weights_hh, biases_ih=None, biases_hh=None, weights_hr=None, *,
                   backend="auto", reverse=False, lengths=None, batch_first=False, lengths_are_valid=False):
    """lstm_layer / gru_layer for every caller: returns y and (h_n, c_n) (c_n None for GRU). Callers that
    built lengths themselves (from a PackedSequence) pass lengths_are_valid=True: not read back."""
    G = GATES[cell]
    T, B, H = _check_inputs(cell, x, h0, c0, weights_ih, weights_hh, biases_ih, biases_hh, weights_hr, backend,
                            batch_first)
    if lengths is not None:
        check_lengths(lengths, T, B, x.device, values=not lengths_are_valid)
    if backend == "persistent" and B > 0 and weights_hr is None:  # proj_size: the reference loop
        persistent.cell_check_supported(G, H, x.dtype)
    if B == 0:  # an empty batch, which nn.LSTM / nn.GRU accept: empty outputs, zero weight gradients
        backend = "reference"
    if backend == "auto":
        if x.device.type == "cuda":
            backend = "persistent" if persistent.cell_supports(G, H, x.dtype) else "stepwise"
        else:  # PyTorch's native kernel, except for a reverse-only layer with lengths (it has none), and
            # under torch.export, which would unroll it over T (the reference loop exports as a scan)
            native = lengths is None or not (reverse or torch.compiler.is_compiling())
            backend = "native" if native and not torch.compiler.is_exporting() else "reference"
    if backend in TRITON_BACKENDS and weights_hr is not None:
        backend = "reference"  # proj_size: the documented slower path
    if backend == "reference":
        return _reference_layer(cell, x, h0, c0, weights_ih, weights_hh, biases_ih, biases_hh, weights_hr, reverse,
                                lengths, batch_first)
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
    dirs, Hp = len(weights_hh), padded(H)
    w_ih = _stack(weights_ih).unflatten(1, (G, H))
    if Hp != H:
        w_ih = F.pad(w_ih, (0, 0, 0, Hp - H))
    xp = torch.matmul(x, w_ih.reshape(dirs * G * Hp, -1).T)  # (T, B, dirs·G·Hp) or (B, T, ·)
    w_hh = _padded_rows(_stack(weights_hh), Hp)
    bias = _bias_slots(cell, biases_ih, biases_hh, dirs, H, x)
    h0 = x.new_zeros(dirs, B, H) if h0 is None else h0
    c0 = (x.new_zeros(dirs, B, H) if c0 is None else c0) if G == 4 else h0
    args = (xp, h0, c0, w_hh, bias, lengths, G, reverse, batch_first, backend)
    if torch.compiler.is_compiling():
        y, h_n, c_n, _, _ = torch.ops.elman_triton.cell_recurrence(*args)
    else:
        y, h_n, c_n, _, _ = _CellRecurrence.apply(*args)
    if Hp != H:  # drop the padding columns: nn's contiguous (·, ·, dirs·H) output, one copy
        y = y.unflatten(2, (dirs, Hp))[..., :H].contiguous().flatten(2)
    return y, (h_n, c_n if G == 4 else None)


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


def _cell_forward(xp, h0, c0, w_hh, bias, lengths, G, reverse, batch_first, backend):
    """Run the recurrence on backend ("stepwise" or "persistent"): (y, h_n, c_n, gates, aux), y in the
    padded sequence layout; gates and aux are what the backward reads (see the module docstring). GRU's
    c_n is an empty placeholder."""
    dirs, _, Hp = w_hh.shape
    H = w_hh.shape[1] // G
    T, B = (xp.shape[1], xp.shape[0]) if batch_first else xp.shape[:2]
    y = xp.new_empty((B, T, dirs * Hp) if batch_first else (T, B, dirs * Hp))
    gates = torch.empty_like(xp)
    aux = torch.empty_like(y, dtype=accumulator_dtype(xp.dtype))
    h_n = xp.new_empty(dirs, B, H)
    c_n = xp.new_empty(dirs, B, H) if G == 4 else xp.new_empty(0)
    h0p, c0p = _padded_states(h0, c0, Hp)
    TRITON_BACKENDS[backend].cell_forward_recurrence(G, xp, y, gates, aux, h0p, c0p, w_hh, bias, h_n, c_n, lengths,
                                                     kernel_options(xp.dtype, "tanh"),
                                                     Layout.of(y, H, dirs, batch_first, reverse))
    return y, h_n, c_n, gates, aux


def _cell_backward(dy, dh_n, dc_n, y, h0, c0, w_hh, gates, aux, lengths, G, reverse, batch_first, backend):
    """The reverse loop: (dz, dh0, dc0), dz with S = gate_slots(G) slots per direction (GRU's dc0 empty)."""
    dirs, _, Hp = w_hh.shape
    lay = Layout.of(y, w_hh.shape[1] // G, dirs, batch_first, reverse)
    S = stepwise.gate_slots(G)
    dz = y.new_empty((lay.B, lay.T, dirs * S * Hp) if batch_first else (lay.T, lay.B, dirs * S * Hp))
    h0p, c0p = _padded_states(h0, c0, Hp)
    dh0, dc0 = TRITON_BACKENDS[backend].cell_backward_recurrence(G, dy, dh_n, dc_n if G == 4 else None, y, h0p, gates,
                                                                 aux, c0p, w_hh, dz, lengths,
                                                                 kernel_options(y.dtype, "tanh"), lay)
    return dz, dh0.contiguous(), dc0.contiguous() if G == 4 else dh0.new_empty(0)


def _padded_states(h0, c0, Hp):
    """h0 and c0 (dirs, B, H) as the kernels read them: rows padded to Hp, one set of strides, c0 in the
    accumulator dtype (the kernels read a row's c from c0 or from the fp32 aux sequence alike)."""
    return _padded_rows(h0.contiguous(), Hp), _padded_rows(c0.to(accumulator_dtype(c0.dtype)).contiguous(), Hp)


def _save(ctx, inputs, outputs):
    xp, h0, c0, w_hh, bias, lengths, G, reverse, batch_first, backend = inputs
    y, _, _, gates, aux = outputs
    ctx.save_for_backward(h0, c0, w_hh, y, gates, aux, lengths)
    ctx.G, ctx.reverse, ctx.batch_first, ctx.has_bias = G, reverse, batch_first, bias is not None
    ctx.backend = backend


def _gradients(ctx, dy, dh_n, dc_n, backward):
    """Gradients of (xp, h0, c0, w_hh, bias): the reverse loop (backward) writes dz; dxp is dz's input-side
    slots, dW_hh = Σ_t dz_tᵀ h_{t∓1} per gate and db = Σ_t dz_t per slot are GEMMs and sums in plain
    torch (so torch.compile sees them)."""
    if torch.is_grad_enabled():
        raise RuntimeError("double backward (create_graph=True) through the LSTM/GRU Triton kernels is not "
                           "implemented; use backend='reference' for it")
    h0, c0, w_hh, y, gates, aux, lengths = ctx.saved_tensors
    G, dirs, Hp = ctx.G, w_hh.shape[0], w_hh.shape[2]
    lay = Layout.of(y, w_hh.shape[1] // G, dirs, ctx.batch_first, ctx.reverse)
    S, H = stepwise.gate_slots(G), lay.H
    dy = torch.zeros_like(y) if dy is None else dy
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
    dc_n = torch.zeros_like(h0) if dc_n is None or G != 4 else dc_n
    dz, dh0, dc0 = backward(dy, dh_n, dc_n, y, h0, c0, w_hh, gates, aux, lengths, G, ctx.reverse, ctx.batch_first,
                            ctx.backend)
    slots = dz.unflatten(2, (dirs, S, Hp))
    # GRU's input side of n is slot 3 (its slot 2 is the hidden side, scaled by r): one gather.
    dxp = dz if S == G else slots[:, :, :, [0, 1, 3]].flatten(2)
    need = ctx.needs_input_grad
    dw_hh = None
    if need[3]:
        per_dir = []
        for d in range(dirs):
            one = Layout(lay.T, lay.B, H, 1, lay.stride_t, lay.stride_b, lay.batch_first, _reversed(lay, d))
            y_d = y[..., d * Hp:(d + 1) * Hp]
            per_dir.append(torch.cat([_recurrent_weight_grad(dz[..., (d * S + g) * Hp:(d * S + g + 1) * Hp], y_d, h0[d],
                                                             lengths, one, 0) for g in range(G)]))
        dw_hh = F.pad(torch.stack(per_dir), (0, Hp - H))
    db = slots[..., :H].sum((0, 1), dtype=accumulator_dtype(y.dtype)) if ctx.has_bias and need[4] else None
    dh0 = dh0.to(y.dtype) if need[1] else None
    dc0 = dc0.to(y.dtype) if G == 4 and need[2] else None
    return dxp, dh0, dc0, dw_hh, db, None, None, None, None, None


class _CellRecurrence(torch.autograd.Function):
    """The eager path: (xp, h0, c0, w_hh, bias, lengths, G, reverse, batch_first, backend) → (y, h_n, c_n, gates,
    aux), y in the padded sequence layout; gates and aux are saved for the backward, not for the caller."""

    @staticmethod
    def forward(ctx, *inputs):
        outputs = _cell_forward(*inputs)
        _save(ctx, inputs, outputs)
        ctx.mark_non_differentiable(*outputs[3:])
        if inputs[6] != 4:
            ctx.mark_non_differentiable(outputs[2])
        return outputs

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n, _gates, _aux):
        return _gradients(ctx, dy, dh_n, dc_n, _cell_backward)


# The torch.compile path: the same two pieces as custom ops (opaque launches with known output shapes), the
# GEMMs around them traced. Custom ops may not return None: GRU's c_n and dc0 are empty tensors.
@torch.library.custom_op("elman_triton::cell_recurrence", mutates_args=())
def _cell_recurrence_op(xp: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor,
                        bias: torch.Tensor | None, lengths: torch.Tensor | None, G: int, reverse: bool,
                        batch_first: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor, torch.Tensor]:
    return _cell_forward(xp, h0, c0, w_hh, bias, lengths, G, reverse, batch_first, backend)


@_cell_recurrence_op.register_fake
def _(xp, h0, c0, w_hh, bias, lengths, G, reverse, batch_first, backend):
    dirs, _, Hp = w_hh.shape
    T, B = (xp.shape[1], xp.shape[0]) if batch_first else xp.shape[:2]
    y = xp.new_empty((B, T, dirs * Hp) if batch_first else (T, B, dirs * Hp))
    return (y, xp.new_empty(h0.shape), xp.new_empty(h0.shape) if G == 4 else xp.new_empty(0), torch.empty_like(xp),
            torch.empty_like(y, dtype=accumulator_dtype(xp.dtype)))


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
    return dz, h0.new_empty(h0.shape, dtype=acc), h0.new_empty(h0.shape if G == 4 else (0,), dtype=acc)


def _op_setup_context(ctx, inputs, output):
    _save(ctx, inputs, output)


def _op_backward(ctx, dy, dh_n, dc_n, _gates, _aux):
    return _gradients(ctx, dy, dh_n, dc_n, torch.ops.elman_triton.cell_recurrence_backward)


_cell_recurrence_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ------------------------------------------------------------------------------- non-Triton backends

def _reference_layer(cell, x, h0, c0, weights_ih, weights_hh, biases_ih, biases_hh, weights_hr, reverse, lengths,
                     batch_first):
    """The plain PyTorch loop, one direction after the other."""
    x = x.transpose(0, 1) if batch_first else x
    ys, h_n, c_n = [], [], []
    for d in range(len(weights_hh)):
        pick = (lambda s: None if s is None else s[d])  # noqa: E731
        common = dict(reverse=(d == 1) != reverse, lengths=lengths)
        if cell == "lstm":
            y, h, c = lstm_reference(x, pick(h0), pick(c0), weights_ih[d], weights_hh[d], pick(biases_ih),
                                     pick(biases_hh), pick(weights_hr), **common)
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
    """PyTorch's own torch.lstm / torch.gru (what nn.LSTM / nn.GRU run): the fast path for CPU tensors.
    Variable lengths run through its packed-sequence form (a pack and an unpack of x and y, as nn's)."""
    dirs = len(weights_hh)
    H, P = weights_hh[0].shape[0] // GATES[cell], weights_hh[0].shape[1]  # P: the state's width (proj_size)
    B = x.shape[0] if batch_first else x.shape[1]
    has_bias = biases_ih is not None or biases_hh is not None
    params = []
    for d in range(dirs):
        params += [weights_ih[d], weights_hh[d]]
        if has_bias:
            params += [b[d] if b is not None else weights_hh[d].new_zeros(GATES[cell] * H)
                       for b in (biases_ih, biases_hh)]
        if weights_hr is not None:
            params.append(weights_hr[d])
    h0 = x.new_zeros(dirs, B, P) if h0 is None else h0
    if cell == "lstm":
        hx = (h0, x.new_zeros(dirs, B, H) if c0 is None else c0)
        run = torch.lstm
    else:
        hx, run = h0, torch.gru
    time_dim = 1 if batch_first else 0
    if lengths is None:
        x_in = x.flip(time_dim) if reverse else x
        # Positional: (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        y, *state = run(x_in, hx, params, has_bias, 1, 0.0, False, dirs == 2, batch_first)
        y = (y.flip(time_dim) if reverse else y).contiguous()
    else:
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=batch_first, enforce_sorted=False)
        hx = tuple(s.index_select(1, packed.sorted_indices) for s in hx) if cell == "lstm" else \
            hx.index_select(1, packed.sorted_indices)
        # Packed: (data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional)
        data, *state = run(packed.data, packed.batch_sizes, hx, params, has_bias, 1, 0.0, False, dirs == 2)
        y, _ = pad_packed_sequence(PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                                                  packed.unsorted_indices),
                                   batch_first=batch_first, total_length=x.shape[time_dim])
        y = y.contiguous()
        state = [s.index_select(1, packed.unsorted_indices) for s in state]
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
