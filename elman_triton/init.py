"""Initialisations researchers reach for, for every layer and direction of an Elman RNN.

Each works in place on an ElmanRNN or ElmanRNNCell (and on torch.nn.RNN / nn.RNNCell, whose
parameter names they share) and returns the module:

    irnn_(rnn)                           Le, Jaitly & Hinton 2015: W_hh = scale·I, zero biases, small W_ih
    orthogonal_(rnn, spectral_radius=ρ)  W_hh = ρ·Q with Q a random orthogonal matrix

For ρ·Q every eigenvalue has modulus ρ and every singular value is ρ, so the spectral radius and
the largest singular value (the quantity in Pascanu, Mikolov & Bengio 2013's vanishing-gradient
condition) are both ρ.
"""
import warnings
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch import nn

__all__ = ["irnn_", "orthogonal_"]

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
