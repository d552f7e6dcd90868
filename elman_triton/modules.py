"""ElmanRNN and ElmanRNNCell: drop-in replacements for torch.nn.RNN and torch.nn.RNNCell on elman_rnn.

ElmanRNN derives from torch.nn.RNNBase, nn.RNN's own base class (mode "RNN_TANH" or "RNN_RELU"), and
not from nn.RNN itself: torch.compile's Dynamo refuses to trace any instance of nn.RNN, nn.GRU or
nn.LSTM (a graph break, unless torch._dynamo.config.allow_rnn is set) but traces an RNNBase like any
module. So construction checks, parameter names, shapes, registration order, default init, state
dicts, pickling and input checks are still torch's own code, and `isinstance(m, nn.RNN)` is False
(`isinstance(m, nn.RNNBase)` is True). ElmanRNNCell derives from nn.RNNCell, which Dynamo traces.

RecurrentBase holds the forward that ElmanRNN and elman_triton.family's LSTM and GRU share: nn's
argument handling, checks and messages step for step, PackedSequence, unbatched input, dropout between
layers, autocast and the state-gradient hook, around one `_layer` call per layer; a subclass gives its
layer and, for the LSTM, how hx splits into (h, c) states. Every layer of ElmanRNN is one call of the
layer op (elman_triton.ops.run_layer: both directions in each launch), picked by `backend`, in
ElmanRNN._layer; ElmanRNNCell calls elman_rnn with T = 1.
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
`state_grad_norms_hook` is None on ElmanRNN and ElmanRNNCell, and on elman_triton.family's LSTM, GRU,
LSTMCell and GRUCell, which share this forward (RecurrentBase) and hook. A tool may set it on one
instance, as `module.state_grad_norms_hook = hook`, and remove it with `del module.state_grad_norms_hook`.
While it is set, every forward call asks it once, before the first layer, for the buffers the op's
backward fills with ‖∂L/∂h_t‖ (elman_rnn's and run_cell_layer's state_grad_norms), and for the LSTM
with ‖∂L/∂c_t‖ as well:

    hook(T, B, device, unsorted_indices) -> one float32 tensor per layer: (directions, T, B), or
        (2, directions, T, B) for LSTM / LSTMCell ([0] for h, [1] for c)

T and B are the padded batch's steps and rows: time-major and length-sorted for packed input. A cell's
call has T = 1 and one layer and direction. unsorted_indices is the PackedSequence's (None otherwise),
for mapping the rows back to the caller's order. Under torch.compile, a call with the hook set runs
eagerly (a graph break), because inductor rejects a buffer that is created inside a graph and written by
that graph's backward. Without the hook, forward is unchanged.
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
#: float32 (directions, T, B) buffer per layer, (2, directions, T, B) for the LSTM.
StateGradNormsHook = Callable[[int, int, torch.device, torch.Tensor | None], list[torch.Tensor]]


class RecurrentBase(nn.RNNBase):
    """The forward that ElmanRNN, LSTM and GRU share: nn's argument handling, checks and messages step
    for step (nn.RNN's, nn.GRU's and nn.LSTM's differ only in what the hooks below give), PackedSequence,
    unbatched input, autocast, dropout between layers and the state-gradient hook, around one call of
    `_layer` per layer. A subclass gives its layer and, where its state is more than one tensor (the
    LSTM's (h, c)), how hx splits into states and joins again."""

    state_grad_norms_hook: StateGradNormsHook | None = None  # the research hook: see the module docstring
    _rank_message = "RNN: Expected input to be 2D or 3D, got {}D tensor instead"  # nn.RNN's; nn.GRU's omits "tensor"

    def flatten_parameters(self):
        """No-op: the kernels read each weight where it is; cuDNN's flat buffer is not used."""

    def _states(self, hx):
        """hx as given (after nn's permute_hidden) -> a tuple of state tensors, each (layers·directions, B, ·)."""
        return (hx,)

    def _hidden(self, states):
        """The inverse of _states: what forward returns as h_n."""
        return states[0]

    def _state_checks(self):
        """(width, nn's message) of each state, for the size check of packed input's hx."""
        return [(self.hidden_size, "Expected hidden size {}, got {}")]

    def _layer(self, x, states, weights, batch, batch_first, state_grad_norms):
        """One layer, every direction, in one op call (both directions share each launch). x: (T, B, D),
        or (B, T, D) with batch_first; states: None or the tuple of _states, each (directions, B, ·);
        weights: one list per direction; batch: the _PackedBatch of packed input, else None;
        state_grad_norms: the hook's buffer for this layer, or None. Returns the output, (T, B,
        directions·H) or (B, T, directions·H), and the tuple of final states, each (directions, B, ·)."""
        raise NotImplementedError

    def forward(self, input, hx=None):
        """Same contract as nn.RNN's / nn.GRU's / nn.LSTM's forward: (output, h_n), h_n being (h_n, c_n)
        for the LSTM; PackedSequence in, PackedSequence out."""
        if self.state_grad_norms_hook is not None and torch.compiler.is_compiling():
            return _forward_eagerly(self, input, hx)  # recording: see the hook in the module docstring
        # As nn's: check_input reads the weights' dtype from _flat_weights. Not under torch.export, which
        # warns of tensor attributes assigned during export; the list RNNBase keeps current on .to()
        # and load_state_dict serves the dtype check there.
        if not torch.compiler.is_exporting():
            self._update_flat_weights()
        num_directions = 2 if self.bidirectional else 1
        batch = None
        # The argument handling below mirrors nn's forward step for step, so errors match.
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            states = None if hx is None else self._states(self.permute_hidden(hx, sorted_indices))
            self.check_input(data, batch_sizes)
            batch = _PackedBatch(data, batch_sizes,
                                 _packed_batch_size(batch_sizes, sorted_indices, None if hx is None else states[0]))
            for state, (width, message) in zip(states or (), self._state_checks()):
                # nn's check_forward_args, with the batch size found without .item()
                self.check_hidden_size(state, (self.num_layers * num_directions, batch.size, width), message)
            x = batch.pad(data)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(self._rank_message.format(input.dim()))
            batched = input.dim() == 3
            states = None if hx is None else self._states(hx)
            if states is not None and any(s.dim() != input.dim() for s in states):
                got = (f"{states[0].dim()}-D tensor" if len(states) == 1
                       else f"({', '.join(f'{s.dim()}-D' for s in states)}) tensors")
                raise RuntimeError(f"For {'batched 3-D' if batched else 'unbatched 2-D'} input, "
                                   f"{'hx' if len(states) == 1 else 'hx and cx'} should also be {input.dim()}-D "
                                   f"but got {got}")
            if not batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
                states = None if states is None else tuple(s.unsqueeze(1) for s in states)
            if states is None:  # nn checks a zero hx it builds; only the input needs checking then
                self.check_input(input, None)
            else:
                self.check_forward_args(input, self._hidden(states), None)
            x = input  # batch-first input stays batch-first: the op reads and writes through strides
        batch_first = self.batch_first and batch is None
        if x.shape[1 if batch_first else 0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        norms = _state_grad_norms(self, x, batch_first, None if batch is None else input.unsorted_indices,
                                  self.num_layers)

        x, states, weights, no_autocast = _cast_like_autocast(x, states, self.all_weights)
        with no_autocast:
            finals = []
            for layer in range(self.num_layers):
                k = layer * num_directions
                x, final = self._layer(x, None if states is None else tuple(s[k:k + num_directions] for s in states),
                                       weights[k:k + num_directions], batch, batch_first, norms[layer])
                finals.append(final)
                if layer < self.num_layers - 1 and self.dropout > 0 and self.training:
                    x = dropout(x, self.dropout, training=True)
            finals = tuple(torch.cat(f) for f in zip(*finals))

        if batch is not None:
            return (PackedSequence(batch.pack(x), batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden(self._hidden(finals), unsorted_indices))
        if not batched:
            return x.squeeze(0 if self.batch_first else 1), self._hidden(tuple(s.squeeze(1) for s in finals))
        return x, self._hidden(finals)


class ElmanRNN(RecurrentBase):
    """torch.nn.RNN with the recurrence in elman_rnn. Same arguments, plus keyword-only `backend`
    ("auto", "stepwise", "persistent" or "reference"; see elman_rnn).

    A subclass of nn.RNNBase, not of nn.RNN, so that torch.compile traces it (fullgraph=True works):
    `isinstance(m, nn.RNN)` is False, `isinstance(m, nn.RNNBase)` is True."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None, *,
                 backend="auto"):
        _check_nonlinearity(nonlinearity)  # as nn.RNN.__init__, before RNNBase checks the rest
        _check_backend(backend)
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size,
                         num_layers, bias, batch_first, dropout, bidirectional, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity
        self.backend = backend

    def extra_repr(self):
        s = super().extra_repr()
        if self.nonlinearity != "tanh":  # nn.RNN's repr omits it
            s += f", nonlinearity={self.nonlinearity!r}"
        return s + _backend_repr(self.backend)

    def _layer(self, x, states, weights, batch, batch_first, state_grad_norms):
        """See RecurrentBase._layer: one run_layer call."""
        w_ih, w_hh, *biases = zip(*weights)
        b_ih, b_hh = biases or (None, None)
        y, h_n = run_layer(x, None if states is None else states[0], w_ih, w_hh, b_ih, b_hh,
                           nonlinearity=self.nonlinearity, backend=self.backend,
                           lengths=None if batch is None else batch.lengths, batch_first=batch_first,
                           lengths_are_valid=True, state_grad_norms=state_grad_norms)
        return y, (h_n,)


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
        input, (hx,), batched = _check_cell_input("RNNCell", self, input, (hx,))
        weights = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]
        x, (hx,), (weights,), no_autocast = _cast_like_autocast(input.unsqueeze(0), (hx,), [weights])
        with no_autocast:
            (norms,) = _state_grad_norms(self, x, False, None, 1)
            _, h = _elman(x, hx, weights, self.nonlinearity, self.backend,
                          state_grad_norms=None if norms is None else norms[0])
        return h if batched else h.squeeze(0)


def _check_cell_input(name, cell, input, states):
    """nn's checks and messages for a cell's input and states (nn.RNNCell's, nn.GRUCell's and
    nn.LSTMCell's; ValueError for ranks, RuntimeError for sizes). states: a tuple, None where not given.
    Returns the input as (B, D), the states as (B, H) and whether the input was batched."""
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    for i, state in enumerate(states):
        if state is not None and state.dim() not in (1, 2):
            which = "hidden" if len(states) == 1 else f"hx[{i}]"
            raise ValueError(f"{name}: Expected {which} to be 1D or 2D, got {state.dim()}D instead")
    batched = input.dim() == 2
    if not batched:
        input = input.unsqueeze(0)
        states = tuple(None if s is None else s.unsqueeze(0) for s in states)
    if input.shape[1] != cell.input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {input.shape[1]} expected {cell.input_size}")
    for i, state in enumerate(states):
        if state is None:
            continue
        if input.shape[0] != state.shape[0]:
            raise RuntimeError(f"Input batch size {input.shape[0]} doesn't match hidden{i} batch size {state.shape[0]}")
        if state.dim() != 2 or state.shape[1] != cell.hidden_size:
            raise RuntimeError(f"hidden{i} has inconsistent shape: got {tuple(state.shape)}, "
                               f"expected ({input.shape[0]}, {cell.hidden_size})")
    return input, states, batched


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


def _cast_like_autocast(x, states, weights):
    """The op takes one dtype, so under autocast cast what autocast would cast (floating tensors other
    than float64) to its dtype, and return a context that keeps autocast off inside the op. Then the
    states and weights must match x in dtype and device; nn's kernels raise RuntimeError otherwise.
    states: None or a tuple of state tensors (hx; the LSTM's (h, c)), each may be None; weights: a list
    of per-direction lists. Returns (x, states, weights, context)."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(t):
            return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t

        x, weights = cast(x), [[cast(w) for w in ws] for ws in weights]
        states = None if states is None else tuple(cast(s) for s in states)
        context = torch.autocast(device_type, enabled=False)
    else:
        context = contextlib.nullcontext()
    for name, t in [("hx", s) for s in states or ()] + [("a parameter", w) for ws in weights for w in ws]:
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise RuntimeError(f"{name} has dtype {t.dtype} on {t.device} but input has dtype {x.dtype} "
                               f"on {x.device}; they must match")
    return x, states, weights, context


def _check_nonlinearity(nonlinearity):
    """nn.RNN's check and message."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}. Select from {BACKENDS}.")


def _backend_repr(backend):
    return "" if backend == "auto" else f", backend={backend!r}"
