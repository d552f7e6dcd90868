"""elman-triton: drop-ins for torch.nn.RNN, LSTM and GRU (and their cells) on fused and persistent Triton kernels.

The public names: the modules ElmanRNN, ElmanRNNCell, LSTM, GRU, LSTMCell and GRUCell; the ops
elman_rnn, elman_rnn_layer, lstm, lstm_layer, gru and gru_layer (and BACKENDS, the backend names they
take); the plain PyTorch loops elman_rnn_reference, lstm_reference and gru_reference; and the research
tools record_state_gradients (yielding a StateGradients) and init (irnn_, orthogonal_). The package ships
type hints (py.typed).
"""
from elman_triton import init
from elman_triton.diagnostics import StateGradients, record_state_gradients
from elman_triton.family import GRU, LSTM, GRUCell, LSTMCell
from elman_triton.family_ops import gru, gru_layer, lstm, lstm_layer
from elman_triton.modules import ElmanRNN, ElmanRNNCell
from elman_triton.ops import BACKENDS, elman_rnn, elman_rnn_layer
from elman_triton.reference import elman_rnn_reference, gru_reference, lstm_reference

__all__ = ["BACKENDS", "ElmanRNN", "ElmanRNNCell", "GRU", "GRUCell", "LSTM", "LSTMCell", "StateGradients",
           "elman_rnn", "elman_rnn_layer", "elman_rnn_reference", "gru", "gru_layer", "gru_reference", "init",
           "lstm", "lstm_layer", "lstm_reference", "record_state_gradients"]
__version__: str = "0.1.0"
