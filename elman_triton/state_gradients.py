"""The kernels' side of the gradient through time: ‖∂L/∂h_t‖ per step, from the backward pass the op already runs.

∂L/∂h_t here is the total derivative of the loss with respect to the state at step t: every path,
through later steps, later layers and h_n. For one layer and direction the op's backward holds the
pieces: with dz_t = ∂L/∂z_t (the pre-activation gradient the recurrence kernels write),

    g_t = dy_t + dz_{t+1} W_hh      (dz_{t-1} W_hh in reverse; ∂z_{t+1}/∂h_t = W_hh)
    g at the last processed step = dy + dh_n

so recording costs one GEMM (dz shifted one step @ W_hh) and a norm, never a second backward.

The gated cells (cell_state_gradient_norms) read the same pieces plus the gates and aux the forward
saved (kernels/cells.py), with dz_t the gradients of every gate's hidden-side pre-activation:

    LSTM  ∂L/∂h_t = dy_t + Σ_g dz_{t+1,g} W_hh,g      (h reaches the next step only through W_hh: one GEMM)
          ∂L/∂c_t = ∂L/∂h_t ⊙ o_t ⊙ (1 − tanh² c_t) + f_{t+1} ⊙ ∂L/∂c_{t+1}      (+ dc_n at the last step)
    GRU   ∂L/∂h_t = dy_t + Σ_g dz_{t+1,g} W_hh,g + z_{t+1} ⊙ ∂L/∂h_{t+1}
          (h' = (1 − z) ⊙ n + z ⊙ h: the direct z path besides the GEMM; dz's n slot is ∂L/∂ĥ, ĥ = h W_hnᵀ + b_hn)

The GEMM part is the Elman one; the elementwise recursions (f ⊙, z ⊙) are a loop of T elementwise steps
(their per-step factors cannot be divided out of dz stably), still no second backward.

This module sits below the ops (elman_triton.ops calls state_gradient_norms from its backward and
check_norms_buffer on elman_rnn's state_grad_norms argument; elman_triton.family_ops calls
cell_state_gradient_norms from the LSTM's and GRU's backward and check_norms_buffer on theirs) and
imports nothing of the package. The
recording context for whole modules, record_state_gradients, is a research tool above the modules
(elman_triton.diagnostics).
"""
import torch

__all__ = ["cell_state_gradient_norms", "check_norms_buffer", "state_gradient_norms"]


def state_gradient_norms(dy: torch.Tensor, dz: torch.Tensor, dh_n: torch.Tensor, weight_hh: torch.Tensor,
                         reverse: bool, out: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
    """Write ‖∂L/∂h_t[b, :]‖₂ into out (float32, (T, B)), in input order t, from one backward pass.

    dy: (T, B, H) gradient of y; dz: (T, B, H) gradient of the pre-activations; dh_n: (B, H)
    gradient of h_n; weight_hh: (H, H). reverse: the direction ran from t = T-1 down to 0.
    lengths: None, or (B,) int64 valid steps per row: steps t ≥ lengths[b] count as zero, and row
    b's last processed step is lengths[b]-1 forward, 0 in reverse (where the recursion starts at
    lengths[b]-1).

    Under torch.compile the work runs as the custom op torch.ops.elman_triton.state_gradient_norms
    (it writes into out, which the compiler must see as a mutation); eagerly, directly.
    """
    if torch.compiler.is_compiling():
        torch.ops.elman_triton.state_gradient_norms(dy, dz, dh_n, weight_hh, reverse, out, lengths)
    else:
        _write_norms(dy, dz, dh_n, weight_hh, reverse, out, lengths)


def _write_norms(dy, dz, dh_n, weight_hh, reverse, out, lengths):
    out.copy_(_norms(_through_weights(dy, dz, dh_n, weight_hh, reverse, lengths)))


def _norms(g):
    return torch.linalg.vector_norm(g, dim=2, dtype=torch.float64)  # fp32 squares underflow below 1e-19


def _valid(lengths, T, device):
    """(T, B, 1) whether step t is one of row b's own, or None without lengths."""
    return None if lengths is None else (torch.arange(T, device=device).unsqueeze(1) < lengths).unsqueeze(2)


def _through_weights(dy, dz, dh_n, weight_hh, reverse, lengths):
    """dy_t + dz_{t±1} W_hh, plus dh_n at each row's last processed step; padding steps 0. dz: (T, B, K),
    weight_hh (K, H): K = G·H for the gated cells, every gate's slot at once. Returns (T, B, H) in fp32
    (fp64 for fp64)."""
    T, B = dz.shape[:2]
    dtype = torch.promote_types(dz.dtype, torch.float32)  # 16-bit gradients are summed in fp32
    weight_hh = weight_hh.to(dtype)
    valid = _valid(lengths, T, dz.device)
    if valid is not None:
        dz = dz * valid  # whatever a padded step holds must not reach its neighbour
    g = dy.to(dtype, copy=True)
    if reverse:
        g[1:] += dz[:-1].to(dtype) @ weight_hh
    else:
        g[:-1] += dz[1:].to(dtype) @ weight_hh
    _add_at_last_step(g, dh_n.to(dtype), reverse, lengths)
    return g if valid is None else g * valid


def _add_at_last_step(g, final, reverse, lengths):
    """g[last processed step of row b, b] += final[b] (in place)."""
    if lengths is None:
        g[0 if reverse else -1] += final
    else:
        last = torch.zeros_like(lengths) if reverse else lengths - 1
        g.index_put_((last, torch.arange(g.shape[1], device=g.device)), final, accumulate=True)


def _recursion(u, m, reverse, lengths):
    """G_t = u_t + m_{t±1} ⊙ G_{t±1} (the next processed step's factor and total), padding steps 0: the
    elementwise part of the gated cells' state gradients, a loop over T (no second backward)."""
    valid = _valid(lengths, u.shape[0], u.device)
    out = torch.empty_like(u)
    carry = torch.zeros_like(u[0])
    for t in (range(u.shape[0]) if reverse else reversed(range(u.shape[0]))):
        carry = u[t] + m[t] * carry  # m[t]: the factor the step after t applies (shifted below)
        if valid is not None:
            carry = carry * valid[t]
        out[t] = carry
    return out


def _next_step(a, reverse):
    """a_{t±1} at step t (the next processed step's value; zeros past the end)."""
    nxt = torch.zeros_like(a)
    if reverse:
        nxt[1:] = a[:-1]
    else:
        nxt[:-1] = a[1:]
    return nxt


def cell_state_gradient_norms(G: int, dy: torch.Tensor, dz: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor,
                              weight_hh: torch.Tensor, gates: torch.Tensor, aux: torch.Tensor, reverse: bool,
                              out: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
    """The gated cells' state_gradient_norms (see the module docstring): G = 3 (GRU) or 4 (LSTM), one
    direction, time-major in input order. dy: (T, B, H); dz: (T, B, G, H) every gate's hidden-side
    pre-activation gradient (GRU: r, z and ĥ's); dh_n, dc_n: (B, H) (dc_n: LSTM; any (B, H) for GRU);
    weight_hh: (G·H, H); gates: (T, B, G, H) the saved activated gates; aux: (T, B, H) LSTM's saved c_t
    (GRU: unread). out: float32 (T, B) ‖∂L/∂h_t‖ for GRU, (2, T, B) [‖∂L/∂h_t‖, ‖∂L/∂c_t‖] for LSTM.
    lengths as state_gradient_norms. A custom op under torch.compile, as state_gradient_norms."""
    if torch.compiler.is_compiling():
        torch.ops.elman_triton.cell_state_gradient_norms(G, dy, dz, dh_n, dc_n, weight_hh, gates, aux, reverse, out,
                                                         lengths)
    else:
        _write_cell_norms(G, dy, dz, dh_n, dc_n, weight_hh, gates, aux, reverse, out, lengths)


def _write_cell_norms(G, dy, dz, dh_n, dc_n, weight_hh, gates, aux, reverse, out, lengths):
    g = _through_weights(dy, dz.flatten(2), dh_n, weight_hh, reverse, lengths)
    gates = gates.to(g.dtype)
    if G == 3:  # the direct path: h_t reaches h_{t±1} scaled by that step's z
        out.copy_(_norms(_recursion(g, _next_step(gates[:, :, 1], reverse), reverse, lengths)))
        return
    tc = torch.tanh(aux.to(g.dtype))
    u = g * gates[:, :, 3] * (1 - tc * tc)  # through h_t = o_t ⊙ tanh(c_t)
    _add_at_last_step(u, dc_n.to(g.dtype), reverse, lengths)
    out[0].copy_(_norms(g))
    out[1].copy_(_norms(_recursion(u, _next_step(gates[:, :, 1], reverse), reverse, lengths)))


@torch.library.custom_op("elman_triton::state_gradient_norms", mutates_args=("out",))
def _state_gradient_norms_op(dy: torch.Tensor, dz: torch.Tensor, dh_n: torch.Tensor, weight_hh: torch.Tensor,
                             reverse: bool, out: torch.Tensor, lengths: torch.Tensor | None) -> None:
    _write_norms(dy, dz, dh_n, weight_hh, reverse, out, lengths)


@_state_gradient_norms_op.register_fake
def _(dy, dz, dh_n, weight_hh, reverse, out, lengths):
    return None


@torch.library.custom_op("elman_triton::cell_state_gradient_norms", mutates_args=("out",))
def _cell_state_gradient_norms_op(G: int, dy: torch.Tensor, dz: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor,
                                  weight_hh: torch.Tensor, gates: torch.Tensor, aux: torch.Tensor, reverse: bool,
                                  out: torch.Tensor, lengths: torch.Tensor | None) -> None:
    _write_cell_norms(G, dy, dz, dh_n, dc_n, weight_hh, gates, aux, reverse, out, lengths)


@_cell_state_gradient_norms_op.register_fake
def _(G, dy, dz, dh_n, dc_n, weight_hh, gates, aux, reverse, out, lengths):
    return None


def check_norms_buffer(out: torch.Tensor | None, shape: tuple[int, ...], device: torch.device,
                       dims: str = "(T, B)", owner: str = "") -> None:
    """A state_grad_norms argument: None, or a float32 tensor of this shape (named dims in messages, e.g.
    "(T, B)" for elman_rnn's, "(2, dirs, T, B)" for lstm_layer's; owner, e.g. " for the LSTM") on x's device."""
    if out is None:
        return
    if not torch.is_tensor(out):
        raise TypeError(f"state_grad_norms must be a tensor or None, got {type(out).__name__}")
    if out.dtype != torch.float32:
        raise TypeError(f"state_grad_norms must be float32, got {out.dtype}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"state_grad_norms{owner} must have shape {dims} = {tuple(shape)}, got {tuple(out.shape)}")
    if out.device != device:
        raise ValueError(f"state_grad_norms is on {out.device} but x is on {device}")
