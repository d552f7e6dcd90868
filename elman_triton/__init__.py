"""elman-triton: fused and persistent Triton kernels for the Elman RNN."""
from elman_triton import init
from elman_triton.diagnostics import record_state_gradients
from elman_triton.modules import ElmanRNN, ElmanRNNCell
from elman_triton.ops import BACKENDS, elman_rnn, elman_rnn_layer
from elman_triton.reference import elman_rnn_reference

__all__ = ["BACKENDS", "ElmanRNN", "ElmanRNNCell", "elman_rnn", "elman_rnn_layer", "elman_rnn_reference", "init",
           "record_state_gradients"]
__version__ = "0.1.0"
