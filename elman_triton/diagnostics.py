"""The gradient through time: ‖∂L/∂h_t‖ per step, taken from the backward pass the op already runs.

∂L/∂h_t here is the total derivative of the loss with respect to the state at step t: every path,
through later steps, later layers and h_n. For one layer and direction the op's backward holds the
pieces: with dz_t = ∂L/∂z_t (the pre-activation gradient the recurrence kernels write),

    g_t = dy_t + dz_{t+1} W_hh      (dz_{t-1} W_hh in reverse; ∂z_{t+1}/∂h_t = W_hh)
    g at the last processed step = dy + dh_n

so recording costs one GEMM (dz shifted one step @ W_hh) and a norm, never a second backward.

record_state_gradients(module) gathers those per-step norms for every layer and direction of an
ElmanRNN (or every call of an ElmanRNNCell) while a context is open; outside it nothing is recorded
and nothing costs more.
"""
import contextlib

import torch
from torch.nn.utils.rnn import PackedSequence

__all__ = ["StateGradients", "record_state_gradients", "state_gradient_norms"]


def state_gradient_norms(dy, dz, dh_n, weight_hh, reverse, out, lengths=None):
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


@contextlib.contextmanager
def record_state_gradients(module, per_sample=False):
    """Record ‖∂L/∂h_t‖₂ for each layer and direction of module while the context is open.

        with elman_triton.record_state_gradients(rnn) as rec:
            y, h_n = rnn(x, h0)
            loss.backward()
        rec.norms      # float32 (num_layers * num_directions, T) on the module's device

    rec.norms[k, t] is the norm over batch and hidden units of the total derivative of the loss with
    respect to layer/direction k's state at input-order step t (k in nn.RNN's h_n order): every path
    counts, through later steps, later layers and h_n. With per_sample=True, rec.per_sample holds the
    (num_layers * num_directions, T, B) norms per batch row as well (B in the caller's row order,
    time-major whatever batch_first is). For packed input T is the longest length and steps past a
    row's length are zero.

    The norms come from the backward the op runs anyway (elman_rnn's state_grad_norms: one extra GEMM
    per layer and direction); they are filled when backward reaches each layer, and read after it.
    For ElmanRNN, rec describes the latest forward call inside the context. For ElmanRNNCell each call
    is one step: rec.norms is (1, number of calls), t in call order.

    Under torch.compile: elman_rnn(state_grad_norms=buffer) with a buffer made outside the compiled
    function works inside one graph (fullgraph=True). A torch.compile'd module inside this context
    runs its recorded calls eagerly (the compiler cannot return a buffer created inside a graph and
    written by that graph's backward), so fullgraph=True refuses them with Dynamo's "found no compiled
    frames" error.

    Cost: with backend="auto" on CPU (PyTorch's native kernel, which exposes no per-step gradient)
    the recorded calls run the reference loop instead, which is slower; CUDA and the Triton
    backends run their own kernels. The context replaces module.forward with a recording wrapper and,
    during each call, routes the module's op calls (elman_triton.modules.run_layer and elman_rnn) through it;
    both are restored on exit. Not thread-safe while open.
    """
    from elman_triton.modules import ElmanRNN, ElmanRNNCell  # ops imports this module: import late

    if not isinstance(module, (ElmanRNN, ElmanRNNCell)):
        raise TypeError(f"record_state_gradients needs an ElmanRNN or ElmanRNNCell, got {type(module).__name__}")
    if "forward" in vars(module):
        raise RuntimeError("module.forward is already replaced (a record_state_gradients context already open?)")
    rec = StateGradients(module, per_sample)
    # Inductor rejects a buffer created inside a graph and written by that graph's backward ("Node ... was
    # invalid, but is output"), so recorded calls of a torch.compile'd module run eagerly.
    module.forward = torch.compiler.disable(rec._recording_forward)
    try:
        yield rec
    finally:
        del module.forward


class StateGradients:
    """What record_state_gradients yields: .norms (and .per_sample), read after backward."""

    def __init__(self, module, per_sample):
        self._module, self._want_per_sample = module, per_sample
        self._cell = not hasattr(module, "num_layers")
        self._calls = []  # one entry per recorded forward: (buffers, lengths, unsorted_indices)

    @property
    def norms(self):
        """(num_layers * num_directions, T) float32 norms over batch and hidden units."""
        return torch.linalg.vector_norm(self._per_sample(), dim=2, dtype=torch.float64).float()  # no fp32 underflow

    @property
    def per_sample(self):
        """(num_layers * num_directions, T, B) float32 norms over hidden units, per batch row."""
        if not self._want_per_sample:
            raise AttributeError("per-sample norms were not requested: use record_state_gradients(module, per_sample=True)")
        return self._per_sample()

    def _per_sample(self):
        if not self._calls:
            raise RuntimeError("nothing recorded: call the module inside the record_state_gradients context")
        if self._cell:  # each call is one step: (1, calls, B)
            return torch.cat([buffers[0] for buffers, _ in self._calls]).unsqueeze(0)
        buffers, unsorted_indices = self._calls[-1]
        per_sample = torch.cat(buffers)  # each layer's (directions, T, B), in nn.RNN's h_n order
        return per_sample if unsorted_indices is None else per_sample[:, :, unsorted_indices]

    def _recording_forward(self, input, hx=None):
        """The module's own forward, with a norm buffer handed to each of its op calls (a layer's
        (directions, T, B) for ElmanRNN, (1, B) for a cell step). Packed input runs as one padded,
        length-sorted batch with the lengths in the kernels, so every buffer is in input time order
        and sorted row order."""
        from elman_triton import modules

        unsorted_indices = input.unsorted_indices if isinstance(input, PackedSequence) else None
        buffers, layer_op, cell_op = [], modules.run_layer, modules.elman_rnn

        def recording_layer(x, h0, weights_ih, *args, batch_first=False, **kwargs):
            T, B = (x.shape[1], x.shape[0]) if batch_first else x.shape[:2]
            buffers.append(torch.zeros(len(weights_ih), T, B, dtype=torch.float32, device=x.device))
            return layer_op(x, h0, weights_ih, *args, batch_first=batch_first, state_grad_norms=buffers[-1],
                            **kwargs)

        def recording_cell(x, *args, **kwargs):
            buffers.append(torch.zeros(x.shape[:2], dtype=torch.float32, device=x.device))
            return cell_op(x, *args, state_grad_norms=buffers[-1], **kwargs)

        modules.run_layer, modules.elman_rnn = recording_layer, recording_cell
        try:
            output = type(self._module).forward(self._module, input, hx)
        finally:
            modules.run_layer, modules.elman_rnn = layer_op, cell_op
        call = (buffers, unsorted_indices)
        self._calls = self._calls + [call] if self._cell else [call]  # a cell call is a step; a module call, a pass
        return output


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


def check_norms_buffer(out, x):
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
