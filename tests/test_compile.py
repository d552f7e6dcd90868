"""torch.compile: the Triton backends run as custom ops (torch.ops.elman_triton.*) and ElmanRNN is an
nn.RNNBase (which Dynamo traces, unlike nn.RNN), so a compiled model keeps one graph (fullgraph=True, no
Dynamo flags) and gives the eager values and gradients."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from elman_triton import ElmanRNN, ElmanRNNCell, elman_rnn
from oracles import INPUT_NAMES
from utils import TOLERANCE, leaves, make_problem, rel_err

BACKENDS = ["stepwise", "persistent"]
T, B, D, H = 4, 3, 5, 6  # the module tests' sizes
F64 = torch.float64


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


class Tagger(nn.Module):
    """A model holding an ElmanRNN: the RNN, then a linear head on every output step."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        features = rnn.hidden_size * (2 if rnn.bidirectional else 1)
        self.head = nn.Linear(features, 3, dtype=F64, device=rnn.weight_hh_l0.device)

    def forward(self, x, hx=None):
        out, h_n = self.rnn(x, hx)
        return self.head(out.data if isinstance(out, PackedSequence) else out), h_n


# name: (ElmanRNN arguments, None (padded input) or PackedSequence's enforce_sorted, whether hx is passed)
MODULE_CASES = {
    "1 layer": (dict(num_layers=1), None, True),
    "2 layers, bidirectional, batch_first": (dict(num_layers=2, bidirectional=True, batch_first=True), None, False),
    "packed unsorted, 2 layers, bidirectional": (dict(num_layers=2, bidirectional=True), False, False),
    "packed sorted with hx, 2 layers, bidirectional": (dict(num_layers=2, bidirectional=True), True, True),
    # Sorted packed input without hx: B is batch_sizes[0], a data-dependent size under the compiler.
    "packed sorted, 1 layer, bidirectional": (dict(bidirectional=True), True, False),
}
# Every case on a Triton backend (both run the same module code); on "auto" (CPU: torch's native RNN,
# which the compiler unrolls step by step, so these compile slowly) one padded and the data-dependent case.
MODULE_BACKENDS = ([("stepwise", case) for case in MODULE_CASES]
                   + [("persistent", "2 layers, bidirectional, batch_first"),
                      ("auto", "1 layer"), ("auto", "packed sorted, 1 layer, bidirectional")])


def outputs_and_grads(run, inputs, parameters, loss_weights=None):
    """run(*leaves)'s outputs and the gradients of Σ out·w over fresh leaf copies of inputs (None stays
    None) and parameters; w: loss_weights, or random ones. Returns (outputs and gradients, loss_weights)."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    outputs = run(*leaves)
    if loss_weights is None:
        loss_weights = [torch.randn_like(o) for o in outputs]
    loss = sum((o * w).sum() for o, w in zip(outputs, loss_weights))
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None] + list(parameters))
    return [*outputs, *grads], loss_weights


def assert_all_close(compiled, eager):
    assert len(compiled) == len(eager)
    for i, (a, b) in enumerate(zip(compiled, eager)):
        assert a.shape == b.shape and rel_err(a, b) < TOLERANCE[F64], f"output or gradient {i}"


@pytest.mark.parametrize("backend, case", MODULE_BACKENDS)
def test_compiled_module_matches_eager(backend, case, device):
    """torch.compile(fullgraph=True) of a model holding ElmanRNN, with no Dynamo flags: one graph, and
    the eager values and gradients (input, hx and every parameter)."""
    kwargs, enforce_sorted, with_hx = MODULE_CASES[case]
    model = Tagger(ElmanRNN(D, H, **kwargs, backend=backend, dtype=F64, device=device))
    dirs = 2 if model.rnn.bidirectional else 1
    x = torch.randn((B, T, D) if model.rnn.batch_first else (T, B, D), dtype=F64, device=device)
    hx = torch.randn(model.rnn.num_layers * dirs, B, H, dtype=F64, device=device) if with_hx else None
    lengths = [T, T - 2, 1] if enforce_sorted else [1, T, T - 2]

    def run(module):
        def packed_or_padded(x, hx):  # pack_padded_sequence is outside the graph: Dynamo skips it
            return module(x if enforce_sorted is None else
                          pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted), hx)
        return packed_or_padded

    eager, loss_weights = outputs_and_grads(run(model), (x, hx), model.parameters())
    compiled, _ = outputs_and_grads(run(torch.compile(model, fullgraph=True)), (x, hx), model.parameters(),
                                   loss_weights)
    assert_all_close(compiled, eager)


def test_compiled_module_checks_hx_batch_of_sorted_packed_input(device):
    """Compiled, a sorted PackedSequence takes B from hx's shape, and checks it against batch_sizes[0]
    in the graph (eagerly, nn.RNN's own check raises)."""
    model = torch.compile(ElmanRNN(D, H, backend="stepwise", dtype=F64, device=device), fullgraph=True)
    packed = pack_padded_sequence(torch.randn(T, B, D, dtype=F64, device=device), [T, T - 2, 1])
    with pytest.raises(RuntimeError, match="hx's batch size does not match"):
        model(packed, torch.randn(1, B - 1, H, dtype=F64, device=device))


@pytest.mark.parametrize("backend", ["auto", "stepwise"])
def test_compiled_cell_sampling_loop_matches_eager(backend, device):
    """A compiled (fullgraph) loop of ElmanRNNCell steps that feeds each step's output back as the next
    input gives the eager samples and gradients."""
    cell = ElmanRNNCell(D, H, backend=backend, dtype=F64, device=device)
    readout = nn.Linear(H, D, dtype=F64, device=device)

    def sample(x, h):
        steps = []
        for _ in range(T):
            h = cell(x, h)
            x = torch.tanh(readout(h))
            steps.append(x)
        return torch.stack(steps), h

    x0, h0 = torch.randn(B, D, dtype=F64, device=device), torch.randn(B, H, dtype=F64, device=device)
    parameters = [*cell.parameters(), *readout.parameters()]
    eager, loss_weights = outputs_and_grads(sample, (x0, h0), parameters)
    compiled, _ = outputs_and_grads(torch.compile(sample, fullgraph=True), (x0, h0), parameters, loss_weights)
    assert_all_close(compiled, eager)


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
