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


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_pass_opcheck(backend, device):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of both ops."""
    problem = {k: v.detach() for k, v in make_problem(2, 3, 4, 6, device=device).items()}
    args = (*(problem[name] for name in INPUT_NAMES), "tanh", False, backend)
    torch.library.opcheck(torch.ops.elman_triton.elman_rnn, [a.requires_grad_() if torch.is_tensor(a) else a
                                                             for a in args])
    y, _ = torch.ops.elman_triton.elman_rnn(*args)
    dy, dh_n = torch.randn_like(y), torch.randn_like(y[0])
    # The backward op is deliberately not differentiable (no double backward), so opcheck's AOT test,
    # which differentiates through every op it checks, does not apply to it.
    torch.library.opcheck(torch.ops.elman_triton.backward_recurrence,
                          (dy, dh_n, y.detach(), problem["weight_hh"], "tanh", False, backend),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
