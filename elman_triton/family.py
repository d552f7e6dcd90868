"""LSTM, GRU, LSTMCell and GRUCell: drop-in replacements for torch.nn's, on the ops of family_ops.

LSTM and GRU derive from torch.nn.RNNBase (modes "LSTM" and "GRU") through modules.RecurrentBase, whose
forward they share with ElmanRNN (nn's argument handling and messages, each class giving its layer op and,
for the LSTM, the (h, c) pair), and not from nn.LSTM / nn.GRU, whose instances torch.compile's Dynamo
refuses to trace: construction checks (proj_size included), parameter names, shapes, default init, state
dicts and input checks are torch's own code; `isinstance(m, nn.LSTM)` is False, `isinstance(m,
nn.RNNBase)` is True. nn.LSTM's (h, c) argument checks are borrowed from nn.LSTM itself. The cells derive
from nn.LSTMCell / nn.GRUCell and share one forward. All four take the state-gradient hook of
elman_triton.modules (record_state_gradients): its buffers go to run_cell_layer's state_grad_norms, (2,
directions, T, B) for the LSTM (h and c).

Every layer is one call of the layer op (both directions in each launch), picked by `backend` ("auto",
"stepwise", "persistent", "reference"; "persistent" is the small-H kernel within
persistent.CELL_SMALL_H_MAX, the large-H kernel within CELL_LARGE_H_MAX, else ValueError; "auto" on CUDA
uses it where persistent.cell_supports holds the cell). PackedSequence input
runs as one padded, length-sorted batch with the rows' lengths handed to the kernels (modules._PackedBatch),
batch_first input through strides, and under autocast the op runs in autocast's dtype (as ElmanRNN).
LSTM with proj_size > 0 runs the reference loop on the Triton backends (see family_ops).
"""
import torch
from torch import nn

from elman_triton.family_ops import run_cell_layer
from elman_triton.modules import (RecurrentBase, StateGradNormsHook, _backend_repr, _cast_like_autocast, _check_backend,
                                  _check_cell_input, _forward_eagerly, _state_grad_norms)

__all__ = ["LSTM", "GRU", "LSTMCell", "GRUCell"]


class GRU(RecurrentBase):
    """torch.nn.GRU with the recurrence in family_ops.gru_layer. Same arguments, plus keyword-only
    `backend`. A subclass of nn.RNNBase, not of nn.GRU, so that torch.compile traces it."""

    _rank_message = "GRU: Expected input to be 2D or 3D, got {}D instead"  # nn.GRU's

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None, *, backend="auto"):
        _check_backend(backend)
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype)
        self.backend = backend

    def extra_repr(self):
        return super().extra_repr() + _backend_repr(self.backend)

    def _layer(self, x, states, weights, batch, batch_first, state_grad_norms):
        """See RecurrentBase._layer: one run_cell_layer call."""
        return _cell_layer("gru", self, x, states, weights, batch, batch_first, state_grad_norms)


class LSTM(RecurrentBase):
    """torch.nn.LSTM with the recurrence in family_ops.lstm_layer. Same arguments (proj_size included),
    plus keyword-only `backend`. A subclass of nn.RNNBase, not of nn.LSTM, so that torch.compile traces it.
    hx and h_n are (h, c) pairs, as nn.LSTM's."""

    _rank_message = "LSTM: Expected input to be 2D or 3D, got {}D instead"  # nn.LSTM's

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, *, backend="auto"):
        _check_backend(backend)
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device=device, dtype=dtype)
        self.backend = backend

    # nn.LSTM's own (h, c) checks and permutation
    check_forward_args = nn.LSTM.check_forward_args
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    permute_hidden = nn.LSTM.permute_hidden

    def extra_repr(self):
        return super().extra_repr() + _backend_repr(self.backend)

    def _states(self, hx):
        return hx[0], hx[1]

    def _hidden(self, states):
        return tuple(states)

    def _state_checks(self):
        """h is proj_size wide when there is a projection; nn.LSTM's messages."""
        return [(self.proj_size or self.hidden_size, "Expected hidden[0] size {}, got {}"),
                (self.hidden_size, "Expected hidden[1] size {}, got {}")]

    def _layer(self, x, states, weights, batch, batch_first, state_grad_norms):
        """See RecurrentBase._layer: one run_cell_layer call, W_hr with proj_size."""
        return _cell_layer("lstm", self, x, states, weights, batch, batch_first, state_grad_norms)


def _cell_layer(kind, module, x, states, weights, batch, batch_first, state_grad_norms):
    """RecurrentBase._layer (see there) for GRU and LSTM, and the cells' step: run_cell_layer on one layer's
    per-direction weights (w_ih, w_hh[, b_ih, b_hh][, w_hr]); returns the output and the final states,
    (h_n,) or (h_n, c_n), each (directions, B, ·)."""
    w = list(zip(*weights))
    biases = (w[2], w[3]) if module.bias else (None, None)
    n = 4 if module.bias else 2  # nn.LSTM's W_hr (proj_size > 0) follows the biases
    h0, c0 = (None, None) if states is None else (states[0], states[1] if kind == "lstm" else None)
    y, (h_n, c_n) = run_cell_layer(kind, x, h0, c0, w[0], w[1], *biases,
                                   w[n] if len(w) > n else None, backend=module.backend,
                                   lengths=None if batch is None else batch.lengths, batch_first=batch_first,
                                   state_grad_norms=state_grad_norms, lengths_are_valid=True)
    return y, (h_n,) if c_n is None else (h_n, c_n)


class _BackendCell:
    """nn.GRUCell's / nn.LSTMCell's construction plus the keyword-only `backend`, and the forward both
    share (a mixin before them). _cell names the cell ("gru", "lstm")."""

    state_grad_norms_hook: StateGradNormsHook | None = None  # the research hook: see elman_triton.modules
    _cell: str

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *, backend="auto"):
        _check_backend(backend)
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.backend = backend

    def extra_repr(self):
        return super().extra_repr() + _backend_repr(self.backend)

    def forward(self, input, hx=None):
        """Same contract as nn.GRUCell's / nn.LSTMCell's forward: h' (the LSTM's (h', c')), each (B, H),
        or (H,) for unbatched input. One step of the layer op (T = 1)."""
        if self.state_grad_norms_hook is not None and torch.compiler.is_compiling():
            return _forward_eagerly(self, input, hx)  # recording: see the hook in elman_triton.modules
        lstm = self._cell == "lstm"
        states = ((None, None) if hx is None else (hx[0], hx[1])) if lstm else (hx,)
        input, states, batched = _check_cell_input(f"{self._cell.upper()}Cell", self, input, states)
        weights = [self.weight_ih, self.weight_hh] + ([self.bias_ih, self.bias_hh] if self.bias else [])
        x, states, (weights,), no_autocast = _cast_like_autocast(input.unsqueeze(0), states, [weights])
        with no_autocast:
            (norms,) = _state_grad_norms(self, x, False, None, 1)
            _, finals = _cell_layer(self._cell, self, x, None if hx is None else tuple(s.unsqueeze(0) for s in states),
                                    [weights], None, False, norms)
        finals = tuple(s[0] if batched else s[0, 0] for s in finals)  # drop the direction (and batch) dim
        return finals if lstm else finals[0]


class GRUCell(_BackendCell, nn.GRUCell):
    """torch.nn.GRUCell with the step in family_ops (T = 1). Same arguments, plus keyword-only `backend`."""

    _cell = "gru"


class LSTMCell(_BackendCell, nn.LSTMCell):
    """torch.nn.LSTMCell with the step in family_ops (T = 1). Same arguments, plus keyword-only `backend`."""

    _cell = "lstm"
