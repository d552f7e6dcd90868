"""elman_rnn, the public op: every backend against the float64 reference and torch.nn.RNN.

Each comparison checks y, h_n and the gradients of every input for the loss
L = Σ y·w_y + Σ h_n·w_h (random w_y, w_h, so the final state is in the loss), with the relative norm
error ‖a − b‖/‖b‖ against TOLERANCE of the op's dtype. Without CUDA the Triton kernels run in Triton's interpreter
(see conftest.py); with CUDA every test runs on the GPU and the @pytest.mark.gpu tests run too.
"""
import pytest
import torch

from elman_triton import elman_rnn, persistent
from elman_triton.config import kernel_options
from oracles import INPUT_NAMES, assert_close, check_against_oracles, nn_rnn, random_loss, reference, run_and_grads
from utils import TOLERANCE, as_float64, leaves, make_problem

TRITON_BACKENDS = ["stepwise", "persistent"]
ALL_BACKENDS = TRITON_BACKENDS + ["auto", "reference"]
ACTIVATIONS = ["tanh", "relu"]


def elman_run(problem, backend, **options):
    return elman_rnn(**problem, backend=backend, **options)

@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("nonlinearity", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_matches_reference_and_nn_rnn(backend, dtype, nonlinearity, reverse, device):
    problem = make_problem(5, 3, 6, 10, dtype=dtype, device=device)
    check_against_oracles(problem, backend, nonlinearity=nonlinearity, reverse=reverse)


# (T, B, D, H): a single step and batch row, H = D = 1, H past 128 (several column tiles; the
# persistent backend's large-H kernel), B past the 64-row batch tile, D past 128; no powers of two.
ODD_SHAPES = [(1, 1, 3, 5), (6, 1, 7, 9), (2, 3, 1, 1), (3, 19, 5, 130), (2, 67, 3, 161), (4, 2, 130, 3)]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "T{}-B{}-D{}-H{}".format(*s))
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_odd_shapes(backend, shape, reverse, device):
    check_against_oracles(make_problem(*shape, device=device), backend, reverse=reverse)


@pytest.mark.parametrize("nonlinearity", ACTIVATIONS)
@pytest.mark.parametrize("has_h0,has_bias_ih,has_bias_hh", [
    (h0, b_ih, b_hh) for h0 in (True, False) for b_ih in (True, False) for b_hh in (True, False)])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_optional_inputs(backend, has_h0, has_bias_ih, has_bias_hh, nonlinearity, device):
    problem = make_problem(3, 4, 5, 6, device=device, h0=has_h0)
    problem["bias_ih"] = problem["bias_ih"] if has_bias_ih else None
    problem["bias_hh"] = problem["bias_hh"] if has_bias_hh else None
    check_against_oracles(problem, backend, nonlinearity=nonlinearity)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("nonlinearity", ACTIVATIONS)
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_gradcheck(backend, nonlinearity, reverse, device):
    # relu: z lands within eps·|∂z/∂input| ≈ 1e-6 of the kink with probability ~1e-5 per element,
    # so fresh random data is fine.
    problem = make_problem(3, 2, 3, 4, dtype=torch.float64, device=device)

    def op(*inputs):
        return elman_run(dict(zip(INPUT_NAMES, inputs)), backend, nonlinearity=nonlinearity, reverse=reverse)
    # fast_mode checks vᵀ J u for random u, v per input (a wrong gradient fails with probability 1)
    # with ~2 forward runs per input instead of 2 per input element.
    assert torch.autograd.gradcheck(op, tuple(problem[name] for name in INPUT_NAMES), eps=1e-6, atol=1e-8,
                                    fast_mode=True)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_nan_stays_in_its_batch_row(backend, reverse, device):
    T, B, t, b = 5, 19, 2, 7
    problem = make_problem(T, B, 4, 20, device=device)
    loss = random_loss(problem)
    clean = run_and_grads(lambda p: elman_run(p, backend, reverse=reverse), problem, loss)
    x = problem["x"].detach().clone()
    x[t, b, 1] = float("nan")
    poisoned = run_and_grads(lambda p: elman_run(p, backend, reverse=reverse), {**problem, "x": x.requires_grad_()}, loss)

    others = [i for i in range(B) if i != b]
    for key, batch_dim in (("y", 1), ("h_n", 0), ("grad_x", 1), ("grad_h0", 0)):
        rows = torch.tensor(others, device=device)
        kept = poisoned[key].index_select(batch_dim, rows)
        assert torch.isfinite(kept).all(), f"NaN leaked from row {b} into other rows of {key}"
        assert torch.equal(kept, clean[key].index_select(batch_dim, rows)), key
    earlier = slice(t + 1, T) if reverse else slice(0, t)  # the steps the recurrence runs before t
    assert torch.equal(poisoned["y"][earlier, b], clean["y"][earlier, b])
    assert poisoned["y"][t, b].isnan().all()


def non_contiguous_problem(T, B, D, H, device):
    """make_problem's values stored strided: x batch-first (a transposed (B, T, D) tensor), h0 and
    weight_hh transposed views, weight_ih and the biases every other element of a wider tensor."""
    def swapped(t):  # same values, the first two dims' strides swapped
        return t.transpose(0, 1).contiguous().transpose(0, 1)

    def spread(t):  # same values, stride 2 along the last dim
        return t.repeat_interleave(2, dim=-1)[..., ::2]
    layout = dict(x=swapped, h0=swapped, weight_ih=spread, weight_hh=swapped, bias_ih=spread, bias_hh=spread)
    problem = {k: layout[k](v.detach()).requires_grad_() for k, v in make_problem(T, B, D, H, device=device).items()}
    assert not any(v.is_contiguous() for v in problem.values())
    return problem


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_inputs_and_grads(backend, reverse, device):
    problem = non_contiguous_problem(4, 19, 5, 21, device)
    check_against_oracles(problem, backend, loss=random_loss(problem, transposed=True), reverse=reverse)


LOSSES = {  # autograd hands the op's backward expanded (stride-0), materialised-zero or y-dependent grads
    "y.sum": lambda y, h_n: y.sum(),
    "h_n.sum": lambda y, h_n: h_n.sum(),
    "both.sum": lambda y, h_n: y.sum() + h_n.sum(),
    "y.mean-of-slice": lambda y, h_n: y[:, ::2, 1:].mean(),
    "squares": lambda y, h_n: y.square().sum() + h_n.square().sum(),
}


@pytest.mark.parametrize("loss", LOSSES.keys())
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_stride_zero_and_missing_grads(backend, loss, device):
    check_against_oracles(make_problem(3, 5, 4, 7, device=device), backend, loss=LOSSES[loss], reverse=True)


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_backward_is_deterministic(backend, device):
    problem = make_problem(3, 19, 5, 130, device=device)
    loss = random_loss(problem)
    first, second = (run_and_grads(lambda p: elman_run(p, backend), problem, loss) for _ in range(2))
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("nonlinearity", ACTIVATIONS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_double_backward_matches_nn_rnn(backend, reverse, nonlinearity, device):
    """Second derivatives (a gradient penalty: ‖∂L/∂inputs‖² differentiated again), in float64, against
    nn.RNN's CPU double backward and the reference loop, for every input."""
    problem = make_problem(4, 3, 5, 6, dtype=torch.float64, device=device)
    loss = random_loss(problem)
    names = [name for name in INPUT_NAMES if problem[name] is not None]

    def second_order(fn, p):
        first = torch.autograd.grad(loss(*fn(p)), [p[name] for name in names], create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        return dict(zip(names, torch.autograd.grad(penalty, [p[name] for name in names])))

    got = second_order(lambda p: elman_run(p, backend, nonlinearity=nonlinearity, reverse=reverse), problem)
    for oracle in (reference, nn_rnn):
        expected = second_order(lambda p: oracle(p, nonlinearity=nonlinearity, reverse=reverse), as_float64(problem))
        assert_close(got, expected, 1e-10, f"{backend} vs {oracle.__name__}")


def gated_reference(gates):
    """The float64 reference (forward in time) with relu's gate at step t fixed to gates[t]:
    h_t = z_t ⊙ gates[t].

    relu' jumps at 0, so wherever 16-bit rounding moves a z_t across 0 the exact gradient differs by
    O(1) there (bf16 at H=130 flips enough gates for ~5e-2 relative error). With the op's own gates
    (its y > 0) the comparison measures the backward pass for the forward the op actually took.
    """
    def gated(p):  # a make_problem problem: h0 and both biases present
        h, ys = p["h0"], []
        for t in range(p["x"].shape[0]):
            h = (p["x"][t] @ p["weight_ih"].T + h @ p["weight_hh"].T + p["bias_ih"] + p["bias_hh"]) * gates[t]
            ys.append(h)
        return torch.stack(ys), h
    return gated


@pytest.mark.parametrize("nonlinearity", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_half_precision(backend, dtype, nonlinearity, device):
    problem = make_problem(3, 19, 5, 130, dtype=dtype, device=device)
    loss = random_loss(problem)
    tol = TOLERANCE[dtype]
    got = run_and_grads(lambda p: elman_run(p, backend, nonlinearity=nonlinearity), problem, loss)
    expected = run_and_grads(lambda p: reference(p, nonlinearity=nonlinearity), as_float64(problem), loss)
    if nonlinearity == "relu":
        outputs = ("y", "h_n")
        assert_close({k: got[k] for k in outputs}, {k: expected[k] for k in outputs}, tol, "relu forward")
        gated = gated_reference((got["y"] > 0).double())
        expected = run_and_grads(gated, as_float64(problem), loss)
    assert_close(got, expected, tol, f"{backend} {dtype} {nonlinearity}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batch_gives_empty_outputs(backend, device):
    """B = 0, which nn.RNN accepts: y (T, 0, H) and h_n (0, H); weight gradients are zeros."""
    problem = make_problem(3, 0, 4, 5, device=device)
    y, h_n = elman_rnn(*problem.values(), backend=backend)
    assert y.shape == (3, 0, 5) and h_n.shape == (0, 5)
    grads = torch.autograd.grad(y.sum() + h_n.sum(), leaves(problem))
    for name, g in zip([k for k, v in problem.items() if v is not None], grads):
        assert g.shape == problem[name].shape and not g.any(), name


def bad_input_cases():
    """Overrides of a valid T=2, B=3, D=4, H=5 float32 call, the exception and its message pattern."""
    T, B, D, H = 2, 3, 4, 5

    def rand(*shape, dtype=torch.float32):
        return torch.rand(*shape, dtype=torch.float64).to(dtype)
    cases = [
        ("x-2d", dict(x=rand(B, D)), ValueError, r"^x must be 3-D"),
        ("x-4d", dict(x=rand(T, B, D, 1)), ValueError, r"^x must be 3-D"),
        ("T-0", dict(x=rand(0, B, D)), ValueError, r"^x must have T ≥ 1"),
        ("weight_ih-wrong-D", dict(weight_ih=rand(H, D + 1)), ValueError, r"^weight_ih must be \(H, D\)"),
        ("weight_ih-wrong-H", dict(weight_ih=rand(H + 1, D)), ValueError, r"^weight_ih must be \(H, D\)"),
        ("weight_hh-not-square", dict(weight_hh=rand(H, H + 1)), ValueError, r"^weight_hh must be"),
        ("h0-wrong-B", dict(h0=rand(B + 1, H)), ValueError, r"^h0 must have shape"),
        ("h0-3d", dict(h0=rand(1, B, H)), ValueError, r"^h0 must have shape"),
        ("bias_ih-shape", dict(bias_ih=rand(H + 1)), ValueError, r"^bias_ih must have shape"),
        ("bias_hh-2d", dict(bias_hh=rand(1, H)), ValueError, r"^bias_hh must have shape"),
        ("h0-dtype", dict(h0=rand(B, H, dtype=torch.float64)), TypeError, r"^h0 has dtype"),
        ("weight_ih-dtype", dict(weight_ih=rand(H, D, dtype=torch.float16)), TypeError, r"^weight_ih has dtype"),
        ("weight_hh-dtype", dict(weight_hh=rand(H, H, dtype=torch.float64)), TypeError, r"^weight_hh has dtype"),
        ("bias_ih-dtype", dict(bias_ih=rand(H, dtype=torch.bfloat16)), TypeError, r"^bias_ih has dtype"),
        ("bias_hh-dtype", dict(bias_hh=rand(H, dtype=torch.float64)), TypeError, r"^bias_hh has dtype"),
        ("nonlinearity", dict(nonlinearity="gelu"), ValueError, r"nonlinearity 'gelu'"),
        ("backend", dict(backend="cudnn"), ValueError, r"backend 'cudnn'"),
    ]
    return [pytest.param(overrides, error, pattern, id=case) for case, overrides, error, pattern in cases]


@pytest.mark.parametrize("overrides,error,pattern", bad_input_cases())
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_inputs_are_rejected(backend, overrides, error, pattern, device):
    call = {**make_problem(2, 3, 4, 5), "backend": backend, **overrides}
    call = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    with pytest.raises(error, match=pattern):
        elman_rnn(**call)


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_triton_backends_reject_unsupported_dtypes(backend, device):
    problem = {k: v.detach().to(device, torch.complex64) for k, v in make_problem(2, 3, 4, 5).items()}
    with pytest.raises(TypeError, match=rf"backend='{backend}' supports"):
        elman_rnn(**problem, backend=backend)


# ----------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("name", ["h0", "weight_ih", "weight_hh", "bias_ih", "bias_hh"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_device_mismatch_is_rejected(backend, name):
    problem = {k: v.detach().cuda() for k, v in make_problem(2, 3, 4, 5).items()}
    problem[name] = problem[name].cpu()
    with pytest.raises(ValueError, match=rf"^{name} is on cpu but x is on cuda"):
        elman_rnn(**problem, backend=backend)


def skip_unless_persistent_supports(backend, B, H, dtype, device):
    if backend == "persistent" and not persistent.supports(B, H, dtype, device):
        pytest.skip(f"persistent backend does not support B={B}, H={H}, {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 16, 64])
@pytest.mark.parametrize("H", [256, 1024, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_gpu_sizes(backend, dtype, H, B):
    skip_unless_persistent_supports(backend, B, H, dtype, torch.device("cuda"))
    problem = make_problem(512, B, 128, H, dtype=dtype, device="cuda")
    check_against_oracles(problem, backend, oracles=(reference,))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_gpu_tf32_opt_in(backend):
    B, H = 16, 1024
    skip_unless_persistent_supports(backend, B, H, torch.float32, torch.device("cuda"))
    problem = make_problem(128, B, 128, H, device="cuda")
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert kernel_options(torch.float32, "tanh").PRECISION == "tf32"
        check_against_oracles(problem, backend, tol=1e-3, oracles=(reference,))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
