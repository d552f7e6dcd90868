"""Initialisations researchers reach for, for every layer and direction of an RNN.

Each works in place and returns the module. The Elman ones take an ElmanRNN or ElmanRNNCell (and
torch.nn.RNN / nn.RNNCell, whose parameter names they share):

    irnn_(rnn)                           Le, Jaitly & Hinton 2015: W_hh = scale·I, zero biases, small W_ih
    orthogonal_(rnn, spectral_radius=ρ)  W_hh = ρ·Q with Q a random orthogonal matrix

and the LSTM's takes elman_triton.LSTM / LSTMCell (and nn.LSTM / nn.LSTMCell):

    forget_gate_bias_(lstm, value=1.0)   Gers, Schmidhuber & Cummins 2000; Jozefowicz, Zaremba &
                                         Sutskever 2015: the forget gate's bias b_if + b_hf = value, so
                                         the cell state is kept (f ≈ σ(1) ≈ 0.73) until training says
                                         otherwise; the other gates' biases are left as they are

For ρ·Q every eigenvalue has modulus ρ and every singular value is ρ, so the spectral radius and
the largest singular value (the quantity in Pascanu, Mikolov & Bengio 2013's vanishing-gradient
condition) are both ρ.
"""
import warnings
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch import nn

__all__ = ["forget_gate_bias_", "irnn_", "orthogonal_"]

# The helpers take ElmanRNN, ElmanRNNCell, nn.RNN or nn.RNNCell and return the module they get.
Module = TypeVar("Module", bound=nn.Module)


def irnn_(module: Module, scale: float = 1.0, input_std: float = 1e-3) -> Module:
    """IRNN init (Le et al. 2015): W_hh = scale·I, biases zero, W_ih ~ N(0, input_std²).

    Meant for nonlinearity="relu", where the identity carries the state (and its gradient) unchanged
    while the units stay positive; on a tanh module it warns (UserWarning) and initialises anyway.
    Applies to every layer and direction; returns module.
    """
    if _nonlinearity(module) == "tanh":
        warnings.warn("irnn_ on a tanh module: the IRNN init is meant for nonlinearity='relu' (tanh squashes "
                      "the state at every step, so W_hh = I does not carry it unchanged); build the module "
                      "with nonlinearity='relu'", UserWarning, stacklevel=2)
    with torch.no_grad():
        for kind, param in _parameters(module):
            if kind == "weight_hh":
                param.copy_(scale * torch.eye(param.shape[0], dtype=param.dtype, device=param.device))
            elif kind == "weight_ih":
                param.normal_(0.0, input_std)
            else:
                param.zero_()
    return module


def orthogonal_(module: Module, spectral_radius: float = 1.0, generator: torch.Generator | None = None) -> Module:
    """W_hh = spectral_radius·Q, Q random orthogonal (torch.nn.init.orthogonal_), for every layer and
    direction; W_ih and the biases keep their values. Returns module."""
    if spectral_radius < 0:
        raise ValueError(f"spectral_radius must be ≥ 0, got {spectral_radius}")
    with torch.no_grad():
        for kind, param in _parameters(module):
            if kind == "weight_hh":
                nn.init.orthogonal_(param, gain=spectral_radius, generator=generator)
    return module


def forget_gate_bias_(module: Module, value: float = 1.0) -> Module:
    """Set the forget gate's total bias to `value` in every layer and direction of an LSTM or LSTM cell:
    b_hf = value and b_if = 0 (PyTorch's gate order i, f, g, o: rows [H, 2H) of each bias). Returns
    module. A module without biases (bias=False) raises ValueError: it has no forget-gate bias to set."""
    is_lstm = isinstance(module, nn.LSTMCell) or (isinstance(module, nn.RNNBase) and module.mode == "LSTM")
    if not is_lstm:
        raise TypeError(f"forget_gate_bias_ needs an LSTM or LSTMCell (elman_triton's or torch.nn's), "
                        f"got {type(module).__name__}")
    if not module.bias:
        raise ValueError("forget_gate_bias_: the module was built with bias=False, so it has no forget-gate bias")
    H = module.hidden_size
    with torch.no_grad():
        for name, param in module.named_parameters(recurse=False):
            if name.startswith("bias_"):
                param[H:2 * H] = value if name.startswith("bias_hh") else 0.0
    return module


def _nonlinearity(module):
    """"tanh" or "relu" of an Elman RNN or RNN cell; TypeError for any other module."""
    if isinstance(module, nn.RNNBase):
        if module.mode not in ("RNN_TANH", "RNN_RELU"):
            raise TypeError(f"expected an Elman RNN (ElmanRNN or nn.RNN), got a {module.mode} module")
        return "tanh" if module.mode == "RNN_TANH" else "relu"
    if not isinstance(module, nn.RNNCell):
        raise TypeError(f"expected ElmanRNN, ElmanRNNCell, nn.RNN or nn.RNNCell, got {type(module).__name__}")
    return module.nonlinearity


def _parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(kind, parameter) for each parameter of an Elman RNN or RNN cell; kind is weight_ih, weight_hh,
    bias_ih or bias_hh (layer and direction suffixes dropped)."""
    _nonlinearity(module)  # the type check
    for name, param in module.named_parameters(recurse=False):
        yield name.split("_l")[0], param
