"""elman-triton: drop-ins for torch.nn.RNN and torch.nn.RNNCell on fused and persistent Triton kernels.

The public names: the modules ElmanRNN and ElmanRNNCell; the ops elman_rnn and elman_rnn_layer (and
BACKENDS, the backend names they take); elman_rnn_reference, the plain PyTorch loop; and the research
tools record_state_gradients (yielding a StateGradients) and init (irnn_, orthogonal_). The package ships
type hints (py.typed).
"""
from elman_triton import init
from elman_triton.diagnostics import StateGradients, record_state_gradients
from elman_triton.modules import ElmanRNN, ElmanRNNCell
from elman_triton.ops import BACKENDS, elman_rnn, elman_rnn_layer
from elman_triton.reference import elman_rnn_reference

__all__ = ["BACKENDS", "ElmanRNN", "ElmanRNNCell", "StateGradients", "elman_rnn", "elman_rnn_layer",
           "elman_rnn_reference", "init", "record_state_gradients"]
__version__: str = "0.1.0"
