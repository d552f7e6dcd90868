"""The recurrence modules behind the Triton backends, called directly, and the stepwise launcher.

forward_recurrence / backward_recurrence fill caller-allocated buffers in the layer layout (rows padded
to Hp = H rounded up to 16); these tests hand them buffers full of NaN, with NaN slabs on either side,
and check that every element inside is written with the right value (zeros in the padding columns) and
nothing outside is touched. They run for every Triton backend module (stepwise, persistent) with the
same contract.
"""
import pytest
import torch
import triton

from elman_triton import elman_rnn_reference, stepwise
from elman_triton.config import Layout, accumulator_dtype, kernel_options, padded
from elman_triton.ops import TRITON_BACKENDS
from oracles import check_against_oracles
from utils import TOLERANCE, count_launches, make_problem, rel_err

NAN = float("nan")


def recurrence_module(name, B, H, dtype, device):
    """The backend's launcher module, which must hold the shape."""
    module = TRITON_BACKENDS[name]
    if name == "persistent":
        module.check_supported(B, H, dtype, device)
    return module


def guarded_nan(T, B, H, dtype, device):
    """(storage, buffer): a contiguous (T, B, Hp) NaN buffer between two NaN slabs of storage."""
    storage = torch.full((T + 2, B, padded(H)), NAN, dtype=dtype, device=device)
    return storage, storage[1:-1]


def forward(module, xp, h0, weight_hh, bias, y, opts, reverse):
    """One direction through module.forward_recurrence: xp (T, B, H), h0 (B, H) and W_hh get rows padded
    to the layout, h0, W_hh and bias their direction axis. Returns h_n (B, H)."""
    T, B, H = xp.shape
    xp, h0, weight_hh = (pad_rows(t) for t in (xp, h0, weight_hh))  # rows padded, as ops does
    h_n = torch.full((1, B, H), NAN, dtype=xp.dtype, device=xp.device)
    module.forward_recurrence(xp, y, h0[None], weight_hh[None], None if bias is None else bias[None], h_n, None,
                              opts, Layout.of(y, H, 1, False, reverse))
    return h_n[0]


def pad_rows(t):
    """Rows padded with zeros to a multiple of 16, as elman_triton.ops hands them to the launchers."""
    return torch.nn.functional.pad(t, (0, padded(t.shape[-1]) - t.shape[-1]))


def backward(module, dy, dh_n, y, weight_hh, dz, opts, reverse):
    H = weight_hh.shape[0]
    return module.backward_recurrence(dy, dh_n[None], y, pad_rows(weight_hh)[None], dz, None, opts,
                                      Layout.of(y, H, 1, False, reverse))[0]


def assert_guards_untouched(storage, name):
    assert storage[0].isnan().all() and storage[-1].isnan().all(), f"wrote outside {name}"


def recurrence_inputs(T, B, D, H, dtype, device, has_bias):
    """xp = x W_ihᵀ, a transposed-view h0, W_hh and b = b_ih + b_hh in the accumulator dtype."""
    p = {k: None if v is None else v.detach() for k, v in make_problem(T, B, D, H, dtype, device).items()}
    xp = (p["x"] @ p["weight_ih"].T).contiguous()
    h0 = p["h0"].T.contiguous().T  # strided (stride (1, B)): the modules take any h0 strides
    acc = accumulator_dtype(dtype)
    bias = p["bias_ih"].to(acc) + p["bias_hh"].to(acc) if has_bias else None
    return xp, h0, p["weight_hh"], bias


def reference_recurrence(xp, h0, weight_hh, bias, dy, dh_n, nonlinearity, reverse):
    """float64 (y, dz, dh0): the reference run on x = xp with W_ih = I, so dz_t = ∂L/∂xp_t for
    L = Σ y·dy + Σ h_n·dh_n."""
    xp, h0 = xp.double().requires_grad_(), h0.double().requires_grad_()
    eye = torch.eye(xp.shape[-1], dtype=torch.float64, device=xp.device)
    y, h_n = elman_rnn_reference(xp, h0, eye, weight_hh.double(), None if bias is None else bias.double(),
                                 nonlinearity=nonlinearity, reverse=reverse)
    dz, dh0 = torch.autograd.grad((y * dy.double()).sum() + (h_n * dh_n.double()).sum(), [xp, h0])
    return y, h_n, dz, dh0


@pytest.mark.parametrize("reverse,has_bias", [(False, True), (True, False)])
@pytest.mark.parametrize("dtype,nonlinearity", [
    (torch.float32, "tanh"), (torch.float32, "relu"), (torch.float64, "tanh"), (torch.float64, "relu"),
    # bf16 relu: rounding moves some z across 0, where relu' jumps (see test_ops.gated_reference)
    (torch.bfloat16, "tanh"),
], ids=str)
@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
def test_poisoned_buffers_are_fully_written(backend, dtype, nonlinearity, reverse, has_bias, device):
    T, B, D, H = 2, 67, 5, 130  # several batch and column tiles, ragged at both edges
    module = recurrence_module(backend, B, H, dtype, device)
    if module is stepwise:
        BB, BN, BK = stepwise.block_sizes(B, H)
        assert triton.cdiv(B, BB) > 1 and triton.cdiv(H, BN) > 1 and triton.cdiv(H, BK) > 1
    opts = kernel_options(dtype, nonlinearity)
    tol = TOLERANCE[dtype]
    xp, h0, weight_hh, bias = recurrence_inputs(T, B, D, H, dtype, device, has_bias)
    Hp = padded(H)
    dy = torch.randn(Hp, B, T, dtype=torch.float64, device=device).to(dtype).permute(2, 1, 0)  # any strides
    dh_n = torch.randn(H, B, dtype=torch.float64, device=device).to(dtype).T
    y_ref, h_ref, dz_ref, dh0_ref = reference_recurrence(xp, h0, weight_hh, bias, dy[..., :H], dh_n, nonlinearity,
                                                         reverse)

    y_storage, y = guarded_nan(T, B, H, dtype, device)
    h_n = forward(module, xp, h0, weight_hh, bias, y, opts, reverse)
    assert_guards_untouched(y_storage, "y")
    assert torch.isfinite(y).all(), f"{int(y.isnan().sum())} elements of y not written"
    assert not y[..., H:].any(), "the padding columns must hold zeros"
    assert rel_err(y[..., :H], y_ref) <= tol and rel_err(h_n, h_ref) <= tol

    dz_storage, dz = guarded_nan(T, B, H, dtype, device)
    dh0 = backward(module, dy, dh_n, y, weight_hh, dz, opts, reverse)
    assert_guards_untouched(dz_storage, "dz")
    assert torch.isfinite(dz).all(), f"{int(dz.isnan().sum())} elements of dz not written"
    assert not dz[..., H:].any(), "the padding columns must hold zeros"
    assert dh0.shape == (B, H) and dh0.dtype == accumulator_dtype(dtype)
    assert torch.isfinite(dh0).all()
    assert rel_err(dz[..., :H], dz_ref) <= tol
    assert rel_err(dh0, dh0_ref) <= tol


@pytest.mark.parametrize("reverse", [False, True])
def test_stepwise_launches_one_kernel_per_step(monkeypatch, reverse, device):
    """The stepwise backend really runs its Triton kernels, T forward and T backward launches, and
    gets the reference's y, h_n and gradients from them."""
    fwd, bwd = count_launches(monkeypatch, stepwise, "elman_step_fwd_kernel", "elman_step_bwd_kernel")
    T = 5
    check_against_oracles(make_problem(T, 3, 4, 6, device=device), "stepwise", reverse=reverse)
    assert (fwd.launches, bwd.launches) == (T, T)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [
    (131073, 64, 256),  # T·B·H = 2^31 + 16384: whole-sequence offsets need int64
    (2, 2**21 + 1, 1024),  # B·H = 2^31 + 1024: offsets inside one step need int64
], ids=lambda s: "T{}-B{}-H{}".format(*s))
@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
def test_int64_offsets(backend, shape):
    """Forward past 2^31 elements in bf16: the last steps of the last batch rows, where int32 offsets
    would have wrapped, match the reference started from the state the kernel stored before them."""
    T, B, H = shape
    dtype, device = torch.bfloat16, torch.device("cuda")
    if backend == "persistent" and not TRITON_BACKENDS[backend].supports(B, H, dtype, device):
        pytest.skip(f"persistent backend does not support B={B}, H={H}")
    module = recurrence_module(backend, B, H, dtype, device)
    scale = H ** -0.5
    xp = torch.empty(T, B, H, dtype=dtype, device=device).uniform_(-1, 1)
    h0 = torch.empty(B, H, dtype=dtype, device=device).uniform_(-1, 1)
    weight_hh = torch.empty(H, H, dtype=dtype, device=device).uniform_(-scale, scale)
    bias = torch.empty(H, dtype=torch.float32, device=device).uniform_(-scale, scale)
    y = torch.full_like(xp, NAN)  # H a multiple of 16: the layout has no padding
    forward(module, xp, h0, weight_hh, bias, y, kernel_options(dtype, "tanh"), False)

    steps, rows = min(T, 2), slice(max(0, B - 512), B)
    start = h0[rows] if steps == T else y[T - steps - 1, rows]
    eye = torch.eye(H, dtype=torch.float64, device=device)
    y_ref, _ = elman_rnn_reference(xp[T - steps:, rows].double(), start.double(), eye, weight_hh.double(),
                                   bias.double())
    assert torch.isfinite(y[T - steps:]).all()
    assert rel_err(y[T - steps:, rows], y_ref) <= TOLERANCE[dtype]
