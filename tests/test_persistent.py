"""Persistent backend: both kernel shapes against the float64 reference, launch counts, barrier reuse.

On CPU the kernels run through Triton's interpreter. The large-H kernel is forced at small H by
setting SMALL_H_MAX to 0, so its column split (several programs over H) and its one-unit-per-launch
interpreter mode are exercised by CI. GPU-marked tests cover real sizes, the grid barrier and timing.
"""
from types import SimpleNamespace

import pytest
import torch

from elman_triton import elman_rnn, persistent
from elman_triton.config import INTERPRETED, kernel_options
from elman_triton.kernels import barrier
from elman_triton.reference import elman_rnn_reference
from utils import TOLERANCE, as_float64, count_launches, leaves, make_problem, rel_err


@pytest.fixture(params=["small", "large"])
def variant(request, monkeypatch):
    if request.param == "large":
        monkeypatch.setattr(persistent, "SMALL_H_MAX", {dt: 0 for dt in persistent.SMALL_H_MAX})
    return request.param


def outputs_and_grads(fn, problem, nonlinearity, reverse, weights):
    y, h_n = fn(*problem.values(), nonlinearity=nonlinearity, reverse=reverse)
    w_y, w_h = weights
    loss = (y.double() * w_y).sum() + (h_n.double() * w_h).sum()
    return [y, h_n] + list(torch.autograd.grad(loss, leaves(problem)))


def check_against_reference(problem, nonlinearity="tanh", reverse=False, tol=None):
    """y, h_n and every gradient of the persistent backend vs the float64 reference."""
    tol = tol or TOLERANCE[problem["x"].dtype]
    ref_problem = as_float64(problem)
    T, B, _ = problem["x"].shape
    H = problem["weight_hh"].shape[0]
    weights = (torch.randn(T, B, H, dtype=torch.float64, device=problem["x"].device),
               torch.randn(B, H, dtype=torch.float64, device=problem["x"].device))
    got = outputs_and_grads(lambda *a, **k: elman_rnn(*a, **k, backend="persistent"),
                            problem, nonlinearity, reverse, weights)
    want = outputs_and_grads(elman_rnn_reference, ref_problem, nonlinearity, reverse, weights)
    names = ["y", "h_n"] + [k for k, v in problem.items() if v is not None]
    for name, a, b in zip(names, got, want):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


@pytest.mark.parametrize("variant,T,B,D,H", [
    ("small", 1, 1, 3, 5), ("small", 4, 19, 7, 37),
    ("large", 1, 1, 3, 5), ("large", 4, 19, 7, 37), ("large", 3, 2, 5, 130),  # 130: 9 column programs
], indirect=["variant"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("reverse", [False, True])
def test_matches_reference_fp32(variant, device, T, B, D, H, nonlinearity, reverse):
    problem = make_problem(T, B, D, H, torch.float32, device)
    check_against_reference(problem, nonlinearity, reverse)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision(variant, device, dtype):
    """16-bit storage, fp32 state: H = 130 is the small kernel's 256×256 block, or nine column programs."""
    check_against_reference(make_problem(3, 19, 5, 130, dtype, device))


@pytest.mark.parametrize("h0,bias", [(False, True), (True, False)])
def test_optional_h0_and_bias(variant, device, h0, bias):
    check_against_reference(make_problem(3, 5, 6, 21, torch.float32, device, h0=h0, bias=bias))


def test_matches_torch_rnn(variant, device):
    T, B, D, H = 4, 3, 6, 29
    problem = make_problem(T, B, D, H, torch.float64, device)
    rnn = torch.nn.RNN(D, H, dtype=torch.float64, device=device)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(rnn, name + "_l0").copy_(problem[name])
    y, h_n = elman_rnn(*problem.values(), backend="persistent")
    y_ref, h_ref = rnn(problem["x"], problem["h0"][None])
    assert rel_err(y, y_ref) < 1e-12 and rel_err(h_n, h_ref[0]) < 1e-12


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_gradcheck_fp64(variant, device, nonlinearity):
    problem = make_problem(3, 2, 4, 18, torch.float64, device)  # H=18: two column programs when large
    args = leaves(problem)

    def fn(*a):
        y, h_n = elman_rnn(*a, nonlinearity=nonlinearity, backend="persistent")
        return y, h_n

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("T", [1, 6])
def test_small_kernel_is_one_launch_whatever_T(device, monkeypatch, T):
    counters = count_launches(monkeypatch, persistent, "elman_persistent_small_fwd_kernel",
                              "elman_persistent_small_bwd_kernel")
    problem = make_problem(T, 3, 4, 11, torch.float32, device)
    y, h_n = elman_rnn(*problem.values(), backend="persistent")
    (y.sum() + h_n.sum()).backward()
    assert [c.launches for c in counters] == [1, 1]


@pytest.mark.parametrize("T", [1, 5])
def test_large_kernel_launches(device, monkeypatch, T):
    """One launch per direction on GPU; under the interpreter, one per step forward and one per
    phase (two per step) backward, because there the barrier cannot open."""
    monkeypatch.setattr(persistent, "SMALL_H_MAX", {dt: 0 for dt in persistent.SMALL_H_MAX})
    counters = count_launches(monkeypatch, persistent, "elman_persistent_large_fwd_kernel",
                              "elman_persistent_large_bwd_kernel")
    problem = make_problem(T, 3, 4, 40, torch.float32, device)
    y, h_n = elman_rnn(*problem.values(), backend="persistent")
    (y.sum() + h_n.sum()).backward()
    expected = [T, 2 * T] if INTERPRETED else [1, 1]
    assert [c.launches for c in counters] == expected


def test_poisoned_outputs_are_all_written(variant, device):
    """y, dz and dh0 come from NaN-filled buffers; every element must be written and correct."""
    T, B, D, H = 3, 17, 5, 33
    problem = make_problem(T, B, D, H, torch.float32, device)
    p = {k: v.detach() for k, v in problem.items()}
    opts = kernel_options(torch.float32, "tanh")
    xp = p["x"] @ p["weight_ih"].T
    y = torch.full((T, B, H), float("nan"), device=device)
    persistent.forward_recurrence(xp, p["h0"], p["weight_hh"], p["bias_ih"] + p["bias_hh"], y, opts)
    y_ref, _ = elman_rnn_reference(*as_float64(problem).values())
    assert rel_err(y, y_ref) < 1e-5

    dy, dh_n = torch.randn_like(y), torch.randn(B, H, device=device)
    dz = torch.full_like(y, float("nan"))
    dh0 = persistent.backward_recurrence(dy, dh_n, y, p["weight_hh"], dz, opts)
    assert torch.isfinite(dz).all() and torch.isfinite(dh0).all()
    # dz_t and dh0 by hand, from the definitions.
    dh = dh_n.double()
    for t in reversed(range(T)):
        dz_ref = (dy[t].double() + dh) * (1 - y[t].double() ** 2)
        assert rel_err(dz[t], dz_ref) < 1e-5
        dh = dz_ref @ p["weight_hh"].double()
    assert rel_err(dh0, dh) < 1e-5


def test_barrier_word_resets_count_and_moves_generation(device):
    """n barriers leave the count at 0 and the generation n further on, across its 16-bit wrap.
    Under the interpreter one program runs (it is every barrier's last arrival); on GPU a
    cooperative grid of one program per SM."""
    shift, mask = barrier.GENERATION_SHIFT.value, barrier.FIELD_MASK.value
    start = 0xFFFE
    word = torch.tensor([(start << shift) - (1 << 32)], dtype=torch.int32, device=device)  # as int32
    n_programs = 1 if INTERPRETED else torch.cuda.get_device_properties(device).multi_processor_count
    extra = {} if INTERPRETED else {"launch_cooperative_grid": True}
    for n_iters in (5, 0, 3):
        barrier.barrier_loop_kernel[(n_programs,)](word, n_iters, **extra)
    value = word.item() & 0xFFFFFFFF
    assert value & mask == 0
    assert value >> shift == (start + 8) & mask


def test_small_kernel_at_256_needs_the_shared_memory(monkeypatch):
    """BH = 256 (16-bit) runs the small kernel only where a program may use 180 KiB of shared memory
    (Hopper); with an A100's 163 KiB it is the large kernel's, and BH = 128 stays small."""
    cpu = torch.device("cpu")
    assert persistent._is_small(200, torch.bfloat16, cpu) and not persistent._is_small(200, torch.float32, cpu)
    monkeypatch.setattr(persistent, "_shared_bytes", lambda device: 163 * 1024)
    assert not persistent._is_small(200, torch.bfloat16, cpu) and persistent._is_small(128, torch.float16, cpu)
    assert persistent.supports(16, 200, torch.bfloat16, cpu)  # still held, by the large kernel


class FakeKernel:
    """Stands in for a compiled large-H kernel: warmup reports n_regs and shared bytes, launches are
    recorded. Lets CPU tests run the launcher's GPU branch (grid sizing, cooperative launch options)."""

    def __init__(self, n_regs, shared):
        self.compiled = SimpleNamespace(n_regs=n_regs, metadata=SimpleNamespace(shared=shared),
                                        _init_handles=lambda: None)
        self.launches = []

    def warmup(self, *args, grid, **meta):
        return self.compiled

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((grid, args, meta))


@pytest.fixture
def gpu_branch(monkeypatch):
    """The launcher as on a 132-SM Hopper GPU: no interpreter, Triton's device properties, a barrier buffer."""
    monkeypatch.setattr(persistent, "INTERPRETED", False)
    monkeypatch.setattr(persistent, "_device_properties",
                        lambda device: {"max_num_regs": 65536, "max_shared_mem": 232448, "multiprocessor_count": 132})
    words = torch.zeros(256, dtype=torch.int32)
    monkeypatch.setattr(persistent, "_barrier_words", lambda device, n_group: words)
    return words


def test_large_launch_is_one_cooperative_grid_sized_by_occupancy(gpu_branch):
    T, B, H = 1024, 64, 1024  # 64 column programs, 4 batch tiles
    y = torch.empty(T, B, H, dtype=torch.bfloat16)
    kernel = FakeKernel(n_regs=75, shared=65536)  # 80 registers × 256 threads: 3 programs per SM
    persistent._launch_large(kernel, y, n_units=T, args=("xp", "h0", "w", "b", y), strides=(1, 2),
                             meta=dict(BH=1024))
    [(grid, args, meta)] = kernel.launches
    assert grid == (64, 4)  # capacity 3 × 132 = 396 programs: every batch tile its own barrier group
    assert args == ("xp", "h0", "w", "b", y, gpu_branch, T, B, H, 0, T, 1, 2)
    assert meta == dict(BH=1024, BN=16, K_SPLIT=8, num_warps=8, USE_BARRIER=True, launch_cooperative_grid=True)

    kernel = FakeKernel(n_regs=128, shared=131072)  # one program per SM: 132 programs, 64 per group
    persistent._launch_large(kernel, y, n_units=T, args=("xp", "h0", "w", "b", y), strides=(1, 2), meta=dict(BH=1024))
    assert kernel.launches[0][0] == (64, 2)

    # 81 registers are allocated as 88: 2 programs per SM, not the 3 that 81 × 256 threads would suggest.
    y = torch.empty(T, 256, H, dtype=torch.bfloat16)  # 16 batch tiles
    kernel = FakeKernel(n_regs=81, shared=65536)
    persistent._launch_large(kernel, y, n_units=T, args=("xp", "h0", "w", "b", y), strides=(1, 2), meta=dict(BH=1024))
    assert kernel.launches[0][0] == (64, 4)  # 264 co-resident programs, 4 groups of 64


def test_large_launch_refuses_a_grid_that_cannot_co_reside(gpu_branch, monkeypatch):
    monkeypatch.setattr(persistent, "_device_properties",
                        lambda device: {"max_num_regs": 65536, "max_shared_mem": 232448, "multiprocessor_count": 40})
    kernel = FakeKernel(n_regs=128, shared=131072)  # 40 programs at once, 128 needed
    y = torch.empty(8, 16, 2048, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="needs 128 co-resident programs but this GPU holds 40"):
        persistent._launch_large(kernel, y, n_units=8, args=(y,) * 5, strides=(), meta=dict(BH=2048))
    assert kernel.launches == []


def test_unsupported_size_fails_clearly():
    with pytest.raises(ValueError, match="does not hold H=8192"):
        persistent.check_supported(16, 8192, torch.float32, torch.device("cpu"))
    assert persistent.supports(16, 2048, torch.bfloat16, None)
    assert not persistent.supports(16, 2048, torch.float32, None)


# ---------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("H", [1024, 2048])
@pytest.mark.parametrize("B", [1, 16, 64, 256])
def test_gpu_large_sizes(dtype, H, B):
    if not persistent.supports(B, H, dtype, torch.device("cuda")):
        with pytest.raises(ValueError):
            elman_rnn(*make_problem(2, B, 8, H, dtype, "cuda").values(), backend="persistent")
        return
    check_against_reference(make_problem(64, B, 256, H, dtype, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1024, 4096])
def test_gpu_long_sequences(T):
    problem = make_problem(T, 16, 128, 1024, torch.bfloat16, "cuda")
    y, h_n = elman_rnn(*problem.values(), backend="persistent")
    y_ref, h_ref = elman_rnn_reference(*as_float64(problem).values())
    assert rel_err(y, y_ref) < TOLERANCE[torch.bfloat16] and rel_err(h_n, h_ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("H", [64, 2048])
def test_gpu_repeated_calls_do_not_drift(H):
    """Hundreds of launches in a row give bit-identical results and leave every barrier count at 0."""
    problem = make_problem(32, 16, 64, H, torch.bfloat16, "cuda")
    first = elman_rnn(*problem.values(), backend="persistent")[0]
    for _ in range(300):
        again = elman_rnn(*problem.values(), backend="persistent")[0]
    torch.cuda.synchronize()
    assert torch.equal(first, again)
    for words in persistent._BARRIER_WORDS.values():
        assert ((words & barrier.FIELD_MASK.value) == 0).all()


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    problem = {k: v.detach() for k, v in make_problem(16, 8, 64, 2048, torch.bfloat16, "cuda").items()}
    expected = elman_rnn(*problem.values(), backend="persistent")[0]  # also the warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = elman_rnn(*problem.values(), backend="persistent")[0]
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, expected)


@pytest.mark.gpu
def test_gpu_auto_picks_persistent():
    problem = make_problem(4, 16, 32, 1024, torch.bfloat16, "cuda")
    y_auto = elman_rnn(*problem.values())[0]
    y_persistent = elman_rnn(*problem.values(), backend="persistent")[0]
    assert torch.equal(y_auto, y_persistent)


@pytest.mark.gpu
def test_gpu_fast_tanh_accuracy():
    """tanh.approx.f32: relative norm error of the whole forward pass stays below 1e-3 (documented
    max relative error per call 2^-10.987), far from the 1e-5 IEEE path."""
    problem = {k: v.detach() for k, v in make_problem(64, 16, 64, 256, torch.float32, "cuda").items()}
    xp = problem["x"] @ problem["weight_ih"].T
    bias = problem["bias_ih"] + problem["bias_hh"]
    y_ref, _ = elman_rnn_reference(*as_float64(problem).values())
    for fast, bound in ((True, 1e-3), (False, 1e-5)):
        y = torch.empty_like(xp)
        persistent.forward_recurrence(xp, problem["h0"], problem["weight_hh"], bias, y,
                                      kernel_options(torch.float32, "tanh", fast_tanh=fast))
        assert rel_err(y, y_ref) < bound, (fast, rel_err(y, y_ref))


@pytest.mark.gpu
def test_gpu_barrier_latency_is_measured():
    latency = persistent.barrier_latency_us(iters=2000)
    assert 0.0 < latency < 100.0
