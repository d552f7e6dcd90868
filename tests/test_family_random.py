"""Randomly drawn LSTM and GRU configurations through both Triton backends, against the float64 reference.

As tests/test_random_shapes.py does for the Elman cell: the hand-picked shapes of the other family tests
cover the known edges, these the combinations nobody picked. Each draw mixes the cell, the dtype, sizes
on either side of the kernels' tile and variant boundaries (BB = 16, the small-H limit
persistent.CELL_SMALL_H_MAX, above which backend="persistent" runs the large-H kernel over several
column programs), one or two directions, reverse, batch_first, lengths, biases and initial states. Values
(y, h_n, c_n) and the gradient of every input, state and weight are compared with the same layer run by
the reference loop in float64. Each test id draws its own configuration (conftest seeds torch from it),
so a failure names a reproducible case.
"""
import pytest
import torch

from elman_triton import persistent
from elman_triton.family_ops import GATES, run_cell_layer
from utils import TOLERANCE, rel_err

N_DRAWS = 8
H_MAX = 48  # the interpreter runs the large-H kernel's column programs one after another: keep it small


def draw():
    def pick(*choices):
        return choices[torch.randint(len(choices), ()).item()]

    def size(low, high):
        return torch.randint(low, high + 1, ()).item()
    cell, dtype = pick("lstm", "gru"), pick(torch.float32, torch.float64)
    small = persistent.CELL_SMALL_H_MAX[GATES[cell]][dtype]  # above it the persistent large-H kernel,
    large = min(H_MAX, persistent.CELL_LARGE_H_MAX[GATES[cell]][dtype])  # which holds next_pow2(H) up to its limit
    dirs = pick(1, 2)
    return dict(cell=cell, dtype=dtype, T=size(1, 3), B=pick(1, size(2, 9), 16, 17),
                D=size(1, 12), H=pick(size(1, small), size(small + 1, large)), dirs=dirs,
                reverse=dirs == 1 and pick(False, True), batch_first=pick(False, True), lengths=pick(False, True),
                bias=pick(True, False), states=pick(True, False))


def layer_inputs(c, device):
    """x, h0, c0, and per direction W_ih, W_hh, b_ih, b_hh (None where the draw has none), in c's dtype."""
    G, H, dirs = GATES[c["cell"]], c["H"], c["dirs"]

    def rand(*shape, scale=1.0):
        return (torch.rand(shape, dtype=c["dtype"], device=device) * 2 - 1) * scale
    x = rand(*((c["B"], c["T"]) if c["batch_first"] else (c["T"], c["B"])), c["D"])
    h0 = rand(dirs, c["B"], H) if c["states"] else None
    c0 = rand(dirs, c["B"], H) if c["states"] and c["cell"] == "lstm" else None
    s = H ** -0.5  # nn's init scale
    weights = [[rand(G * H, c["D"], scale=s) for _ in range(dirs)], [rand(G * H, H, scale=s) for _ in range(dirs)]]
    weights += [[rand(G * H, scale=s) for _ in range(dirs)] if c["bias"] else None for _ in range(2)]
    return x, h0, c0, weights


def run(c, x, h0, c0, weights, backend, lengths):
    y, (h_n, c_n) = run_cell_layer(c["cell"], x, h0, c0, *weights, backend=backend, reverse=c["reverse"],
                                   lengths=lengths, batch_first=c["batch_first"])
    return [y, h_n] + ([c_n] if c["cell"] == "lstm" else [])


@pytest.mark.parametrize("draw_index", range(N_DRAWS))
@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
def test_random_configuration(backend, draw_index, device):
    c = draw()
    x, h0, c0, weights = layer_inputs(c, device)
    lengths = torch.randint(1, c["T"] + 1, (c["B"],), device=device) if c["lengths"] else None
    leaves = [t for t in (x, h0, c0, *(w for group in weights if group is not None for w in group))
              if t is not None]
    twins = [t.detach().double().requires_grad_() for t in leaves]
    for t in leaves:
        t.requires_grad_()

    def as_reference(t):  # the float64 twin of a leaf (or None)
        return None if t is None else twins[next(i for i, leaf in enumerate(leaves) if leaf is t)]
    ref_weights = [None if group is None else [as_reference(w) for w in group] for group in weights]
    ours = run(c, x, h0, c0, weights, backend, lengths)
    expected = run(c, twins[0], as_reference(h0), as_reference(c0), ref_weights, "reference", lengths)
    tol = TOLERANCE[c["dtype"]]
    for name, got, want in zip(("y", "h_n", "c_n"), ours, expected):
        assert got.dtype == c["dtype"] and got.shape == want.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
        assert rel_err(got, want) < tol, f"{name}: relative error {rel_err(got, want):.2e} ({c})"
    cotangents = [torch.randn_like(t, dtype=torch.float64) for t in expected]
    grads = torch.autograd.grad(sum((w.to(t.dtype) * t).sum() for w, t in zip(cotangents, ours)), leaves)
    ref_grads = torch.autograd.grad(sum((w * t).sum() for w, t in zip(cotangents, expected)), twins)
    for i, (got, want) in enumerate(zip(grads, ref_grads)):
        assert rel_err(got, want) < tol, f"gradient of leaf {i}: relative error {rel_err(got, want):.2e} ({c})"
