"""Persistent backend: both kernel shapes against the float64 reference, launch counts, barrier reuse.

On CPU the kernels run through Triton's interpreter. The large-H kernel is forced at small H by
setting SMALL_H_MAX to 0, so its column split (several programs over H) and its one-unit-per-launch
interpreter mode are exercised by CI. GPU-marked tests cover real sizes, the grid barrier and timing.
"""
import pytest
import torch

from elman_triton import elman_rnn, persistent
from elman_triton.config import INTERPRETED, kernel_options
from elman_triton.reference import elman_rnn_reference
from test_stepwise import backward, forward
from utils import TOLERANCE, LaunchCounter, as_float64, leaves, make_problem, rel_err


@pytest.fixture(params=["small", "large"])
def variant(request, monkeypatch):
    if request.param == "large":
        monkeypatch.setattr(persistent, "SMALL_H_MAX", {dt: 0 for dt in persistent.SMALL_H_MAX})
    monkeypatch.setattr(persistent, "_PLANS", {})  # a plan picks its kernel by SMALL_H_MAX once
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


class CompiledLaunchCounter(LaunchCounter):
    """Counts launches through kernel[grid] (the interpreter) and through the compiled kernel that the
    launcher's cached plans call directly (GPU)."""

    def warmup(self, *args, **kwargs):
        compiled, counter = self.kernel.warmup(*args, **kwargs), self

        class Counted:
            def __getitem__(self, grid):
                launch = compiled[grid]

                def counted(*a, **k):
                    counter.launches += 1
                    return launch(*a, **k)
                return counted

            def __getattr__(self, name):
                return getattr(compiled, name)
        return Counted()


def count_launches(monkeypatch, module, *names):
    counters = [CompiledLaunchCounter(getattr(module, name)) for name in names]
    for name, counter in zip(names, counters):
        monkeypatch.setattr(module, name, counter)
    monkeypatch.setattr(persistent, "_PLANS", {})  # plans made with the kernels before
    return counters


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
    T, B, D, H = 3, 17, 5, 32
    problem = make_problem(T, B, D, H, torch.float32, device)
    p = {k: v.detach() for k, v in problem.items()}
    opts = kernel_options(torch.float32, "tanh")
    xp = p["x"] @ p["weight_ih"].T
    y = torch.full((T, B, H), float("nan"), device=device)
    h_n = forward(persistent, xp, p["h0"], p["weight_hh"], p["bias_ih"] + p["bias_hh"], y, opts, False)
    y_ref, h_ref = elman_rnn_reference(*as_float64(problem).values())
    assert rel_err(y, y_ref) < 1e-5 and rel_err(h_n, h_ref) < 1e-5

    dy, dh_n = torch.randn_like(y), torch.randn(B, H, device=device)
    dz = torch.full_like(y, float("nan"))
    dh0 = backward(persistent, dy, dh_n, y, p["weight_hh"], dz, opts, False)
    assert torch.isfinite(dz).all() and torch.isfinite(dh0).all()
    # dz_t and dh0 by hand, from the definitions.
    dh = dh_n.double()
    for t in reversed(range(T)):
        dz_ref = (dy[t].double() + dh) * (1 - y[t].double() ** 2)
        assert rel_err(dz[t], dz_ref) < 1e-5
        dh = dz_ref @ p["weight_hh"].double()
    assert rel_err(dh0, dh) < 1e-5


def test_small_kernel_at_256_needs_the_shared_memory(monkeypatch):
    """BH = 256 (16-bit) runs the small kernel only where a program may use 180 KiB of shared memory
    (Hopper); with an A100's 163 KiB it is the large kernel's, and BH = 128 stays small."""
    cpu = torch.device("cpu")
    assert persistent._is_small(200, torch.bfloat16, cpu) and not persistent._is_small(200, torch.float32, cpu)
    monkeypatch.setattr(persistent, "_shared_bytes", lambda device: 163 * 1024)
    assert not persistent._is_small(200, torch.bfloat16, cpu) and persistent._is_small(128, torch.float16, cpu)
    assert persistent.supports(16, 200, torch.bfloat16, cpu)  # still held, by the large kernel


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
    persistent.check_errors(wait=True)
    for words in persistent._BARRIER_WORDS.values():  # the flip barrier's words: arrivals all settled
        assert ((words & 0x7FFFFFFF) == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("H", [64, 2048])
def test_gpu_cuda_graph_replay(H):
    """Capture (on torch.cuda.graph's side stream, whose barrier buffer is made during the capture),
    replay, and replay after new input, while eager calls run between replays."""
    problem = {k: v.detach() for k, v in make_problem(16, 8, 64, H, torch.bfloat16, "cuda").items()}
    expected = elman_rnn(*problem.values(), backend="persistent")[0]  # also compiles the kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = elman_rnn(*problem.values(), backend="persistent")[0]
    for _ in range(20):
        graph.replay()
        elman_rnn(*problem.values(), backend="persistent")  # eager calls share no barrier word with it
    torch.cuda.synchronize()
    assert torch.equal(y, expected)
    problem["x"].copy_(torch.randn_like(problem["x"]))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, elman_rnn(*problem.values(), backend="persistent")[0])


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
        y = torch.empty_like(xp)  # H = 256: no padding
        forward(persistent, xp, problem["h0"], problem["weight_hh"], bias, y,
                kernel_options(torch.float32, "tanh", fast_tanh=fast), False)
        assert rel_err(y, y_ref) < bound, (fast, rel_err(y, y_ref))


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["flip", "count"])
def test_gpu_barrier_latency_is_measured(scheme):
    latency = persistent.barrier_latency_us(iters=2000, scheme=scheme)
    assert 0.0 < latency < 100.0
