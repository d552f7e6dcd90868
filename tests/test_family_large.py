"""The persistent large-H kernel with the LSTM and GRU cells (kernels/persistent_large.py, CELL = 4 / 3) against
nn.LSTM / nn.GRU and the reference loop in float64: values, h_n, c_n and the gradient of the input, the initial
states and every weight, on odd shapes (H and B not powers of 2, T = 1, B across batch tiles, several column
programs), both directions, batch_first, no bias, lengths in both directions; the launchers' buffers (gates,
aux, dz, the carries) against the stepwise kernels' with NaN-poisoned outputs; the H limits.

On CPU the kernels run in Triton's interpreter, one launch per step (forward) or phase (backward): the
large kernel is forced at small H by setting CELL_SMALL_H_MAX to 0, as tests/test_persistent.py does for
the Elman cell. The launch counters prove the large kernel ran.
"""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from elman_triton import persistent, stepwise
from elman_triton.config import INTERPRETED, Layout, kernel_options, padded
from elman_triton.family_ops import gru_layer, lstm_layer
from elman_triton.kernels import barrier
from test_plan import FakeKernel, fake_gpu, launched  # noqa: F401 (fake_gpu: the fixture)
from utils import TOLERANCE, count_launches, rel_err

F64 = torch.float64
TOL = 1e-12  # float64, as utils.TOLERANCE
G_OF = {nn.LSTM: 4, nn.GRU: 3}


@pytest.fixture
def large(monkeypatch):
    """Every cell H on the large-H kernel; its launch counters."""
    monkeypatch.setattr(persistent, "CELL_SMALL_H_MAX", {G: dict.fromkeys(limits, 0)
                                                         for G, limits in persistent.CELL_SMALL_H_MAX.items()})
    monkeypatch.setattr(persistent, "_PLANS", {})
    return count_launches(monkeypatch, persistent, "rnn_persistent_large_fwd_kernel", "rnn_persistent_large_bwd_kernel")


def rand(*shape, device):
    return torch.randn(*shape, dtype=F64, device=device, requires_grad=True)


def run_layer(nn_cls, x, h0, c0, params, dirs, **options):
    """Our layer op on nn's parameters (a flat list in nn's order: direction by direction): y and the final
    states."""
    n = len(params) // dirs
    chunks = [params[d * n:(d + 1) * n] for d in range(dirs)]
    weights = [tuple(c[i] for c in chunks) for i in range(n)]
    if len(weights) == 2:
        weights += [None, None]
    if nn_cls is nn.LSTM:
        y, (h, c) = lstm_layer(x, (h0, c0), *weights, backend="persistent", **options)
        return [y, h, c]
    y, h = gru_layer(x, h0, *weights, backend="persistent", **options)
    return [y, h]


CASES = {  # (T, B, D, H, dirs, batch_first, bias)
    "bidirectional-5-column-programs": (3, 5, 4, 37, 2, False, True),  # BN = 8: 5 programs per direction
    "T1-B-across-tiles-batch-first-no-bias": (1, 19, 3, 10, 1, True, False),  # fp64: BB = 8, 3 batch tiles
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("nn_cls", [nn.LSTM, nn.GRU], ids=["LSTM", "GRU"])
def test_matches_nn(nn_cls, case, large, device):
    T, B, D, H, dirs, batch_first, bias = CASES[case]
    ref = nn_cls(D, H, bidirectional=dirs == 2, batch_first=batch_first, bias=bias, dtype=F64, device=device)
    params = list(ref.parameters())
    x = rand(*((B, T, D) if batch_first else (T, B, D)), device=device)
    h0, c0 = rand(dirs, B, H, device=device), rand(dirs, B, H, device=device)
    want = ref(x, (h0, c0) if nn_cls is nn.LSTM else h0)
    want = [want[0], *want[1]] if nn_cls is nn.LSTM else list(want)
    got = run_layer(nn_cls, x, h0, c0, params, dirs, batch_first=batch_first)
    assert [c.launches for c in large] == [T, 0]
    leaves = [x, h0] + ([c0] if nn_cls is nn.LSTM else []) + params
    cotangents = [torch.randn_like(t) for t in want]
    grads = [torch.autograd.grad(sum((w * t).sum() for w, t in zip(cotangents, outs)), leaves)
             for outs in (got, want)]
    assert [c.launches for c in large] == [T, 2 * T]
    names = ["y", "h_n", "c_n"][:len(want)] + [f"grad {n}" for n in ["x", "h0", "c0"][:len(leaves) - len(params)]] + \
        [f"grad {n}" for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, got + list(grads[0]), want + list(grads[1])):
        assert a.shape == b.shape and rel_err(a, b) <= TOL, name


@pytest.mark.parametrize("dirs,reverse", [(1, True), (2, False)], ids=["reverse", "bidirectional"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lengths_match_reference(cell, dirs, reverse, large, device):
    """Variable lengths in the kernel (a reverse row starts from h0, c0 at its own end; h_n, c_n each row's
    own last state) against the reference loop, values and every gradient; B = 9: two batch tiles."""
    T, B, D, H, G = 4, 9, 3, 21, 4 if cell == "lstm" else 3
    x = rand(B, T, D, device=device)
    h0, c0 = rand(dirs, B, H, device=device), rand(dirs, B, H, device=device)
    weights = [[rand(G * H, n, device=device) for _ in range(dirs)] for n in (D, H)] + \
        [[rand(G * H, device=device) for _ in range(dirs)] for _ in range(2)]
    lengths = torch.tensor([2, 4, 1, 3, 4, 1, 2, 3, 1], device=device)
    results = []
    for backend in ("reference", "persistent"):
        options = dict(backend=backend, reverse=reverse, lengths=lengths, batch_first=True)
        if cell == "lstm":
            y, (h, c) = lstm_layer(x, (h0, c0), *weights, **options)
            outs = [y, h, c]
        else:
            outs = list(gru_layer(x, h0, *weights, **options))
        loss = sum((torch.sin(t) * (i + 1)).sum() for i, t in enumerate(outs))
        leaves = [x, h0] + ([c0] if cell == "lstm" else []) + [w for ws in weights for w in ws]
        results.append(outs + list(torch.autograd.grad(loss, leaves)))
    assert [c.launches for c in large] == [T, 2 * T]
    for i, (a, b) in enumerate(zip(results[1], results[0])):
        assert rel_err(a, b) <= TOL, i


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_launchers_fill_every_buffer_like_stepwise(cell, dtype, large, device):
    """persistent.cell_forward_recurrence / cell_backward_recurrence on the large kernel write every element of
    y, the gates, aux, h_n, c_n and dz (padding columns included: H = 20, Hp = 32), NaN-poisoned before, as
    the stepwise kernels do; both directions, lengths, batch_first. fp32: the forward's 16-row batch tiles
    (fp64's are 8, as the backward's)."""
    G = 4 if cell == "lstm" else 3
    T, B, H, dirs = 3, 9, 20, 2
    Hp, S, opts = padded(H), stepwise.gate_slots(G), kernel_options(dtype, "tanh")
    xp = torch.randn(B, T, dirs * G * Hp, dtype=dtype, device=device)
    xp.view(B, T, dirs, G, Hp)[..., H:] = 0  # the projection GEMM's padded rows give zeros
    w_hh = torch.randn(dirs, G * H, Hp, dtype=dtype, device=device) * H ** -0.5
    h0, c0 = (torch.randn(dirs, B, Hp, dtype=dtype, device=device) for _ in range(2))
    for t in (w_hh, h0, c0):
        t[..., H:] = 0
    bias = torch.randn(dirs, S, H, dtype=dtype, device=device)
    lengths = torch.tensor([3, 1, 2, 3, 3, 2, 1, 3, 2], device=device)
    lay = Layout(T, B, H, dirs, dirs * Hp, T * dirs * Hp, True, False)
    dy = torch.randn(B, T, dirs * Hp, dtype=dtype, device=device)
    dh_n, dc_n = (torch.randn(dirs, B, H, dtype=dtype, device=device) for _ in range(2))
    results = []
    for backend in (stepwise, persistent):
        y = torch.full((B, T, dirs * Hp), float("nan"), dtype=dtype, device=device)
        gates, aux = torch.full_like(xp, float("nan")), torch.full_like(y, float("nan"))
        h_n, c_n = (torch.full((dirs, B, H), float("nan"), dtype=dtype, device=device) for _ in range(2))
        backend.cell_forward_recurrence(G, xp, y, gates, aux, h0, c0, w_hh, bias, h_n, c_n, lengths, opts, lay)
        dz = torch.full((B, T, dirs * S * Hp), float("nan"), dtype=dtype, device=device)
        dh0, dc0 = backend.cell_backward_recurrence(G, dy, dh_n, dc_n if G == 4 else None, y, h0, gates, aux, c0,
                                                    w_hh, dz, lengths, opts, lay)
        results.append([y, gates, aux, h_n, dz, dh0] + ([c_n, dc0] if G == 4 else []))
    assert [c.launches for c in large] == [T, 2 * T]
    tol = TOLERANCE[dtype]
    for i, (a, b) in enumerate(zip(results[1], results[0])):
        assert torch.isfinite(a).all() and rel_err(a, b) <= tol, i


def test_limits_and_errors():
    """Within CELL_LARGE_H_MAX the large kernel holds the cell (the anchor LSTM H = 768 in bf16 among them);
    beyond it backend='persistent' raises and auto uses stepwise."""
    assert persistent.cell_supports(4, 768, torch.bfloat16)
    for G in (3, 4):
        for dtype, limit in persistent.CELL_LARGE_H_MAX[G].items():
            assert persistent.cell_supports(G, limit, dtype)
            assert not persistent.cell_supports(G, limit + 1, dtype)
    with pytest.raises(ValueError, match="does not hold the LSTM at H=1025 in torch.bfloat16: its small-H kernel "
                                         "holds H ≤ 128 and its large-H kernel next_pow2\\(H\\) ≤ 1024 in "
                                         "torch.bfloat16 .*use backend='stepwise' or 'auto'"):
        persistent.cell_check_supported(4, 1025, torch.bfloat16)
    with pytest.raises(ValueError, match="does not hold the GRU at H=300 in torch.float64"):
        x = torch.randn(2, 1, 3, dtype=F64)
        gru_layer(x, None, (torch.randn(900, 3, dtype=F64),), (torch.randn(900, 300, dtype=F64),),
                    backend="persistent")


def anchor_on_a_faked_h200(monkeypatch):
    """The large-H kernels as the sm_90a compile reports them (Triton 3.6, 8 warps; registers, shared
    memory), faked; and the anchor LSTM's forward call: H = 768, B = 16, bf16, bidirectional, T = 5."""
    fakes = {name: FakeKernel(getattr(persistent, name), lambda meta, regs=regs: regs, shared=shared)
             for name, regs, shared in (("rnn_persistent_large_fwd_kernel", 175, 98304),
                                        ("rnn_persistent_large_bwd_kernel", 255, 81920))}
    for name, fake in fakes.items():
        monkeypatch.setattr(persistent, name, fake)
    G, T, B, H, dirs, bf16 = 4, 5, 16, 768, 2, torch.bfloat16
    Hp, acc = padded(H), torch.float32
    xp, gates = (torch.zeros(T, B, dirs * G * Hp, dtype=bf16) for _ in range(2))
    y = torch.zeros(T, B, dirs * Hp, dtype=bf16)
    aux, h0, c0 = torch.zeros(T, B, dirs * Hp, dtype=acc), torch.zeros(dirs, B, Hp, dtype=bf16), torch.zeros(
        dirs, B, Hp, dtype=acc)
    lay, opts = Layout.of(y, H, dirs, False, False), kernel_options(bf16, "tanh", fast_tanh=False)
    h_n = torch.zeros(dirs, B, H, dtype=bf16)
    w_hh = torch.zeros(dirs, G * H, Hp, dtype=bf16)

    def forward():
        persistent.cell_forward_recurrence(G, xp, y, gates, aux, h0, c0, w_hh, torch.zeros(dirs, G, H, dtype=acc),
                                           h_n, h_n.clone(), None, opts, lay)
    return fakes, forward, SimpleNamespace(G=G, T=T, B=B, H=H, Hp=Hp, dirs=dirs, y=y, gates=gates, aux=aux, h0=h0,
                                           c0=c0, h_n=h_n, w_hh=w_hh, lay=lay, opts=opts)


def test_plan_of_the_anchor_shape(fake_gpu, monkeypatch):
    """The anchor LSTM H = 768, B = 16, bf16, bidirectional, as the launcher plans it on an H200 (faked, with
    the sm_90a compile's registers and shared memory, Triton 3.6, 8 warps): 96 column programs of BN = 8 units
    over Hp = 768. Forward (BB = 16: one batch tile; 175 registers, 96 KiB): 1 program per SM, so one launch
    per direction. Backward (BB = 8: two tiles; 255 registers, 80 KiB): 1 per SM, one launch per direction,
    one barrier group walking both tiles."""
    fakes, forward, a = anchor_on_a_faked_h200(monkeypatch)
    G, T, B, H, Hp, dirs, bf16 = a.G, a.T, a.B, a.H, a.Hp, a.dirs, torch.bfloat16
    y, gates, aux, h0, c0, h_n, lay, opts = a.y, a.gates, a.aux, a.h0, a.c0, a.h_n, a.lay, a.opts
    dy = torch.zeros_like(y)
    forward()
    runs = launched(fakes["rnn_persistent_large_fwd_kernel"])
    assert [grid for grid, _ in runs] == [(96, 1, 1)] * 2
    assert {k: runs[0][1][k] for k in ("CELL", "BB", "BN", "BH", "K_SPLIT", "num_warps", "USE_BARRIER")} == dict(
        CELL=4, BB=16, BN=8, BH=1024, K_SPLIT=8, num_warps=8, USE_BARRIER=True)
    dz = torch.zeros(T, B, dirs * G * Hp, dtype=bf16)
    persistent.cell_backward_recurrence(G, dy, h_n.float(), h_n.float(), y, h0, gates, aux, c0,
                                        torch.zeros(dirs, G * H, Hp, dtype=bf16), dz, None, opts, lay)
    runs = launched(fakes["rnn_persistent_large_bwd_kernel"])
    assert [grid for grid, _ in runs] == [(96, 1, 1)] * 2 and runs[0][1]["BB"] == 8


def test_barrier_timeout_names_the_cells_kernel(fake_gpu, monkeypatch):
    """The bounded barrier's error, for the cells as for the Elman cell: a launch that finds its buffer's error
    word set (a wait gave up) raises RuntimeError at the next call, naming the cell's large-H kernel, H, its
    grid and launches, and the buffer is dropped."""
    monkeypatch.setattr(persistent, "ERROR_READ_INTERVAL_S", 3600.0)
    _, forward, _ = anchor_on_a_faked_h200(monkeypatch)
    forward()
    [(_, flag, _, _)] = persistent._PENDING
    flag[0] = barrier.ERROR_TIMEOUT.value
    persistent._reads.due = 0.0
    with pytest.raises(RuntimeError, match=r"rnn_persistent_large_fwd_kernel \(H=768, grid=\(96, 1, 1\), "
                                           r"2 launch\(es\)\): a grid-barrier wait gave up"):
        forward()
    assert persistent._PENDING == [] and not persistent._BARRIER_WORDS


def test_auto_needs_the_grid_to_fit(fake_gpu, monkeypatch):
    """cell_supports on CUDA (faked, the kernels' registers as compiled: one program per SM): the anchor
    LSTM's 96 column programs fit an H200's 132 SMs, not a 64-SM device, where auto uses stepwise and
    backend='persistent' says why."""
    for name, regs in (("rnn_persistent_large_fwd_kernel", 175), ("rnn_persistent_large_bwd_kernel", 255)):
        monkeypatch.setattr(persistent, name, FakeKernel(getattr(persistent, name), lambda meta, regs=regs: regs,
                                                         shared=98304))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda", 0)
    fits = []
    for sms in (132, 64):
        fake_gpu.sms = sms
        persistent._cell_large_fits.cache_clear()
        persistent._stand_in_plan.cache_clear()
        fits.append(persistent.cell_supports(4, 768, torch.bfloat16, cuda))
    try:
        assert fits == [True, False]
        with pytest.raises(ValueError, match="this GPU cannot hold the 96 programs of its large-H kernel at once"):
            persistent.cell_check_supported(4, 768, torch.bfloat16, cuda)
    finally:
        persistent._cell_large_fits.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gpu_anchor_shape_matches_stepwise(cell):
    """The anchor shape (H = 768, B = 16, bf16, both directions, T = 64) on the GPU: the persistent large-H
    kernel (one cooperative launch per pass, a grid barrier per step) against the stepwise kernels."""
    assert not INTERPRETED
    T, B, D, H, G = 64, 16, 64, 768, 4 if cell == "lstm" else 3
    assert persistent.cell_supports(G, H, torch.bfloat16)
    x = torch.randn(T, B, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weights = [[(torch.randn(G * H, n, device="cuda") * n ** -0.5).to(torch.bfloat16).requires_grad_()
                for _ in range(2)] for n in (D, H)]
    run = lstm_layer if cell == "lstm" else gru_layer
    results = []
    for backend in ("stepwise", "persistent"):
        y = run(x, None, *weights, backend=backend)[0]
        results.append([y] + list(torch.autograd.grad((y.float() ** 2).sum(), [x] + weights[0] + weights[1])))
    for a, b in zip(results[1], results[0]):
        assert rel_err(a, b) <= 2e-2
