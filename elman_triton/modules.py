"""ElmanRNN and ElmanRNNCell: drop-in replacements for torch.nn.RNN and torch.nn.RNNCell on elman_rnn.

ElmanRNN derives from torch.nn.RNNBase, nn.RNN's own base class (mode "RNN_TANH" or "RNN_RELU"), and
not from nn.RNN itself: torch.compile's Dynamo refuses to trace any instance of nn.RNN, nn.GRU or
nn.LSTM (a graph break, unless torch._dynamo.config.allow_rnn is set) but traces an RNNBase like any
module. So construction checks, parameter names, shapes, registration order, default init, state
dicts, pickling and input checks are still torch's own code, and `isinstance(m, nn.RNN)` is False
(`isinstance(m, nn.RNNBase)` is True). ElmanRNNCell derives from nn.RNNCell, which Dynamo traces.

Every layer of ElmanRNN is one call of the layer op (elman_triton.ops.run_layer: both directions in
each launch), picked by `backend`, in ElmanRNN._layer; ElmanRNNCell calls elman_rnn with T = 1.
batch_first input is read and its output written in (B, T, ·) order by the kernels, through strides:
no transposed copies.

Variable lengths (PackedSequence) run as one padded, length-sorted batch with the rows' lengths handed
to the kernels, which skip each row's padding steps (so its reverse direction starts at its own end and
h_n is its own last state): no per-row reversal gathers, no per-sequence Python loop. Index tensors built
from batch_sizes move the packed rows into a (T, B, ·) batch and back (_PackedBatch), where
pad_packed_sequence / pack_padded_sequence would stop torch.compile (Dynamo skips them). B comes from
a shape where one tells it (_packed_batch_size), so the graph has no data-dependent size except for a
sorted PackedSequence without hx. Padded positions never reach the returned PackedSequence or h_n, so
they get no gradient.

The state-gradient hook (for research tools; elman_triton.diagnostics.record_state_gradients uses it).
`state_grad_norms_hook` is None on both classes. A tool may set it on one instance, as
`module.state_grad_norms_hook = hook`, and remove it with `del module.state_grad_norms_hook`. While it
is set, every forward call asks it once, before the first layer, for the buffers the op's backward
fills with ‖∂L/∂h_t‖ (elman_rnn's state_grad_norms):

    hook(T, B, device, unsorted_indices) -> one float32 (directions, T, B) tensor per layer

T and B are the padded batch's steps and rows: time-major and length-sorted for packed input. An
ElmanRNNCell call has T = 1 and one layer and direction. unsorted_indices is the PackedSequence's
(None otherwise), for mapping the rows back to the caller's order. Under torch.compile, a call with
the hook set runs eagerly (a graph break), because inductor rejects a buffer that is created inside a
graph and written by that graph's backward. Without the hook, forward is unchanged.
"""
import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.functional import dropout
from torch.nn.utils.rnn import PackedSequence

from elman_triton.ops import BACKENDS, elman_rnn, run_layer

__all__ = ["ElmanRNN", "ElmanRNNCell", "StateGradNormsHook"]

#: The state-gradient hook's type (see the module docstring): (T, B, device, unsorted_indices) -> one
#: float32 (directions, T, B) buffer per layer.
StateGradNormsHook = Callable[[int, int, torch.device, torch.Tensor | None], list[torch.Tensor]]


class ElmanRNN(nn.RNNBase):
    """torch.nn.RNN with the recurrence in elman_rnn. Same arguments, plus keyword-only `backend`
    ("auto", "stepwise", "persistent" or "reference"; see elman_rnn).

    A subclass of nn.RNNBase, not of nn.RNN, so that torch.compile traces it (fullgraph=True works):
    `isinstance(m, nn.RNN)` is False, `isinstance(m, nn.RNNBase)` is True."""

    state_grad_norms_hook: StateGradNormsHook | None = None  # the research hook: see the module docstring

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None, *,
                 backend="auto"):
        _check_nonlinearity(nonlinearity)  # as nn.RNN.__init__, before RNNBase checks the rest
        _check_backend(backend)
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size,
                         num_layers, bias, batch_first, dropout, bidirectional, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity
        self.backend = backend

    def flatten_parameters(self):
        """No-op: the kernels read each weight where it is; cuDNN's flat buffer is not used."""

    def extra_repr(self):
        s = super().extra_repr()
        if self.nonlinearity != "tanh":  # nn.RNN's repr omits it
            s += f", nonlinearity={self.nonlinearity!r}"
        return s + _backend_repr(self.backend)

    def forward(self, input, hx=None):
        """Same contract as torch.nn.RNN.forward: (output, h_n); PackedSequence in, PackedSequence out."""
        if self.state_grad_norms_hook is not None and torch.compiler.is_compiling():
            return _forward_eagerly(self, input, hx)  # recording: see the hook in the module docstring
        # As nn.RNN: check_input reads the weights' dtype from _flat_weights. Not under torch.export, which
        # warns of tensor attributes assigned during export; the list RNNBase keeps current on .to()
        # and load_state_dict serves the dtype check there.
        if not torch.compiler.is_exporting():
            self._update_flat_weights()
        num_directions = 2 if self.bidirectional else 1
        batch = None
        # The argument handling below mirrors nn.RNN.forward step for step, so errors match.
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if hx is not None:
                hx = self.permute_hidden(hx, sorted_indices)
            self.check_input(data, batch_sizes)
            batch = _PackedBatch(data, batch_sizes, _packed_batch_size(batch_sizes, sorted_indices, hx))
            if hx is not None:  # nn.RNN's check_forward_args, with the batch size found without .item()
                self.check_hidden_size(hx, (self.num_layers * num_directions, batch.size, self.hidden_size))
            x = batch.pad(data)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
            batched = input.dim() == 3
            if hx is not None and hx.dim() != input.dim():
                raise RuntimeError(f"For {'batched 3-D' if batched else 'unbatched 2-D'} input, hx should also "
                                   f"be {input.dim()}-D but got {hx.dim()}-D tensor")
            if not batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
                hx = None if hx is None else hx.unsqueeze(1)
            if hx is None:  # nn.RNN checks a zero hx it builds; only the input needs checking then
                self.check_input(input, None)
            else:
                self.check_forward_args(input, hx, None)
            x = input  # batch-first input stays batch-first: the op reads and writes through strides
        batch_first = self.batch_first and batch is None
        if x.shape[1 if batch_first else 0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        norms = _state_grad_norms(self, x, batch_first, None if batch is None else input.unsorted_indices,
                                  self.num_layers)

        x, hx, weights, no_autocast = _cast_like_autocast(x, hx, self.all_weights)
        with no_autocast:
            h_n = []
            for layer in range(self.num_layers):
                last = layer == self.num_layers - 1
                k = layer * num_directions
                x, h = self._layer(x, None if hx is None else hx[k:k + num_directions],
                                   weights[k:k + num_directions], batch, batch_first, norms[layer])
                h_n.append(h)
                if not last and self.dropout > 0 and self.training:
                    x = dropout(x, self.dropout, training=True)
            h_n = torch.cat(h_n)

        if batch is not None:
            return (PackedSequence(batch.pack(x), batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden(h_n, unsorted_indices))
        if not batched:
            return x.squeeze(0 if self.batch_first else 1), h_n.squeeze(1)
        return x, h_n

    def _layer(self, x, hx, weights, batch, batch_first, state_grad_norms=None):
        """One layer, every direction, in one op call (both directions share each launch). x: (T, B, D),
        or (B, T, D) with batch_first; hx: (directions, B, H) or None; weights: one list per direction;
        batch: the _PackedBatch of packed input, else None; state_grad_norms: the hook's buffer for this
        layer, or None. Returns the output, (T, B, directions·H) or
        (B, T, directions·H), and h_n (directions, B, H)."""
        w_ih, w_hh, *biases = zip(*weights)
        b_ih, b_hh = biases or (None, None)
        return run_layer(x, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity=self.nonlinearity, backend=self.backend,
                         lengths=None if batch is None else batch.lengths, batch_first=batch_first,
                         lengths_are_valid=True, state_grad_norms=state_grad_norms)


class ElmanRNNCell(nn.RNNCell):
    """torch.nn.RNNCell with the step in elman_rnn (T = 1). Same arguments, plus keyword-only `backend`.
    Unlike nn.RNNCell, an unknown nonlinearity raises ValueError here, at construction."""

    state_grad_norms_hook: StateGradNormsHook | None = None  # the research hook: see the module docstring

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None, dtype=None, *,
                 backend="auto"):
        _check_nonlinearity(nonlinearity)
        _check_backend(backend)
        super().__init__(input_size, hidden_size, bias, nonlinearity, device=device, dtype=dtype)
        self.backend = backend

    def extra_repr(self):
        return super().extra_repr() + _backend_repr(self.backend)

    def forward(self, input, hx=None):
        """Same contract as torch.nn.RNNCell.forward: h' of shape (B, H), or (H,) for unbatched input."""
        if self.state_grad_norms_hook is not None and torch.compiler.is_compiling():
            return _forward_eagerly(self, input, hx)  # recording: see the hook in the module docstring
        # Checks and messages as nn.RNNCell and its kernel (ValueError for ranks, RuntimeError for sizes).
        if input.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
            hx = None if hx is None else hx.unsqueeze(0)
        if input.shape[1] != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.shape[1]} expected {self.input_size}")
        if hx is not None:
            if input.shape[0] != hx.shape[0]:
                raise RuntimeError(f"Input batch size {input.shape[0]} doesn't match hidden0 batch size {hx.shape[0]}")
            if hx.dim() != 2 or hx.shape[1] != self.hidden_size:
                raise RuntimeError(f"hidden0 has inconsistent shape: got {tuple(hx.shape)}, "
                                   f"expected ({input.shape[0]}, {self.hidden_size})")

        weights = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]
        x, hx, (weights,), no_autocast = _cast_like_autocast(input.unsqueeze(0), hx, [weights])
        with no_autocast:
            (norms,) = _state_grad_norms(self, x, False, None, 1)
            _, h = _elman(x, hx, weights, self.nonlinearity, self.backend,
                          state_grad_norms=None if norms is None else norms[0])
        return h if batched else h.squeeze(0)


def _packed_batch_size(batch_sizes, sorted_indices, hx):
    """B of a PackedSequence, from a shape where one tells it: batch_sizes[0] is data, which
    torch.compile cannot read without a graph break (unless capture_scalar_outputs is set)."""
    if sorted_indices is not None:
        return sorted_indices.shape[0]
    if torch.compiler.is_compiling() and hx is not None and hx.dim() == 3:
        torch._assert_async(batch_sizes[0] == hx.shape[1], "hx's batch size does not match the PackedSequence's")
        return hx.shape[1]
    B = int(batch_sizes[0])  # under torch.compile, a data-dependent size
    torch._check(B > 0)  # as batch_sizes[0] of any PackedSequence: tells the compiler B is not 0
    return B


class _PackedBatch:
    """Index tensors between a PackedSequence's rows (N, ·) and its padded, length-sorted batch
    (T, B, ·), built from batch_sizes with tensor ops only, on the data's device."""

    def __init__(self, data, batch_sizes, B):
        device = data.device
        batch_sizes = batch_sizes.to(device)
        ends = batch_sizes.cumsum(0)
        starts = ends - batch_sizes  # the packed row of (t, b) is starts[t] + b
        self.size = B
        self.rows = torch.arange(B, device=device)
        self.lengths = (batch_sizes.unsqueeze(1) > self.rows).sum(0)  # row b is in the first lengths[b] steps
        t = torch.arange(batch_sizes.shape[0], device=device).unsqueeze(1)
        valid = t < self.lengths  # (T, B)
        self._valid = valid.unsqueeze(2)
        self._packed_row = torch.where(valid, starts.unsqueeze(1) + self.rows, 0)
        # Packed row n sits at step t = #{t : ends[t] <= n}, batch row n - starts[t].
        n = torch.arange(data.shape[0], device=device)
        step = torch.searchsorted(ends, n, right=True)
        self._padded_row = step * B + n - starts[step]

    def pad(self, data):
        """(N, D) packed rows -> (T, B, D), zeros at padded positions (as pad_packed_sequence)."""
        return torch.where(self._valid, data[self._packed_row], 0)

    def pack(self, y):
        """(T, B, F) -> (N, F) packed rows, as pack_padded_sequence(...).data."""
        return y.flatten(0, 1)[self._padded_row]



def _elman(x, h0, weights, nonlinearity, backend, reverse=False, state_grad_norms=None):
    w_ih, w_hh, *biases = weights
    b_ih, b_hh = biases or (None, None)
    return elman_rnn(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity=nonlinearity, backend=backend, reverse=reverse,
                     state_grad_norms=state_grad_norms)


def _state_grad_norms(module, x, batch_first, unsorted_indices, layers):
    """One state-gradient buffer per layer from module.state_grad_norms_hook (see the module docstring),
    or None per layer when no hook is set."""
    hook = module.state_grad_norms_hook
    if hook is None:
        return [None] * layers
    T, B = (x.shape[1], x.shape[0]) if batch_first else x.shape[:2]
    return hook(T, B, x.device, unsorted_indices)


@torch.compiler.disable
def _forward_eagerly(module, input, hx):
    """A forward call with the state-gradient hook set, reached under torch.compile: run it eagerly."""
    return module.forward(input, hx)


def _cast_like_autocast(x, hx, weights):
    """The op takes one dtype, so under autocast cast what autocast would cast (floating tensors other
    than float64) to its dtype, and return a context that keeps autocast off inside the op. Then
    hx and weights must match x in dtype and device; nn.RNN's kernels raise RuntimeError otherwise.
    weights: a list of per-direction lists. Returns (x, hx, weights, context)."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(t):
            return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t

        x, hx, weights = cast(x), cast(hx), [[cast(w) for w in ws] for ws in weights]
        context = torch.autocast(device_type, enabled=False)
    else:
        context = contextlib.nullcontext()
    for name, t in [("hx", hx)] + [("a parameter", w) for ws in weights for w in ws]:
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise RuntimeError(f"{name} has dtype {t.dtype} on {t.device} but input has dtype {x.dtype} "
                               f"on {x.device}; they must match")
    return x, hx, weights, context


def _check_nonlinearity(nonlinearity):
    """nn.RNN's check and message."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}. Select from {BACKENDS}.")


def _backend_repr(backend):
    return "" if backend == "auto" else f", backend={backend!r}"
