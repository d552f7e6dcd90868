"""LSTM, GRU, LSTMCell and GRUCell: drop-in replacements for torch.nn's, on the ops of family_ops.

LSTM and GRU derive from torch.nn.RNNBase (modes "LSTM" and "GRU"), as ElmanRNN does, and not from
nn.LSTM / nn.GRU, whose instances torch.compile's Dynamo refuses to trace: construction checks
(proj_size included), parameter names, shapes, default init, state dicts and input checks are torch's
own code; `isinstance(m, nn.LSTM)` is False, `isinstance(m, nn.RNNBase)` is True. nn.LSTM's (h, c)
argument checks are borrowed from nn.LSTM itself. The cells derive from nn.LSTMCell / nn.GRUCell.

Every layer is one call of the layer op (both directions in each launch), picked by `backend` ("auto",
"stepwise", "persistent", "reference"; "persistent" is the small-H kernel, within
persistent.CELL_SMALL_H_MAX, else ValueError; "auto" on CUDA uses it within those limits). PackedSequence input
runs as one padded, length-sorted batch with the rows' lengths handed to the kernels (modules._PackedBatch),
batch_first input through strides, and under autocast the op runs in autocast's dtype (as ElmanRNN).
LSTM with proj_size > 0 runs the reference loop on the Triton backends (see family_ops).
"""
import torch
from torch import nn
from torch.nn.functional import dropout
from torch.nn.utils.rnn import PackedSequence

from elman_triton.family_ops import run_cell_layer
from elman_triton.modules import (ElmanRNN, _backend_repr, _cast_like_autocast, _check_backend, _packed_batch_size,
                                  _PackedBatch)

__all__ = ["LSTM", "GRU", "LSTMCell", "GRUCell"]


class GRU(nn.RNNBase):
    """torch.nn.GRU with the recurrence in family_ops.gru_layer. Same arguments, plus keyword-only
    `backend`. A subclass of nn.RNNBase, not of nn.GRU, so that torch.compile traces it."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None, *, backend="auto"):
        _check_backend(backend)
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype)
        self.backend = backend

    flatten_parameters = ElmanRNN.flatten_parameters
    forward = ElmanRNN.forward  # nn.RNN's and nn.GRU's argument handling are the same; the layer differs
    state_grad_norms_hook = None  # ElmanRNN.forward's research hook: not implemented for the GRU yet

    def extra_repr(self):
        return super().extra_repr() + _backend_repr(self.backend)

    def _layer(self, x, hx, weights, batch, batch_first, state_grad_norms=None):
        """One layer, every direction, in one op call (see ElmanRNN._layer)."""
        if state_grad_norms is not None:
            raise NotImplementedError("state-gradient recording is not implemented for the GRU yet")
        w_ih, w_hh, *biases = zip(*weights)
        b_ih, b_hh = biases or (None, None)
        y, (h_n, _) = run_cell_layer("gru", x, hx, None, w_ih, w_hh, b_ih, b_hh, backend=self.backend,
                                     lengths=None if batch is None else batch.lengths, batch_first=batch_first,
                                     lengths_are_valid=True)
        return y, h_n


class LSTM(nn.RNNBase):
    """torch.nn.LSTM with the recurrence in family_ops.lstm_layer. Same arguments (proj_size included),
    plus keyword-only `backend`. A subclass of nn.RNNBase, not of nn.LSTM, so that torch.compile traces it."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, *, backend="auto"):
        _check_backend(backend)
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device=device, dtype=dtype)
        self.backend = backend

    flatten_parameters = ElmanRNN.flatten_parameters
    check_forward_args = nn.LSTM.check_forward_args
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    permute_hidden = nn.LSTM.permute_hidden

    def extra_repr(self):
        return super().extra_repr() + _backend_repr(self.backend)

    def forward(self, input, hx=None):
        """Same contract as torch.nn.LSTM.forward: (output, (h_n, c_n)); PackedSequence in, PackedSequence out."""
        if not torch.compiler.is_exporting():  # as ElmanRNN.forward: export warns of the attributes it sets
            self._update_flat_weights()
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        batch = None
        # The argument handling mirrors nn.LSTM.forward step for step, so errors match.
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if hx is not None:
                hx = self.permute_hidden(hx, sorted_indices)
            self.check_input(data, batch_sizes)
            batch = _PackedBatch(data, batch_sizes, _packed_batch_size(batch_sizes, sorted_indices,
                                                                       None if hx is None else hx[0]))
            if hx is not None:
                layers = self.num_layers * num_directions
                for i, width in enumerate((real_hidden_size, self.hidden_size)):
                    message = "Expected hidden[%d] size {}, got {}" % i  # nn.LSTM's message
                    self.check_hidden_size(hx[i], (layers, batch.size, width), message)
            x = batch.pad(data)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched = input.dim() == 3
            if not batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
            if hx is None:
                self.check_input(input, None)
            else:
                rank = 3 if batched else 2
                if hx[0].dim() != rank or hx[1].dim() != rank:
                    raise RuntimeError(f"For {'batched 3-D' if batched else 'unbatched 2-D'} input, hx and cx should "
                                       f"also be {rank}-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                if not batched:
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
                self.check_forward_args(input, hx, None)
            x = input
        batch_first = self.batch_first and batch is None
        if x.shape[1 if batch_first else 0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        h0, c0 = (None, None) if hx is None else hx
        x, h0, weights, no_autocast = _cast_like_autocast(x, h0, self.all_weights)
        _, c0, _, _ = _cast_like_autocast(x, c0, [])
        with no_autocast:
            h_n, c_n = [], []
            for layer in range(self.num_layers):
                k = layer * num_directions
                w = list(zip(*weights[k:k + num_directions]))
                biases = (w[2], w[3]) if self.bias else (None, None)
                x, (h, c) = run_cell_layer("lstm", x, None if h0 is None else h0[k:k + num_directions],
                                           None if c0 is None else c0[k:k + num_directions], w[0], w[1], *biases,
                                           w[-1] if self.proj_size > 0 else None, backend=self.backend,
                                           lengths=None if batch is None else batch.lengths, batch_first=batch_first,
                                           lengths_are_valid=True)
                h_n.append(h)
                c_n.append(c)
                if layer < self.num_layers - 1 and self.dropout > 0 and self.training:
                    x = dropout(x, self.dropout, training=True)
            hidden = (torch.cat(h_n), torch.cat(c_n))

        if batch is not None:
            return (PackedSequence(batch.pack(x), batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden(hidden, unsorted_indices))
        if not batched:
            return x.squeeze(0 if self.batch_first else 1), (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return x, hidden


class _BackendCell:
    """nn.GRUCell's / nn.LSTMCell's construction plus the keyword-only `backend` (a mixin before them)."""

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *, backend="auto"):
        _check_backend(backend)
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.backend = backend

    def extra_repr(self):
        return super().extra_repr() + _backend_repr(self.backend)


class GRUCell(_BackendCell, nn.GRUCell):
    """torch.nn.GRUCell with the step in family_ops (T = 1). Same arguments, plus keyword-only `backend`."""

    def forward(self, input, hx=None):
        """Same contract as torch.nn.GRUCell.forward: h' of shape (B, H), or (H,) for unbatched input."""
        input, batched = _check_cell_input("GRUCell", self, input, (hx,))
        hx = None if hx is None else (hx if batched else hx.unsqueeze(0))
        h = _cell_step("gru", self, input, hx, None)[0]
        return h if batched else h.squeeze(0)


class LSTMCell(_BackendCell, nn.LSTMCell):
    """torch.nn.LSTMCell with the step in family_ops (T = 1). Same arguments, plus keyword-only `backend`."""

    def forward(self, input, hx=None):
        """Same contract as torch.nn.LSTMCell.forward: (h', c'), each (B, H), or (H,) for unbatched input."""
        input, batched = _check_cell_input("LSTMCell", self, input, (None, None) if hx is None else hx)
        if hx is not None and not batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        h, c = _cell_step("lstm", self, input, *((None, None) if hx is None else hx))
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


def _check_cell_input(name, cell, input, states):
    """nn's checks and messages for a cell's input and states (ValueError for ranks, RuntimeError for
    sizes); returns the input as (B, D) and whether it was batched."""
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    for i, state in enumerate(states):
        if state is not None and state.dim() not in (1, 2):
            which = "hidden" if len(states) == 1 else f"hx[{i}]"
            raise ValueError(f"{name}: Expected {which} to be 1D or 2D, got {state.dim()}D instead")
    batched = input.dim() == 2
    if not batched:
        input = input.unsqueeze(0)
        states = [None if s is None else s.unsqueeze(0) for s in states]
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
    return input, batched


def _cell_step(kind, cell, input, h0, c0):
    """One step of the layer op (T = 1): returns (h', c') (c' None for GRU), each (B, H)."""
    weights = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    x, h0, (weights,), no_autocast = _cast_like_autocast(input.unsqueeze(0), h0, [weights])
    _, c0, _, _ = _cast_like_autocast(x, c0, [])
    w_ih, w_hh, b_ih, b_hh = weights
    with no_autocast:
        _, (h, c) = run_cell_layer(kind, x, None if h0 is None else h0.unsqueeze(0),
                                   None if c0 is None else c0.unsqueeze(0), (w_ih,), (w_hh,),
                                   None if b_ih is None else (b_ih,), None if b_hh is None else (b_hh,),
                                   backend=cell.backend)
    return h[0], None if c is None else c[0]
