"""Plain PyTorch reference for the Elman RNN: the oracle for tests and the eager baseline for benchmarks.

    h_t = act(x_t W_ihᵀ + b_ih + h_{t-1} W_hhᵀ + b_hh),   act ∈ {tanh, relu}

It is a Python loop over time built from differentiable torch ops, so autograd gives the reference
gradients too. It runs in any dtype, float64 included, on any device.
"""
import torch

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


def elman_rnn_reference(x, h0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *,
                        nonlinearity="tanh", reverse=False, lengths=None, state_grad_norms=None):
    """One layer, one direction. x: (T, B, D); h0: (B, H) or None. Returns y (T, B, H), h_n (B, H).

    With reverse=True the recurrence runs from t = T-1 down to 0, and y[t] is still the state after
    reading x[t] (torch.nn.RNN's backward direction).

    lengths: None, or (B,) valid steps per row. A row's steps t ≥ lengths[b] keep its state and give
    y = 0, so h_n is its state after its own last step and a reverse row starts at its own end.

    state_grad_norms: None, or a float32 (T, B) tensor that the backward fills with ‖∂L/∂h_t[b, :]‖₂.
    A hook on each step's state sees its total gradient (every path: later steps, y, h_n).
    """
    act = ACTIVATIONS[nonlinearity]
    T, B, _ = x.shape
    H = weight_hh.shape[0]
    h = x.new_zeros(B, H) if h0 is None else h0
    ys = [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        z = x[t] @ weight_ih.T + h @ weight_hh.T
        if bias_ih is not None:
            z = z + bias_ih
        if bias_hh is not None:
            z = z + bias_hh
        active = None if lengths is None else (t < lengths).unsqueeze(1).to(x.device)  # (B, 1)
        h = act(z) if active is None else torch.where(active, act(z), h)
        if state_grad_norms is not None and h.requires_grad:
            h.register_hook(_norm_writer(state_grad_norms, t, active))
        ys[t] = h if active is None else torch.where(active, h, 0.0)
    return torch.stack(ys), h


def _norm_writer(out, t, active):
    """A hook on step t's state: the norm of its total gradient (0 for rows past their length)."""
    def write(grad):
        norms = torch.linalg.vector_norm(grad, dim=1, dtype=torch.float64)  # fp32 squares underflow below 1e-19
        out[t] = norms if active is None else torch.where(active[:, 0], norms, 0.0)
    return write
