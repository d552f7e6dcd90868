"""torch.func (vmap, per-sample gradients, jacrev, jvp, ensembles) and forward-mode AD through the LSTM and
GRU on every backend, against a Python loop over the vmapped dimension or the reference backend: the
family's counterpart of tests/test_func.py. auto on CPU runs the reference loop under these transforms
(torch.gru has no vmap rule, pytorch #134606).

Sizes are tiny and odd (the Triton backends run in Triton's interpreter without CUDA); float64 throughout.
"""
import pytest
import torch
from torch.func import functional_call, grad, hessian, jacrev, jvp, stack_module_state, vmap

from elman_triton.family import GRU, LSTM
from elman_triton.family_ops import run_cell_layer
from test_func import assert_all_close

BACKENDS = ["auto", "stepwise", "persistent"]
F64 = torch.float64
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T, N, B, D, H = 3, 3, 2, 2, 5  # N: the vmapped dimension
GATES = {"lstm": 4, "gru": 3}
MODULES = {"lstm": LSTM, "gru": GRU}


def rand(*shape):
    return torch.rand(shape, dtype=F64, device=DEVICE) * 2 - 1


def weights(cell, dirs=1):
    """One layer's (w_ih, w_hh, b_ih, b_hh), one tensor per direction each, scaled as nn's init."""
    G = GATES[cell]
    return [tuple(rand(*shape) * H ** -0.5 for _ in range(dirs)) for shape in ((G * H, D), (G * H, H), (G * H,), (G * H,))]


def layer(cell, backend, **options):
    """run_cell_layer as a function of (x, h0, c0, *weights) returning its tensors: (y, h_n[, c_n])."""
    def run(x, h0, c0, *w):
        ws = [w[k:k + len(w) // 4] for k in range(0, len(w), len(w) // 4)]
        y, (h_n, c_n) = run_cell_layer(cell, x, h0, c0 if cell == "lstm" else None, *ws, backend=backend, **options)
        return (y, h_n, c_n) if cell == "lstm" else (y, h_n)
    return run


def flat(w):
    return [t for ws in w for t in ws]


def stacked(results):
    return [torch.stack(r) for r in zip(*results)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_vmap_over_rows_matches_loop(cell, backend):
    """vmap over x, h0, c0 and lengths with shared weights (folded into B on the Triton backends), a
    bidirectional layer, batch-first with lengths and time-major without; and a vmapped h0 alone (the
    shared x expanded to every model's rows); against a loop over the vmapped dimension."""
    w = flat(weights(cell, dirs=2))
    h0, c0 = rand(N, 2, B, H), rand(N, 2, B, H)
    lengths = torch.randint(1, T + 1, (N, B), device=DEVICE)
    for batch_first, ls in ((True, lengths), (False, None)):
        x = rand(N, B, T, D) if batch_first else rand(N, T, B, D)

        def run(x, h0, c0, ls, batch_first=batch_first):
            return layer(cell, backend, lengths=ls, batch_first=batch_first)(x, h0, c0, *w)

        got = vmap(run, in_dims=(0, 0, 0, None if ls is None else 0))(x, h0, c0, ls)
        expected = stacked(run(x[i], h0[i], c0[i], None if ls is None else ls[i]) for i in range(N))
        assert_all_close(got, expected, f"vmap batch_first={batch_first}")
    got = vmap(run, in_dims=(None, 0, None, None))(x[0], h0, c0[0], None)
    assert_all_close(got, stacked(run(x[0], h0[i], c0[0], None) for i in range(N)), "vmap over h0")


def sample_loss(model, params, x, target):
    """One sample's loss (x: (T, D), as a batch of one row): y against target and the final states' squares."""
    y, hidden = functional_call(model, params, (x.unsqueeze(1),))
    return ((y[:, 0] - target) ** 2).sum() + sum(s.square().sum() for s in torch.utils._pytree.tree_leaves(hidden))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_per_sample_gradients_match_loop(cell, backend):
    """vmap(grad(loss)) over the samples of a batch through a bidirectional module, against one backward
    per sample: every parameter's gradient and the input's."""
    model = MODULES[cell](D, H, bidirectional=True, dtype=F64, device=DEVICE, backend=backend)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, target = rand(N, T, D), rand(N, T, 2 * H)
    got = vmap(grad(lambda p, x, t: sample_loss(model, p, x, t), argnums=(0, 1)), in_dims=(None, 0, 0))(params, x, target)
    for i in range(N):
        xi = x[i].clone().requires_grad_()
        expected = torch.autograd.grad(sample_loss(model, dict(model.named_parameters()), xi, target[i]),
                                       [*model.parameters(), xi])
        assert_all_close([got[0][k][i] for k in params] + [got[1][i]], expected, f"sample {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_jacrev_of_final_state_matches_reference(cell, backend):
    """∂h_T/∂h0, ∂h_T/∂c0 and ∂h_T/∂W_hh by jacrev, a reverse layer with lengths, against the reference's."""
    x, h0, c0 = rand(T, B, D), rand(1, B, H), rand(1, B, H)
    w = flat(weights(cell))
    lengths = torch.randint(1, T + 1, (B,), device=DEVICE)

    def final_state(h0, c0, w_hh, backend):
        return layer(cell, backend, reverse=True, lengths=lengths)(x, h0, c0, w[0], w_hh, *w[2:])[1]

    argnums = (0, 1, 2) if cell == "lstm" else (0, 2)
    got = jacrev(final_state, argnums=argnums)(h0, c0, w[1], backend)
    assert_all_close(got, jacrev(final_state, argnums=argnums)(h0, c0, w[1], "reference"), "jacrev")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_jvp_matches_reference(cell, backend):
    """Forward mode with a tangent on every input (x, h0, c0, every weight and bias), a bidirectional layer
    with lengths, batch-first, by torch.func.jvp and by torch.autograd.forward_ad, against the reference's
    jvp."""
    primals = (rand(B, T, D), rand(2, B, H), rand(2, B, H), *flat(weights(cell, dirs=2)))
    tangents = tuple(torch.randn_like(p) for p in primals)
    lengths = torch.randint(1, T + 1, (B,), device=DEVICE)

    def run(backend):
        return layer(cell, backend, lengths=lengths, batch_first=True)

    expected = jvp(run("reference"), primals, tangents)
    assert_all_close(jvp(run(backend), primals, tangents), expected, "torch.func.jvp")
    fwad = torch.autograd.forward_ad
    with fwad.dual_level():
        outs = run(backend)(*(fwad.make_dual(p, t) for p, t in zip(primals, tangents)))
        got = [fwad.unpack_dual(o) for o in outs]
    assert_all_close([g.primal for g in got] + [g.tangent for g in got], [*expected[0], *expected[1]], "forward_ad")


@pytest.mark.parametrize("cell, backend", [("lstm", "persistent"), ("gru", "stepwise")])  # the rules are the backends'
def test_forward_over_reverse_matches_reference(cell, backend):
    """Second derivatives through the kernels' backward by torch.func: jvp of grad (forward-over-reverse,
    the backward's own jvp), a bidirectional layer with lengths, and the Hessian with respect to h0 (at
    T = 1: vmap over the backward's jvp), against the reference's."""
    x, h0, c0 = rand(T, B, D), rand(2, B, H), rand(2, B, H)
    w = flat(weights(cell, dirs=2))
    lengths = torch.randint(1, T + 1, (B,), device=DEVICE)

    def loss(x, h0, backend):
        outs = layer(cell, backend, lengths=lengths.clamp(max=x.shape[0]))(x, h0, c0, *w)
        return outs[0].sin().sum() + sum(o.square().sum() for o in outs[1:])

    tangents = (torch.randn_like(x), torch.randn_like(h0))

    def second_order(backend):
        return jvp(lambda a, b: grad(loss, argnums=(0, 1))(a, b, backend), (x, h0), tangents)[1]

    assert_all_close(second_order(backend), second_order("reference"), "jvp(grad)")
    assert_all_close(hessian(loss, argnums=1)(x[:1], h0, backend), hessian(loss, argnums=1)(x[:1], h0, "reference"),
                     "hessian at T = 1")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_ensemble_vmap_matches_loop(cell, backend):
    """vmap over two models' stacked parameters (an ensemble), each with its own batch: outputs and the
    per-model gradients, against a loop over the models."""
    models = [MODULES[cell](D, H, dtype=F64, device=DEVICE, backend=backend) for _ in range(2)]
    params, buffers = stack_module_state(models)
    x = rand(2, T, B, D)

    def run(params, buffers, x):
        return functional_call(models[0], (params, buffers), (x,))

    def loss(out):
        return sum(o.square().sum() for o in torch.utils._pytree.tree_leaves(out))

    got = vmap(run)(params, buffers, x)
    assert_all_close(got, stacked(torch.utils._pytree.tree_leaves(m(x[i])) for i, m in enumerate(models)),
                     "ensemble outputs")
    g = vmap(grad(lambda p, b, x: loss(run(p, b, x))))(params, buffers, x)
    for i, m in enumerate(models):
        expected = torch.autograd.grad(loss(m(x[i])), list(m.parameters()))
        assert_all_close([g[k][i] for k, _ in m.named_parameters()], expected, f"ensemble grads {i}")


def test_compiled_vmap_grad_matches_eager():
    """torch.compile of per-sample gradients (vmap(grad(...)) over an LSTM on the Triton path) gives the
    eager ones (the layer runs eagerly there: a graph break, as custom ops have no torch.func autograd)."""
    torch.compiler.reset()
    model = LSTM(D, H, dtype=F64, device=DEVICE, backend="stepwise")
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, target = rand(N, T, D), rand(N, T, H)
    per_sample = vmap(grad(lambda p, x, t: sample_loss(model, p, x, t)), in_dims=(None, 0, 0))
    expected = per_sample(params, x, target)
    assert_all_close(torch.compile(per_sample, backend="aot_eager")(params, x, target), expected, "compiled vmap(grad)")
    torch.compiler.reset()
