"""Plain PyTorch references for the RNN family: the oracles for tests and the eager baselines for benchmarks.

    Elman  h_t = act(x_t W_ihᵀ + b_ih + h_{t-1} W_hhᵀ + b_hh),   act ∈ {tanh, relu}
    GRU    torch.nn.GRU's maths, gates (r, z, n):
           r, z = σ(x W_{ir,iz}ᵀ + b_{ir,iz} + h W_{hr,hz}ᵀ + b_{hr,hz}),
           n = tanh(x W_inᵀ + b_in + r ⊙ (h W_hnᵀ + b_hn)),   h' = (1 − z) ⊙ n + z ⊙ h
    LSTM   torch.nn.LSTM's maths, gates (i, f, g, o):
           i, f, o = σ(·), g = tanh(·) of x W_ihᵀ + b_ih + h W_hhᵀ + b_hh,
           c' = f ⊙ c + i ⊙ g,   h' = o ⊙ tanh(c'),   and with proj_size: h' = (o ⊙ tanh(c')) W_hrᵀ

Each is a Python loop over time built from differentiable torch ops, so autograd gives the reference
gradients too. They run in any dtype, float64 included, on any device.
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
    H = weight_hh.shape[0]

    def step(xw, state):
        return (act(xw + _linear(state[0], weight_hh, bias_hh)),)

    ys, (h,) = _recur(x, _linear(x, weight_ih, bias_ih), (_state(h0, x, H),), step, reverse, lengths,
                      (state_grad_norms,))
    return ys, h


def gru_reference(x, h0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *, reverse=False, lengths=None,
                  state_grad_norms=None):
    """One GRU layer, one direction, torch.nn.GRU's maths; weights (3H, D), (3H, H), biases (3H,) or None
    in nn.GRU's gate order (r, z, n). Returns y (T, B, H), h_n (B, H). reverse, lengths and
    state_grad_norms as elman_rnn_reference."""
    H = weight_hh.shape[1]

    def step(xw, state):
        h = state[0]
        x_r, x_z, x_n = xw.chunk(3, dim=-1)
        h_r, h_z, h_n = _linear(h, weight_hh, bias_hh).chunk(3, dim=-1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return ((1 - z) * n + z * h,)

    ys, (h,) = _recur(x, _linear(x, weight_ih, bias_ih), (_state(h0, x, H),), step, reverse, lengths,
                      (state_grad_norms,))
    return ys, h


def lstm_reference(x, h0, c0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_hr=None, *, reverse=False,
                   lengths=None, state_grad_norms=None, cell_grad_norms=None):
    """One LSTM layer, one direction, torch.nn.LSTM's maths; weights (4H, D), (4H, P), biases (4H,) or None
    in nn.LSTM's gate order (i, f, g, o); weight_hr: (P, H) with proj_size P, else None (P = H).
    h0: (B, P) or None, c0: (B, H) or None. Returns y (T, B, P), h_n (B, P), c_n (B, H). reverse,
    lengths and state_grad_norms (‖∂L/∂h_t‖ of the output state h_t) as elman_rnn_reference;
    cell_grad_norms: None, or a float32 (T, B) tensor that the backward fills with ‖∂L/∂c_t[b, :]‖₂, the
    total derivative with respect to the cell state (through h_t and c_{t+1}, and c_n)."""
    H = weight_hh.shape[0] // 4
    P = H if weight_hr is None else weight_hr.shape[0]

    def step(xw, state):
        h, c = state
        i, f, g, o = (xw + _linear(h, weight_hh, bias_hh)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if weight_hr is None else h @ weight_hr.T), c

    ys, (h, c) = _recur(x, _linear(x, weight_ih, bias_ih), (_state(h0, x, P), _state(c0, x, H)), step, reverse,
                        lengths, (state_grad_norms, cell_grad_norms))
    return ys, h, c


def _linear(x, weight, bias):
    return x @ weight.T if bias is None else x @ weight.T + bias


def _state(s0, x, size):
    return x.new_zeros(x.shape[1], size) if s0 is None else s0


def _recur(x, xw, state, step, reverse, lengths, norms):
    """The loop every reference shares: state = step(xw[t], state) for t in time order (reversed with
    reverse), state[0] the output h_t. A row's steps past its length keep its state and give y = 0.
    norms: one (T, B) buffer or None per state tensor, filled with the norms of its gradients.

    Under torch.export it runs as torch's scan operator instead (the same step): a Python loop would be
    unrolled into the exported program and fix T; scan keeps T dynamic. (Hooks on the steps' states,
    which state_grad_norms needs, exist only in the loop.)"""
    T = x.shape[0]
    if torch.compiler.is_exporting() and all(n is None for n in norms):
        return _scan(xw, state, step, reverse, lengths)
    ys = [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        active = None if lengths is None else (t < lengths).unsqueeze(1).to(x.device)  # (B, 1)
        new = step(xw[t], state)
        # the hooks go on the step's own states: with lengths, the kept state (torch.where) of an LSTM
        # would miss the path from c_t through h_t, which the step computed from its own c_t
        for s, out in zip(new, norms):
            if out is not None and s.requires_grad:
                s.register_hook(_norm_writer(out, t, active))
        state = new if active is None else tuple(torch.where(active, n, s) for n, s in zip(new, state))
        h = state[0]
        ys[t] = h if active is None else torch.where(active, h, 0.0)
    return torch.stack(ys), state


def _scan(xw, state, step, reverse, lengths):
    """_recur through torch's scan: the same step and masking, T symbolic."""
    from torch._higher_order_ops.scan import scan

    T = xw.shape[0]
    active = (torch.arange(T, device=xw.device).unsqueeze(1) < (T if lengths is None else lengths)).unsqueeze(2)

    def combine(carry, inputs):
        xw_t, active_t = inputs  # (B, ·), (B, 1)
        carry = tuple(torch.where(active_t, n, s) for n, s in zip(step(xw_t, carry), carry))
        return carry, torch.where(active_t, carry[0], 0.0)

    xs = (xw.flip(0), active.flip(0)) if reverse else (xw, active)
    state, ys = scan(combine, tuple(state), xs)
    return (ys.flip(0) if reverse else ys), tuple(state)


def _norm_writer(out, t, active):
    """A hook on step t's state: the norm of its total gradient (0 for rows past their length)."""
    def write(grad):
        norms = torch.linalg.vector_norm(grad, dim=1, dtype=torch.float64)  # fp32 squares underflow below 1e-19
        out[t] = norms if active is None else torch.where(active[:, 0], norms, 0.0)
    return write
