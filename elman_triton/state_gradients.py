"""The kernels' side of the gradient through time: ‖∂L/∂h_t‖ per step, from the backward pass the op already runs.

∂L/∂h_t here is the total derivative of the loss with respect to the state at step t: every path,
through later steps, later layers and h_n. For one layer and direction the op's backward holds the
pieces: with dz_t = ∂L/∂z_t (the pre-activation gradient the recurrence kernels write),

    g_t = dy_t + dz_{t+1} W_hh      (dz_{t-1} W_hh in reverse; ∂z_{t+1}/∂h_t = W_hh)
    g at the last processed step = dy + dh_n

so recording costs one GEMM (dz shifted one step @ W_hh) and a norm, never a second backward.

This module sits below the ops (elman_triton.ops calls state_gradient_norms from its backward and
check_norms_buffer on elman_rnn's state_grad_norms argument) and imports nothing of the package. The
recording context for whole modules, record_state_gradients, is a research tool above the modules
(elman_triton.diagnostics).
"""
import torch

__all__ = ["check_norms_buffer", "state_gradient_norms"]


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
    T, B, _ = dz.shape
    dtype = torch.promote_types(dz.dtype, torch.float32)  # 16-bit gradients are summed in fp32
    weight_hh = weight_hh.to(dtype)
    if lengths is not None:
        valid = (torch.arange(T, device=dz.device).unsqueeze(1) < lengths).unsqueeze(2)  # (T, B, 1)
        dz = dz * valid  # whatever a padded step holds must not reach its neighbour
    g = dy.to(dtype, copy=True)
    if reverse:
        g[1:] += dz[:-1].to(dtype) @ weight_hh
    else:
        g[:-1] += dz[1:].to(dtype) @ weight_hh
    if lengths is None:
        g[0 if reverse else -1] += dh_n.to(dtype)
    else:
        last = torch.zeros_like(lengths) if reverse else lengths - 1
        rows = torch.arange(B, device=dz.device)
        g.index_put_((last, rows), dh_n.to(dtype), accumulate=True)
        g *= valid
    out.copy_(torch.linalg.vector_norm(g, dim=2, dtype=torch.float64))  # fp32 squares underflow below 1e-19


@torch.library.custom_op("elman_triton::state_gradient_norms", mutates_args=("out",))
def _state_gradient_norms_op(dy: torch.Tensor, dz: torch.Tensor, dh_n: torch.Tensor, weight_hh: torch.Tensor,
                             reverse: bool, out: torch.Tensor, lengths: torch.Tensor | None) -> None:
    _write_norms(dy, dz, dh_n, weight_hh, reverse, out, lengths)


@_state_gradient_norms_op.register_fake
def _(dy, dz, dh_n, weight_hh, reverse, out, lengths):
    return None


def check_norms_buffer(out: torch.Tensor | None, x: torch.Tensor) -> None:
    """elman_rnn's state_grad_norms argument: a float32 (T, B) tensor on x's device, or None."""
    if out is None:
        return
    if not torch.is_tensor(out):
        raise TypeError(f"state_grad_norms must be a tensor or None, got {type(out).__name__}")
    if out.dtype != torch.float32:
        raise TypeError(f"state_grad_norms must be float32, got {out.dtype}")
    if tuple(out.shape) != tuple(x.shape[:2]):
        raise ValueError(f"state_grad_norms must have shape (T, B) = {tuple(x.shape[:2])}, got {tuple(out.shape)}")
    if out.device != x.device:
        raise ValueError(f"state_grad_norms is on {out.device} but x is on {x.device}")
