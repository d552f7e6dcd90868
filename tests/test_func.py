"""torch.func (vmap, per-sample gradients, jacrev, jvp, ensembles), forward-mode AD and the custom ops'
registrations, on every backend, against a Python loop over the vmapped dimension or the reference.

Sizes are tiny and odd (the Triton backends run in Triton's interpreter without CUDA). Everything is
float64, so agreement is to TOLERANCE[float64].
"""
import importlib.util
import os
import warnings

import pytest
import torch
from torch.func import functional_call, grad, jacrev, jvp, stack_module_state, vmap

from elman_triton import GRU, LSTM, ElmanRNN, elman_rnn, elman_rnn_layer
from utils import TOLERANCE, rel_err

BACKENDS = ["auto", "stepwise", "persistent", "reference"]
F64 = torch.float64
TOL = TOLERANCE[F64]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T, N, B, D, H = 3, 3, 2, 2, 5  # N: the vmapped dimension


def rand(*shape):
    return torch.rand(shape, dtype=F64, device=DEVICE) * 2 - 1


def weights(dirs=1):
    """One layer's weights per direction, scaled as nn.RNN's init."""
    s = H ** -0.5
    return [tuple(rand(*shape) * s for _ in range(dirs)) for shape in ((H, D), (H, H), (H,), (H,))]


def assert_all_close(got, expected, label):
    got, expected = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)
    assert len(got) == len(expected), label
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape, f"{label}[{i}]: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert rel_err(a, b) < TOL, f"{label}[{i}]: relative error {rel_err(a, b):.2e}"


def lengths_for(batch, steps):
    return torch.randint(1, steps + 1, (batch,), device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_vmap_over_rows_matches_loop(backend, batch_first):
    """vmap over x, h0 and lengths with shared weights (folded into B on the Triton backends), a
    bidirectional layer, against a loop over the vmapped dimension."""
    w = weights(dirs=2)
    x = rand(N, B, T, D) if batch_first else rand(N, T, B, D)
    h0, lengths = rand(N, 2, B, H), torch.stack([lengths_for(B, T) for _ in range(N)])

    def run(x, h0, lengths):
        return elman_rnn_layer(x, h0, *w, backend=backend, lengths=lengths, batch_first=batch_first)

    # auto on CPU runs the reference for variable lengths only in reverse; without lengths it is the
    # native kernel, which has no vmap rule of its own: both cases are checked
    for ls in (lengths, None):
        got = vmap(run, in_dims=(0, 0, None if ls is None else 0))(x, h0, ls)
        expected = [torch.stack(r) for r in zip(*(run(x[i], h0[i], None if ls is None else ls[i]) for i in range(N)))]
        assert_all_close(got, expected, f"vmap lengths={ls is not None}")
    # a vmapped h0 only: the shared x is expanded to every model's rows
    got = vmap(run, in_dims=(None, 0, None))(x[0], h0, None)
    expected = [torch.stack(r) for r in zip(*(run(x[0], h0[i], None) for i in range(N)))]
    assert_all_close(got, expected, "vmap over h0")


def small_model(backend, **kwargs):
    return ElmanRNN(D, H, num_layers=2, dtype=F64, device=DEVICE, backend=backend, **kwargs)


def sample_loss(model, params, x, target):
    """One sample's loss (x: (T, D) unbatched... as a batch of one row)."""
    y, h_n = functional_call(model, params, (x.unsqueeze(1),))
    return ((y[:, 0] - target) ** 2).sum() + h_n.square().sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients_match_loop(backend):
    """vmap(grad(loss)) over the samples of a batch, against one backward per sample; the gradients of
    every parameter and of the input."""
    model = small_model(backend, bidirectional=True)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, target = rand(N, T, D), rand(N, T, 2 * H)
    got = vmap(grad(lambda p, x, t: sample_loss(model, p, x, t), argnums=(0, 1)), in_dims=(None, 0, 0))(params, x, target)
    for i in range(N):
        xi = x[i].clone().requires_grad_()
        loss = sample_loss(model, dict(model.named_parameters()), xi, target[i])
        expected = torch.autograd.grad(loss, [*model.parameters(), xi])
        assert_all_close([got[0][k][i] for k in params] + [got[1][i]], expected, f"sample {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_jacrev_of_final_state_matches_reference(backend, reverse):
    """∂h_T/∂h0 (the tool of Lyapunov and stability analyses) and ∂h_T/∂W_hh by jacrev, against the
    reference's."""
    x, h0, lengths = rand(T, B, D), rand(B, H), lengths_for(B, T)
    w_ih, w_hh, b_ih, b_hh = (w[0] for w in weights())

    def final_state(h0, w_hh, backend):
        return elman_rnn(x, h0, w_ih, w_hh, b_ih, b_hh, backend=backend, reverse=reverse, lengths=lengths)[1]

    got = jacrev(final_state, argnums=(0, 1))(h0, w_hh, backend)
    expected = jacrev(final_state, argnums=(0, 1))(h0, w_hh, "reference")
    assert_all_close(got, expected, "jacrev")


@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_matches_reference(backend):
    """Forward mode with a tangent on every input (x, h0, both weights, both biases), a bidirectional
    layer with variable lengths, by torch.func.jvp and by torch.autograd.forward_ad, against the
    reference's jvp."""
    primals = (rand(T, B, D), rand(2, B, H), *weights(dirs=2))
    tangents = tuple(torch.utils._pytree.tree_map(torch.randn_like, p) for p in primals)
    lengths = lengths_for(B, T)

    def run(backend):
        return lambda x, h0, *w: elman_rnn_layer(x, h0, *w, backend=backend, lengths=lengths)

    expected = jvp(run("reference"), primals, tangents)
    assert_all_close(jvp(run(backend), primals, tangents), expected, "torch.func.jvp")
    fwad = torch.autograd.forward_ad
    with fwad.dual_level():
        duals = torch.utils._pytree.tree_map(fwad.make_dual, primals, tangents)
        outs = run(backend)(*duals)
        got = [fwad.unpack_dual(o) for o in outs]
    assert_all_close([g.primal for g in got] + [g.tangent for g in got], [*expected[0], *expected[1]],
                     "forward_ad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ensemble_vmap_matches_loop(backend):
    """vmap over N models' stacked parameters (an ensemble), each with its own batch, against a loop
    over the models."""
    models = [small_model(backend) for _ in range(2)]
    params, buffers = stack_module_state(models)
    x = rand(2, T, B, D)

    def run(params, buffers, x):
        return functional_call(models[0], (params, buffers), (x,))

    got = vmap(run)(params, buffers, x)
    expected = [torch.stack(r) for r in zip(*(m(x[i]) for i, m in enumerate(models)))]
    assert_all_close(got, expected, "ensemble outputs")
    g = vmap(grad(lambda p, b, x: sum(o.square().sum() for o in run(p, b, x))))(params, buffers, x)
    for i, m in enumerate(models):
        expected = torch.autograd.grad(sum(o.square().sum() for o in m(x[i])), list(m.parameters()))
        assert_all_close([g[k][i] for k, _ in m.named_parameters()], expected, f"ensemble grads {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_through_kernels_matches_reference(backend):
    """create_graph=True through the kernels' backward (its own backward is the PyTorch loop's): the
    gradient of a gradient norm, against the reference's."""
    x, h0 = rand(T, B, D), rand(B, H)
    w = [w[0] for w in weights()]

    def second_order(backend):
        leaves = [t.clone().requires_grad_() for t in (x, h0, *w)]
        y, h_n = elman_rnn(*leaves, backend=backend)
        g = torch.autograd.grad((y.sin().sum() + h_n.square().sum()), leaves, create_graph=True)
        return torch.autograd.grad(sum(t.square().sum() for t in g), leaves)

    assert_all_close(second_order(backend), second_order("reference"), "double backward")


@pytest.mark.parametrize("lengths", [None, (2, 1, 3)])
@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
def test_custom_ops_pass_full_opcheck(backend, lengths):
    """Both Triton ops, every opcheck test (AOT dispatch, dynamic included): the backward op is itself
    differentiable now. And vmap over the ops matches a loop."""
    dirs, Hp, B_ = 2, 16, 3
    x = rand(T, B_, D)
    w_ih = rand(dirs, Hp, D) * 0.3
    w_ih[:, H:] = 0  # the padding rows of W_ih: xp's padding columns are zero, as the op makes them
    xp = (x @ w_ih.reshape(dirs * Hp, D).T).requires_grad_()
    h0 = rand(dirs, B_, H).requires_grad_()
    w_hh = (rand(dirs, H, H) * 0.3).requires_grad_()
    bias = rand(dirs, H).requires_grad_()
    lengths = None if lengths is None else torch.tensor(lengths, device=DEVICE)
    options = ("tanh", False, False, backend)
    torch.library.opcheck(torch.ops.elman_triton.recurrence, (xp, h0, w_hh, bias, lengths, None, *options))
    y, _ = torch.ops.elman_triton.recurrence(xp, h0, w_hh, bias, lengths, None, *options)
    dy, dh_n = rand(*y.shape), rand(*h0.shape)
    torch.library.opcheck(torch.ops.elman_triton.recurrence_backward,
                          (dy.requires_grad_(), dh_n.requires_grad_(), y.detach().requires_grad_(),
                           w_hh.detach().requires_grad_(), lengths, *options))
    xps, h0s = torch.stack([xp.detach(), xp.detach().flip(1)]), torch.stack([h0.detach(), -h0.detach()])
    got = vmap(lambda a, b: torch.ops.elman_triton.recurrence(a, b, w_hh.detach(), bias.detach(), lengths, None,
                                                              *options))(xps, h0s)
    expected = [torch.stack(r) for r in zip(*(torch.ops.elman_triton.recurrence(
        xps[i], h0s[i], w_hh.detach(), bias.detach(), lengths, None, *options) for i in range(2)))]
    assert_all_close(got, expected, "vmap over the op")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_native_ops_pass_opcheck(bidirectional):
    """The custom op around PyTorch's native CPU kernel (auto on CPU under torch.compile): every opcheck
    test, AOT dispatch of its backward op included (opcheck's own fake cross-check cannot run that
    op's torch.func.vjp under its dispatch mode, so the backward op is checked through this one)."""
    dirs = 2 if bidirectional else 1
    x = rand(T, B, D).requires_grad_()
    hx = rand(dirs, B, H).requires_grad_()
    params = [torch.stack(w).requires_grad_() for w in weights(dirs)]
    torch.library.opcheck(torch.ops.elman_triton.native_layer, (x, hx, *params, "tanh", True, False))


@pytest.mark.parametrize("backend", ["auto", "stepwise"])
def test_compiled_vmap_grad_matches_eager(backend):
    """torch.compile of per-sample gradients (vmap(grad(...)) over ElmanRNN) gives the eager ones (the
    layer itself runs eagerly there: a graph break, as custom ops have no torch.func autograd)."""
    torch.compiler.reset()
    model = ElmanRNN(D, H, dtype=F64, device=DEVICE, backend=backend)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, target = rand(N, T, D), rand(N, T, H)
    per_sample = vmap(grad(lambda p, x, t: sample_loss(model, p, x, t)), in_dims=(None, 0, 0))
    expected = per_sample(params, x, target)
    got = torch.compile(per_sample, backend="aot_eager")(params, x, target)
    assert_all_close(got, expected, "compiled vmap(grad)")
    torch.compiler.reset()


def test_per_sample_gradients_example_quick(tmp_path):
    """examples/per_sample_gradients.py --quick: per-sample gradients agree with a loop, and DP-SGD
    training lowers the loss."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "per_sample_gradients.py")
    spec = importlib.util.spec_from_file_location("per_sample_gradients", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--out", str(tmp_path)])
    assert result["max_rel_err"] < 1e-5
    assert result["final_loss"] < 0.8 * result["first_loss"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_dynamic_T_and_B_without_warnings(backend):
    """torch.export.export of a two-layer bidirectional ElmanRNN with T and B dynamic: no warnings, and
    the exported program matches eager on inputs of new sizes."""
    model = ElmanRNN(D, H, num_layers=2, bidirectional=True, batch_first=True, dtype=F64, device=DEVICE,
                     backend=backend)
    x, h0 = rand(B, T, D), rand(4, B, H)
    steps, rows = torch.export.Dim("T", min=1, max=64), torch.export.Dim("B", min=2, max=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.export.export(model, (x, h0), dynamic_shapes=({0: rows, 1: steps}, {1: rows}))
    # (torch's own modules may warn of their deprecations, torch.jit's, while export imports them)
    assert [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)] == []
    for shape in ((3, 5), (2, 1)):
        x, h0 = rand(*shape, D), rand(4, shape[0], H)
        assert_all_close(program.module()(x, h0), model(x, h0), f"exported at (B, T) = {shape}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", [LSTM, GRU], ids=["lstm", "gru"])
def test_family_exports_with_dynamic_T_and_B_without_warnings(family, backend):
    """The same for the LSTM and GRU: torch.export with T and B dynamic, no warnings, and the program
    matches eager on new sizes (the reference loop and, on CPU, auto export as torch's scan)."""
    model = family(D, H, num_layers=2, bidirectional=True, batch_first=True, dtype=F64, device=DEVICE,
                   backend=backend)
    steps, rows = torch.export.Dim("T", min=1, max=64), torch.export.Dim("B", min=2, max=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.export.export(model, (rand(B, T, D),), dynamic_shapes=({0: rows, 1: steps},))
    assert [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)] == []
    for shape in ((3, 5), (2, 1)):
        x = rand(*shape, D)
        assert_all_close(program.module()(x), model(x), f"exported at (B, T) = {shape}")


def test_compiled_native_cpu_layer_is_opaque_and_T_dynamic():
    """auto on CPU under torch.compile: PyTorch's native RNN runs as one custom op per layer, so the
    compiled graphs do not grow with T (static shapes) and a new T does not recompile (dynamic)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []  # (kind, number of nodes, number of native-layer calls) per compiled graph

    def compiler(kind):
        def compile_graph(gm, example_inputs):
            calls = sum("native_layer" in str(n.target) for n in gm.graph.nodes)
            graphs.append((kind, len(gm.graph.nodes), calls))
            return make_boxed_func(gm.forward)
        return compile_graph

    backend = aot_autograd(fw_compiler=compiler("fw"), bw_compiler=compiler("bw"))
    model = ElmanRNN(D, H, num_layers=2, backend="auto")

    def loss(x):
        y, h_n = model(x)
        return y.square().sum() + h_n.sum()

    def compile_at(steps, dynamic):
        torch.compiler.reset()
        graphs.clear()
        compiled = torch.compile(loss, backend=backend, dynamic=dynamic, fullgraph=True)
        for t in steps:
            x = torch.randn(t, B, D)
            got = compiled(x)
            got.backward()  # compiles the backward graph
            torch.testing.assert_close(got, loss(x))
        return list(graphs)

    short, long = compile_at([2], False), compile_at([9], False)
    assert [kind for kind, _, _ in short] == ["fw", "bw"]
    assert short == long, f"the compiled graphs grow with T: {short} at T = 2, {long} at T = 9"
    assert short[0][2] == 2, f"expected one native-layer op per layer in the forward graph, got {short[0][2]}"
    assert len(compile_at([3, 5, 8], True)) == 2, "a new T recompiled"
    torch.compiler.reset()
