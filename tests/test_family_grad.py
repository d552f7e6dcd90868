"""The LSTM's and GRU's second derivatives and per-step state gradients on the Triton path, in float64:

- double backward (create_graph=True) through the kernels' backward against torch.nn.LSTM / nn.GRU's own
  double backward (CPU, float64): the gradient of a gradient, for every input (x, h0, c0) and weight;
- state_grad_norms (‖∂L/∂h_t‖, and the LSTM's ‖∂L/∂c_t‖, from the backward the op already runs) at the op
  level: record_state_gradients' buffers and views, fullgraph torch.compile, the functional ops' buffers
  and errors, proj_size. The norms through the modules on every backend against a retain_grad loop, and
  eval-mode backward: tests/test_family_modules.py.

Tiny odd shapes (H and B not powers of two, T = 1): the kernels run in Triton's interpreter without CUDA.
"""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from elman_triton.family import LSTM
from elman_triton.family_ops import gru, lstm, run_cell_layer
from elman_triton.reference import lstm_reference
from utils import rel_err

F64 = torch.float64
NN = {"lstm": nn.LSTM, "gru": nn.GRU}


def rand(*shape, device):
    return torch.randn(*shape, dtype=F64, device=device, requires_grad=True)


def nn_layer(cell, device, **kwargs):
    return NN[cell](dtype=F64, device=device, bidirectional=True, **kwargs)


def cotangent(t, generator):
    return torch.randn(t.shape, dtype=t.dtype, generator=generator).to(t.device)  # in t's logical order


DOUBLE_BACKWARD_CASES = {  # (T, B, D, H, batch_first, with lengths)
    "batch-first-lengths": (3, 3, 2, 5, True, True),
    "T1-time-major": (1, 3, 2, 3, False, False),
}


@pytest.mark.parametrize("case", DOUBLE_BACKWARD_CASES)
@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_double_backward_matches_nn(cell, backend, case, device):
    """Both directions in one layer: the gradient of a random projection of the first gradients (taken
    with create_graph=True through the kernels) with respect to x, h0, c0 and every weight, against
    nn's float64 double backward on CPU (packed input where the rows have lengths)."""
    check_double_backward(cell, backend, DOUBLE_BACKWARD_CASES[case], device)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_double_backward_on_the_large_kernel(cell, monkeypatch, device):
    """The same through the persistent large-H kernel (forced at small H, as tests/test_family_large.py does)."""
    from elman_triton import persistent
    from utils import count_launches

    monkeypatch.setattr(persistent, "CELL_SMALL_H_MAX", {G: dict.fromkeys(limits, 0)
                                                         for G, limits in persistent.CELL_SMALL_H_MAX.items()})
    monkeypatch.setattr(persistent, "_PLANS", {})
    fwd, bwd = count_launches(monkeypatch, persistent, "rnn_persistent_large_fwd_kernel",
                              "rnn_persistent_large_bwd_kernel")
    check_double_backward(cell, "persistent", DOUBLE_BACKWARD_CASES["batch-first-lengths"], device)
    assert fwd.launches and bwd.launches


def check_double_backward(cell, backend, case, device):
    T, B, D, H, batch_first, with_lengths = case
    ref = nn_layer(cell, "cpu", input_size=D, hidden_size=H, batch_first=batch_first)
    x = rand(*((B, T, D) if batch_first else (T, B, D)), device="cpu")
    h0, c0 = rand(2, B, H, device="cpu"), rand(2, B, H, device="cpu")
    lengths = torch.tensor([2, 3, 1][:B]) if with_lengths else None
    states = [h0, c0] if cell == "lstm" else [h0]

    def ours():
        leaves = [t.detach().to(device).requires_grad_() for t in [x, *states, *ref.parameters()]]
        w = [tuple(leaves[len(states) + 1 + k::4]) for k in range(4)]
        y, (h_n, c_n) = run_cell_layer(cell, leaves[0], leaves[1], leaves[2] if cell == "lstm" else None, *w,
                                       backend=backend, batch_first=batch_first,
                                       lengths=None if lengths is None else lengths.to(device))
        return leaves, [y, h_n] + ([c_n] if cell == "lstm" else [])

    def theirs():
        leaves = [x, *states, *ref.parameters()]
        inp = x if lengths is None else pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        y, hidden = ref(inp, tuple(states) if cell == "lstm" else h0)
        if lengths is not None:
            y = pad_packed_sequence(y, batch_first=batch_first, total_length=T)[0]
        return leaves, [y, *(hidden if cell == "lstm" else [hidden])]

    results = []
    for run in (ours, theirs):
        leaves, outs = run()
        g = torch.Generator().manual_seed(1)
        first = torch.autograd.grad(sum((o.sin() * cotangent(o, g)).sum() for o in outs), leaves, create_graph=True)
        g = torch.Generator().manual_seed(2)
        second = torch.autograd.grad(sum((f * cotangent(f, g)).sum() for f in first), leaves)
        results.append((first, second))
    names = ["x", "h0"] + (["c0"] if cell == "lstm" else []) + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, results[0][0], results[1][0]):
        assert rel_err(a, b) <= 1e-12, f"first-order {name}"
    for name, a, b in zip(names, results[0][1], results[1][1]):
        assert rel_err(a, b) <= 1e-10, f"second-order {name}: {rel_err(a, b):.2e}"


# ------------------------------------------------------------------------------------ state gradients

def test_recorder_buffers_and_views(device):
    """record_state_gradients' side of the hook protocol for the LSTM, driven as the modules drive it (one
    buffer per layer from the hook, each handed to run_cell_layer, the rows of a packed batch sorted):
    the buffers' shapes (2, dirs, T, B), .norms / .per_sample for h and .cell_norms / .cell_per_sample
    for c, in nn's h_n order and the caller's row order."""
    from elman_triton.diagnostics import record_state_gradients

    cell = "lstm"
    T, B, D = 3, 3, 2
    module = LSTM(D, 4, num_layers=2, bidirectional=True, dtype=F64, device=device, backend="stepwise")
    unsorted = torch.tensor([2, 0, 1], device=device)
    lengths = torch.tensor([3, 2, 1], device=device)  # sorted rows
    with record_state_gradients(module, per_sample=True) as rec:
        buffers = module.state_grad_norms_hook(T, B, device, unsorted)
        assert [tuple(b.shape) for b in buffers] == [(2, 2, T, B)] * 2
        x = torch.randn(T, B, D, dtype=F64, device=device, requires_grad=True)
        for k, buf in enumerate(buffers):
            w = [tuple(module.all_weights[2 * k + d][j] for d in range(2)) for j in range(4)]
            x, _ = run_cell_layer(cell, x, None, None, *w, backend="stepwise", lengths=lengths, state_grad_norms=buf)
        x.square().sum().backward()
        for kind, (total, per_row) in enumerate([("norms", "per_sample"), ("cell_norms", "cell_per_sample")]):
            want = torch.cat([b[kind] for b in buffers])[:, :, unsorted]  # (4, T, B)
            assert torch.equal(getattr(rec, per_row), want)
            assert rel_err(getattr(rec, total), want.double().norm(dim=2)) <= 1e-6



def test_state_gradient_norms_under_torch_compile(device):
    """fullgraph torch.compile of a bidirectional batch-first LSTM layer with lengths and a (2, dirs, T, B)
    norms buffer made outside: the norm writer is a custom op in the compiled backward (each direction's
    h and c rows written through views); the same norms as eager."""
    T, B, D, H = 3, 2, 2, 5
    x = rand(B, T, D, device=device)
    w = [tuple(rand(*shape, device=device) for _ in range(2)) for shape in ((4 * H, D), (4 * H, H), (4 * H,), (4 * H,))]
    lengths = torch.tensor([3, 2], device=device)

    def loss(x, buf):
        y, (h_n, _) = run_cell_layer("lstm", x, None, None, *w, backend="stepwise", lengths=lengths, batch_first=True,
                                     state_grad_norms=buf, lengths_are_valid=True)
        return y.square().sum() + h_n.sum()

    eager, compiled = torch.zeros(2, 2, T, B, device=device), torch.zeros(2, 2, T, B, device=device)
    loss(x, eager).backward()
    torch.compiler.reset()
    torch.compile(loss, fullgraph=True, backend="aot_eager")(x, compiled).backward()
    torch.compiler.reset()
    assert (eager[..., :2, :] > 0).all() and (eager[..., 2, 0] > 0).all() and (eager[..., 2, 1] == 0).all()  # padding
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_functional_ops_state_gradient_norms(cell, device):
    """lstm / gru (one direction, reverse, batch-first) take a (2, T, B) / (T, B) buffer: the stepwise
    kernels' norms equal the reference loop's; a buffer of the wrong shape or dtype is refused by name."""
    T, B, D, H = 3, 2, 2, 3
    G = 4 if cell == "lstm" else 3
    x = rand(B, T, D, device=device)
    w = [rand(*shape, device=device) for shape in ((G * H, D), (G * H, H), (G * H,), (G * H,))]
    op = lstm if cell == "lstm" else gru
    shape = (2, T, B) if cell == "lstm" else (T, B)
    buffers = {}
    for backend in ("stepwise", "reference"):
        buffers[backend] = torch.zeros(shape, device=device)
        y, state = op(x, None, *w, backend=backend, reverse=True, batch_first=True, state_grad_norms=buffers[backend])
        (y.square().sum() + sum(s.sum() for s in (state if cell == "lstm" else (state,)))).backward()
    assert buffers["reference"].all() and rel_err(buffers["stepwise"], buffers["reference"]) <= 1e-6
    with pytest.raises(ValueError, match=r"state_grad_norms for the .* must have shape"):
        op(x, None, *w, backend="stepwise", batch_first=True, state_grad_norms=torch.zeros(B, T, device=device))
    with pytest.raises(TypeError, match="state_grad_norms must be float32"):
        op(x, None, *w, backend="stepwise", batch_first=True,
           state_grad_norms=torch.zeros(shape, dtype=F64, device=device))


def test_state_gradient_norms_with_proj_size(device):
    """proj_size (the reference loop on every backend): [0] is ‖∂L/∂h_t‖ of the projected state h_t,
    [1] ‖∂L/∂c_t‖; against a retain_grad loop of the reference's single steps, with lengths."""
    T, B, D, H, P = 3, 2, 2, 4, 3
    lengths = torch.tensor([3, 1])
    w = [rand(*shape, device="cpu") for shape in ((4 * H, D), (4 * H, P), (4 * H,), (4 * H,), (P, H))]
    x, h0, c0 = rand(T, B, D, device="cpu"), rand(B, P, device="cpu"), rand(B, H, device="cpu")
    g = torch.Generator().manual_seed(4)
    dy = cotangent(torch.empty(T, B, P), g)
    active = (torch.arange(T).unsqueeze(1) < lengths).unsqueeze(2)
    h, c, kept, ys = h0, c0, [], []
    for t in range(T):
        _, h_new, c_new = lstm_reference(x[t:t + 1], h, c, *w)
        for s in (h_new, c_new):
            s.retain_grad()
        kept.append((h_new, c_new))
        h, c = torch.where(active[t], h_new, h), torch.where(active[t], c_new, c)
        ys.append(torch.where(active[t], h, 0.0))
    (torch.stack(ys) * dy).sum().backward()
    expected = torch.stack([torch.stack([s[k].grad.norm(dim=1) for s in kept]) for k in range(2)]) * active[..., 0]

    norms = torch.zeros(2, 1, T, B, device=device)
    def leaf(t):
        return t.detach().to(device).requires_grad_()
    y, _ = run_cell_layer("lstm", leaf(x), leaf(h0[None]), leaf(c0[None]), *[(leaf(t),) for t in w],
                          backend="stepwise", lengths=lengths.to(device), state_grad_norms=norms)
    assert not norms.any()  # nothing before the backward
    (y * dy.to(device)).sum().backward()
    assert rel_err(norms[:, 0], expected) <= 1e-6
