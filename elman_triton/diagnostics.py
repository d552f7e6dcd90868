"""Recording the gradient through time of a whole module: ‖∂L/∂h_t‖ per step, layer and direction.

A research tool above the modules. record_state_gradients(module) gathers the per-step norms for every
layer and direction of an ElmanRNN, GRU or LSTM (or every call of an ElmanRNNCell, GRUCell or LSTMCell;
for the LSTM also ‖∂L/∂c_t‖ of the cell state) while a context is open; outside it
nothing is recorded and nothing costs more. It works through the modules' documented state-gradient hook
(`state_grad_norms_hook`, see elman_triton.modules): it patches no globals and replaces no method.

The norms themselves are taken from the backward pass the op already runs (one extra GEMM and a norm
per layer and direction); that maths lives below the ops, in elman_triton.state_gradients.
"""
import contextlib
from collections.abc import Iterator

import torch

from elman_triton.family import GRU, LSTM, GRUCell, LSTMCell
from elman_triton.modules import ElmanRNN, ElmanRNNCell

__all__ = ["StateGradients", "record_state_gradients"]

RECORDABLE = (ElmanRNN, ElmanRNNCell, GRU, GRUCell, LSTM, LSTMCell)
CELLS = (ElmanRNNCell, GRUCell, LSTMCell)  # one step per call
Recordable = ElmanRNN | ElmanRNNCell | GRU | GRUCell | LSTM | LSTMCell


@contextlib.contextmanager
def record_state_gradients(module: Recordable, per_sample: bool = False) -> Iterator["StateGradients"]:
    """Record ‖∂L/∂h_t‖₂ for each layer and direction of module while the context is open.

        with elman_triton.record_state_gradients(rnn) as rec:
            y, h_n = rnn(x, h0)
            loss.backward()
        rec.norms      # float32 (num_layers * num_directions, T) on the module's device

    module: an ElmanRNN, GRU or LSTM, or an ElmanRNNCell, GRUCell or LSTMCell.
    rec.norms[k, t] is the norm over batch and hidden units of the total derivative of the loss with
    respect to layer/direction k's state h at input-order step t (k in nn.RNN's h_n order): every path
    counts, through later steps, later layers and h_n. With per_sample=True, rec.per_sample holds the
    (num_layers * num_directions, T, B) norms per batch row as well (B in the caller's row order,
    time-major whatever batch_first is). For packed input T is the longest length and steps past a
    row's length are zero. For an LSTM (LSTMCell), rec.cell_norms (and rec.cell_per_sample) hold the same
    for the cell state c_t, with the same shapes and order; h is the projected state with proj_size.

    The norms come from the backward the op runs anyway (elman_rnn's state_grad_norms: one extra GEMM
    per layer and direction); they are filled when backward reaches each layer, and read after it:
    reading them before any backward has run through the recorded call raises RuntimeError. For
    ElmanRNN, rec describes the latest forward call inside the context. For ElmanRNNCell each call is
    one step: rec.norms is (1, number of calls), t in call order.

    Under torch.compile: elman_rnn(state_grad_norms=buffer) with a buffer made outside the compiled
    function works inside one graph (fullgraph=True). A torch.compile'd module inside this context
    runs its recorded calls eagerly (the compiler cannot return a buffer created inside a graph and
    written by that graph's backward), so fullgraph=True refuses them.

    Cost: with backend="auto" on CPU (PyTorch's native kernel, which exposes no per-step gradient)
    the recorded calls run the reference loop instead, which is slower; CUDA and the Triton
    backends run their own kernels (the gated cells add an elementwise loop over T for their z ⊙ h and
    f ⊙ c paths; see elman_triton.state_gradients). The context sets the module's state_grad_norms_hook (see
    elman_triton.modules) and removes it on exit. Not thread-safe while open.
    """
    if not isinstance(module, RECORDABLE):
        raise TypeError("record_state_gradients needs one of elman_triton's recurrent modules (ElmanRNN or "
                        f"ElmanRNNCell, LSTM, GRU, LSTMCell, GRUCell), got {type(module).__name__}")
    if getattr(module, "state_grad_norms_hook", None) is not None:
        raise RuntimeError("the module's state_grad_norms_hook is already set (a record_state_gradients "
                           "context already open?)")
    rec = StateGradients(module, per_sample)
    module.state_grad_norms_hook = rec._new_buffers
    try:
        yield rec
    finally:
        del module.state_grad_norms_hook


class StateGradients:
    """What record_state_gradients yields: .norms (and .per_sample), for an LSTM also .cell_norms (and
    .cell_per_sample), read after backward."""

    def __init__(self, module: Recordable, per_sample: bool) -> None:
        self._want_per_sample = per_sample
        self._cell = isinstance(module, CELLS)
        self._lstm = isinstance(module, (LSTM, LSTMCell))  # buffers (2, directions, T, B): h, then c
        self._layers = 1 if self._cell else module.num_layers
        self._directions = 2 if not self._cell and module.bidirectional else 1
        self._calls = []  # one entry per recorded forward: (buffers, unsorted_indices, versions at creation)

    @property
    def norms(self) -> torch.Tensor:
        """(num_layers * num_directions, T) float32 norms over batch and hidden units."""
        return _over_batch(self._per_sample(0))

    @property
    def per_sample(self) -> torch.Tensor:
        """(num_layers * num_directions, T, B) float32 norms over hidden units, per batch row."""
        self._check_per_sample()
        return self._per_sample(0)

    @property
    def cell_norms(self) -> torch.Tensor:
        """The LSTM's: ‖∂L/∂c_t‖ of the cell state, as .norms."""
        self._check_lstm()
        return _over_batch(self._per_sample(1))

    @property
    def cell_per_sample(self) -> torch.Tensor:
        """The LSTM's: ‖∂L/∂c_t‖ per batch row, as .per_sample."""
        self._check_lstm()
        self._check_per_sample()
        return self._per_sample(1)

    def _check_per_sample(self):
        if not self._want_per_sample:
            raise AttributeError("per-sample norms were not requested: use record_state_gradients(module, per_sample=True)")

    def _check_lstm(self):
        if not self._lstm:
            raise AttributeError("cell-state norms exist for an LSTM or LSTMCell only; this module has no cell state")

    def _per_sample(self, kind):
        """kind 0: h, 1: the LSTM's c."""
        if not self._calls:
            raise RuntimeError("nothing recorded: call the module inside the record_state_gradients context")
        # The backward writes the buffers in place, which bumps their version counters: no version moved
        # means no backward has reached the recorded call, and the zeros would read as vanished gradients.
        if not any(buffer._version != version for buffers, _, versions in self._calls
                   for buffer, version in zip(buffers, versions)):
            raise RuntimeError("no backward has run through the recorded call yet: the norms are filled by "
                               "the backward pass, so call loss.backward() before reading rec.norms or "
                               "rec.per_sample")
        def pick(buffer):  # (directions, T, B) of this kind
            return buffer[kind] if self._lstm else buffer
        if self._cell:  # each call is one step: (1, calls, B)
            return torch.cat([pick(buffers[0]) for buffers, _, _ in self._calls], dim=1)
        buffers, unsorted_indices, _ = self._calls[-1]
        per_sample = torch.cat([pick(b) for b in buffers])  # each layer's (directions, T, B), in nn.RNN's h_n order
        return per_sample if unsorted_indices is None else per_sample[:, :, unsorted_indices]

    def _new_buffers(self, T: int, B: int, device: torch.device,
                     unsorted_indices: torch.Tensor | None) -> list[torch.Tensor]:
        """The module's state_grad_norms_hook: one zeroed (directions, T, B) buffer per layer for this
        forward call ((2, directions, T, B) for the LSTM: h, then c), kept for reading. Packed input runs
        as one padded, length-sorted batch with the lengths in the kernels, so every buffer is in input
        time order and sorted row order; unsorted_indices maps the rows back."""
        shape = ((2,) if self._lstm else ()) + (self._directions, T, B)
        buffers = [torch.zeros(shape, dtype=torch.float32, device=device) for _ in range(self._layers)]
        call = (buffers, unsorted_indices, [buffer._version for buffer in buffers])
        self._calls = self._calls + [call] if self._cell else [call]  # a cell call is a step; a module call, a pass
        return buffers


def _over_batch(per_sample):
    return torch.linalg.vector_norm(per_sample, dim=2, dtype=torch.float64).float()  # no fp32 underflow
