"""The oracles every backend is checked against: the float64 reference loop and torch.nn.RNN, with
outputs, h_n and the gradient of every input under a random loss."""
import torch

from elman_triton import elman_rnn, elman_rnn_reference
from utils import TOLERANCE, as_float64, rel_err

INPUT_NAMES = ("x", "h0", "weight_ih", "weight_hh", "bias_ih", "bias_hh")


def nn_rnn(problem, nonlinearity="tanh", reverse=False):
    """torch.nn.RNN (on CPU) with the problem's tensors as its parameters, so gradients reach them.

    reverse=True reads the backward direction of a bidirectional nn.RNN; the forward direction keeps
    nn.RNN's own random weights and is ignored. A missing bias of the two is a zero tensor.
    """
    x, h0, weight_hh = problem["x"], problem["h0"], problem["weight_hh"]
    T, B, D = x.shape
    H = weight_hh.shape[0]
    has_bias = problem["bias_ih"] is not None or problem["bias_hh"] is not None
    rnn = torch.nn.RNN(D, H, nonlinearity=nonlinearity, bias=has_bias, bidirectional=reverse, dtype=x.dtype)
    params = {name: p.detach() for name, p in rnn.named_parameters()}
    suffix = "_l0_reverse" if reverse else "_l0"
    for name in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if has_bias else ()):
        value = problem[name]
        params[name + suffix] = torch.zeros(H, dtype=x.dtype) if value is None else value.cpu()
    h = torch.zeros(B, H, dtype=x.dtype) if h0 is None else h0.cpu()
    hx = torch.stack([torch.zeros_like(h), h]) if reverse else h[None]
    y, h_n = torch.func.functional_call(rnn, params, (x.cpu(), hx))
    y = y[..., H:] if reverse else y
    return y.to(x.device), h_n[-1].to(x.device)


def reference(problem, **options):
    return elman_rnn_reference(**problem, **options)


def random_loss(problem, transposed=False):
    """L(y, h_n) = Σ y·w_y + Σ h_n·w_h with fresh weights drawn in the problem's dtype (exact in fp64).

    transposed=True stores w_y as (H, B, T) and w_h as (H, B), so the gradients autograd hands to the
    op's backward (dy = w_y, dh_n = w_h) have no unit stride in any dim.
    """
    x = problem["x"]
    T, B, _ = x.shape
    H = problem["weight_hh"].shape[0]

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=x.device).to(x.dtype)

    w_y, w_h = (rand(H, B, T).permute(2, 1, 0), rand(H, B).T) if transposed else (rand(T, B, H), rand(B, H))

    def loss(y, h_n):
        return (y * w_y.to(y.dtype)).sum() + (h_n * w_h.to(h_n.dtype)).sum()
    return loss


def run_and_grads(fn, problem, loss):
    """{"y", "h_n", "grad_<input>" for every input present} for (y, h_n) = fn(problem)."""
    y, h_n = fn(problem)
    names = [name for name in INPUT_NAMES if problem[name] is not None]
    grads = torch.autograd.grad(loss(y, h_n), [problem[name] for name in names])
    return {"y": y, "h_n": h_n, **{f"grad_{name}": g for name, g in zip(names, grads)}}


def assert_close(got, expected, tol, label):
    assert got.keys() == expected.keys()
    errors = {key: rel_err(got[key], expected[key]) for key in expected}
    bad = {key: f"{err:.3g}" for key, err in errors.items() if not err <= tol}  # NaN fails too
    assert not bad, f"{label}: relative error above {tol:g} in {bad}"


def check_against_oracles(problem, backend, loss=None, tol=None, oracles=(reference, nn_rnn), **options):
    """Run backend on problem and compare everything with the float64 oracles on the same inputs."""
    loss = loss or random_loss(problem)
    tol = tol or TOLERANCE[problem["x"].dtype]
    got = run_and_grads(lambda p: elman_rnn(**p, backend=backend, **options), problem, loss)
    for oracle in oracles:
        expected = run_and_grads(lambda p: oracle(p, **options), as_float64(problem), loss)
        assert_close(got, expected, tol, f"{backend} vs {oracle.__name__}")
    return got
