"""torch.compile: the Triton backends run as custom ops (torch.ops.elman_triton.*), so a compiled model
keeps one graph (fullgraph=True) and gives the eager values and gradients."""
import pytest
import torch

from elman_triton import ElmanRNN, elman_rnn
from oracles import INPUT_NAMES
from utils import leaves, make_problem

BACKENDS = ["stepwise", "persistent"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def values_and_grads(fn, problem):
    y, h_n = fn(**problem)
    w_y, w_h = torch.ones_like(y).cumsum(0), torch.ones_like(h_n).cumsum(1)  # fixed weights: both runs alike
    grads = torch.autograd.grad((y * w_y).sum() + (h_n * w_h).sum(), leaves(problem))
    return [y, h_n, *grads]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_matches_eager(backend, reverse, device):
    problem = make_problem(3, 5, 4, 7, device=device)

    def run(**p):
        return elman_rnn(*(p[name] for name in INPUT_NAMES), backend=backend, reverse=reverse)

    eager = values_and_grads(run, problem)
    compiled = values_and_grads(torch.compile(run, fullgraph=True), problem)
    for name, a, b in zip(["y", "h_n", *INPUT_NAMES], compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)  # fp32: compiled GEMMs may sum in another order


@pytest.mark.parametrize("allow_rnn", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_module_trains_like_eager(backend, allow_rnn, device):
    """ElmanRNN is an nn.RNN, which Dynamo does not trace by default: a compiled model runs it eagerly
    (a graph break). With torch._dynamo.config.allow_rnn it compiles whole (fullgraph=True)."""
    model = ElmanRNN(4, 9, num_layers=2, bidirectional=True, backend=backend, device=device)
    x = torch.randn(5, 3, 4, device=device)

    def values_and_param_grads(run):
        y, h_n = run(x)
        return [y, h_n, *torch.autograd.grad(y.square().sum() + h_n.sum(), list(model.parameters()))]

    eager = values_and_param_grads(model)
    with torch._dynamo.config.patch(allow_rnn=allow_rnn):
        compiled = values_and_param_grads(torch.compile(model, fullgraph=allow_rnn))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [None, [2, 1, 2]], ids=["padded", "lengths"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_pass_opcheck(backend, lengths, device):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of both ops, on a layer
    buffer with padded rows (H = 6 → 16) and both directions."""
    T, B, D, H = 2, 3, 4, 6
    x = torch.randn(T, B, D, device=device)
    w_ih = torch.randn(2, 16, D, device=device) * 0.3
    w_ih[:, H:] = 0  # the padding rows of W_ih: xp's padding columns are zero, as the op makes them
    xp = (x @ w_ih.reshape(32, D).T).requires_grad_()
    h0 = torch.randn(2, B, H, device=device, requires_grad=True)
    w_hh = (torch.randn(2, H, H, device=device) * 0.3).requires_grad_()
    bias = torch.randn(2, H, device=device, requires_grad=True)
    lengths = None if lengths is None else torch.tensor(lengths, device=device)
    options = ("tanh", False, False, backend)
    torch.library.opcheck(torch.ops.elman_triton.recurrence, (xp, h0, w_hh, bias, lengths, None, *options))
    y, _ = torch.ops.elman_triton.recurrence(xp, h0, w_hh, bias, lengths, None, *options)
    dy, dh_n = torch.randn_like(y), torch.randn_like(h0)
    # The backward op is not differentiable itself (double backward differentiates a PyTorch loop
    # instead), so opcheck's AOT test, which differentiates through every op it checks, does not apply.
    torch.library.opcheck(torch.ops.elman_triton.recurrence_backward,
                          (dy, dh_n, y.detach(), w_hh.detach(), lengths, *options),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
