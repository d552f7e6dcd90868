"""elman_rnn_layer: both directions in one launch, variable lengths inside the kernels, batch_first through
strides, and H not a multiple of 16 on the aligned (padded) layout; every backend against a float64
torch.nn.RNN (packed where lengths are given), with h_n and every gradient."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils._python_dispatch import TorchDispatchMode

from elman_triton import elman_rnn, elman_rnn_layer, persistent, stepwise
from elman_triton.config import padded
from utils import count_launches, rel_err

BACKENDS = ["stepwise", "persistent", "auto", "reference"]
TRITON_BACKENDS = ["stepwise", "persistent"]


def make_layer(T, B, D, H, dirs, batch_first, dtype=torch.float64, device="cpu", nonlinearity="tanh"):
    """An nn.RNN (float64, CPU) and leaf copies of its inputs and parameters in dtype on device."""
    rnn = torch.nn.RNN(D, H, nonlinearity=nonlinearity, bidirectional=dirs == 2, batch_first=batch_first,
                       dtype=torch.float64)
    x = torch.randn((B, T, D) if batch_first else (T, B, D), dtype=torch.float64)
    h0 = torch.randn(dirs, B, H, dtype=torch.float64)
    params = [[p.detach().to(device, dtype).requires_grad_() for p in ws] for ws in rnn.all_weights]
    return rnn, x.to(device, dtype).requires_grad_(), h0.to(device, dtype).requires_grad_(), params


def layer_call(x, h0, params, backend, lengths, batch_first, nonlinearity="tanh"):
    w_ih, w_hh, b_ih, b_hh = (tuple(ws[i] for ws in params) for i in range(4))
    return elman_rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, backend=backend, lengths=lengths,
                           batch_first=batch_first, nonlinearity=nonlinearity)


def nn_rnn_call(rnn, x, h0, params, lengths, batch_first):
    """nn.RNN with these parameters, on packed input when lengths are given (padding 0 in y)."""
    names = [name for name, _ in rnn.named_parameters()]
    flat = {name: p for name, p in zip(names, [p.cpu().double() for ws in params for p in ws])}
    x, h0 = x.cpu().double(), h0.cpu().double()
    if lengths is None:
        return torch.func.functional_call(rnn, flat, (x, h0))
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=batch_first, enforce_sorted=False)
    y, h_n = torch.func.functional_call(rnn, flat, (packed, h0))
    y, _ = pad_packed_sequence(y, batch_first=batch_first, total_length=x.shape[1 if batch_first else 0])
    return y, h_n


def values_and_grads(call, x, h0, params, w_y, w_h):
    y, h_n = call()
    leaves = [x, h0, *(p for ws in params for p in ws)]
    return [y, h_n, *torch.autograd.grad((y * w_y.to(y)).sum() + (h_n * w_h.to(h_n)).sum(), leaves)]


def check_layer(T, B, D, H, dirs, batch_first, lengths, backend, device, dtype=torch.float64, tol=1e-10,
                nonlinearity="tanh"):
    rnn, x, h0, params = make_layer(T, B, D, H, dirs, batch_first, dtype, device, nonlinearity)
    rnn.nonlinearity = nonlinearity
    w_y = torch.randn((B, T, dirs * H) if batch_first else (T, B, dirs * H), dtype=torch.float64)
    w_h = torch.randn(dirs, B, H, dtype=torch.float64)
    lengths_dev = None if lengths is None else torch.tensor(lengths, device=device)
    got = values_and_grads(lambda: layer_call(x, h0, params, backend, lengths_dev, batch_first, nonlinearity),
                           x, h0, params, w_y.to(device), w_h.to(device))
    x64, h064 = x.detach().double().cpu().requires_grad_(), h0.detach().double().cpu().requires_grad_()
    p64 = [[p.detach().double().cpu().requires_grad_() for p in ws] for ws in params]
    expected = values_and_grads(lambda: nn_rnn_call(rnn, x64, h064, p64, None if lengths is None else
                                                    torch.tensor(lengths), batch_first), x64, h064, p64, w_y, w_h)
    names = ["y", "h_n", "x", "h0"] + [f"{n}_{d}" for d in range(dirs) for n in ("w_ih", "w_hh", "b_ih", "b_hh")]
    errors = {name: rel_err(a.cpu(), b) for name, a, b in zip(names, got, expected)}
    bad = {k: f"{v:.2g}" for k, v in errors.items() if not v <= tol}
    assert not bad, f"{backend}: relative error above {tol} in {bad}"


# Unsorted lengths with the longest not first, a row of length 1, one of full length T.
LENGTHS = {5: [2, 5, 1, 4], 3: [3, 1, 2, 3, 2, 1, 3]}


@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "lengths"])
@pytest.mark.parametrize("dirs", [1, 2], ids=["uni", "bi"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_matches_nn_rnn(backend, dirs, packed, batch_first, device):
    T, B = 5, 4
    check_layer(T, B, 3, 7, dirs, batch_first, LENGTHS[T] if packed else None, backend, device)


@pytest.mark.parametrize("H", [20, 72], ids=["small-kernel", "large-kernel"])  # fp64: the large kernel from H > 64
@pytest.mark.parametrize("dirs", [1, 2], ids=["uni", "bi"])
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_lengths_both_kernels_and_relu(backend, dirs, H, device):
    T = 3
    check_layer(T, 7, 4, H, dirs, True, LENGTHS[T], backend, device, nonlinearity="relu")


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_lengths_in_fp32_on_a_sorted_batch(backend, device):
    check_layer(5, 4, 3, 9, 2, False, sorted(LENGTHS[5], reverse=True), backend, device,
                dtype=torch.float32, tol=1e-5)


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_single_direction_reverse_with_lengths(backend, device):
    """A reverse-only layer with lengths: each row starts at its own end (nn.RNN has no such layer, so
    the oracle is the reverse half of a bidirectional one)."""
    T, B, D, H = 5, 4, 3, 6
    rnn, x, h0, params = make_layer(T, B, D, H, 2, False, device=device)
    lengths = torch.tensor(LENGTHS[T])
    y, h_n = elman_rnn(x, h0[1], *params[1], backend=backend, reverse=True, lengths=lengths.to(device))
    y_ref, h_ref = nn_rnn_call(rnn, x, h0, params, lengths, False)
    assert rel_err(y.cpu(), y_ref[..., H:]) < 1e-12 and rel_err(h_n.cpu(), h_ref[1]) < 1e-12


class OpLog(TorchDispatchMode):
    """The aten ops a block runs, by name, outside the Triton launches (Triton's interpreter copies
    every argument in and out of each launch, which a GPU does not)."""

    def __enter__(self):
        self.names, self.on_floats, self.in_kernel = [], [], False
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_kernel:
            self.names.append(func.__name__)
            self.on_floats.append(bool(args) and torch.is_tensor(args[0]) and args[0].is_floating_point())
        return func(*args, **(kwargs or {}))

    def silence(self, monkeypatch, module, name):
        """Replace module.name (a kernel) by one whose launches are not logged."""
        kernel, log = getattr(module, name), self

        class Silenced:
            def __getitem__(self, grid):
                def launch(*args, **meta):
                    log.in_kernel = True
                    try:
                        return kernel[grid](*args, **meta)
                    finally:
                        log.in_kernel = False
                return launch

            def __getattr__(self, attr):
                return getattr(kernel, attr)
        monkeypatch.setattr(module, name, Silenced())


COPYING_OPS = ("gather", "index.Tensor", "cat", "clone", "copy_", "flip", "transpose_copy", "_to_copy")


@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_lengths_and_batch_first_copy_nothing(backend, batch_first, monkeypatch, device):
    """With H a multiple of 16 the forward gathers, concatenates or copies nothing: no per-row reversal
    for the reverse direction, no transposed x or y, no torch.cat of the directions."""
    T, B, D, H = 4, 3, 5, 16
    _, x, h0, params = make_layer(T, B, D, H, 2, batch_first, torch.float32, device)
    lengths = torch.tensor([4, 1, 3], device=device)
    with torch.no_grad(), OpLog() as log:
        for module, name in ((stepwise, "elman_step_fwd_kernel"), (persistent, "elman_persistent_small_fwd_kernel")):
            log.silence(monkeypatch, module, name)
        y, _ = layer_call(x, h0, params, backend, lengths, batch_first)
    copies = [name for name in log.names if name.startswith(COPYING_OPS)]
    assert copies == [] and y.shape == ((B, T, 2 * H) if batch_first else (T, B, 2 * H)), copies
    assert y.is_contiguous()


@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
def test_both_directions_share_each_launch(backend, monkeypatch, device):
    """A bidirectional layer launches exactly what one direction does: the direction is a grid axis."""
    T, B, D, H = 3, 2, 4, 72  # fp32 H=72: the large persistent kernel (one launch per step/phase here)
    module = stepwise if backend == "stepwise" else persistent
    names = (("elman_step_fwd_kernel", "elman_step_bwd_kernel") if backend == "stepwise" else
             ("elman_persistent_large_fwd_kernel", "elman_persistent_large_bwd_kernel"))
    counts = {}
    for dirs in (1, 2):
        fwd, bwd = count_launches(monkeypatch, module, *names)
        _, x, h0, params = make_layer(T, B, D, H, dirs, False, torch.float32, device)
        y, h_n = layer_call(x, h0, params, backend, None, False)
        (y.sum() + h_n.sum()).backward()
        counts[dirs] = (fwd.launches, bwd.launches)
        monkeypatch.undo()
    expected = (T, T) if backend == "stepwise" else (T, 2 * T)  # interpreter: one launch per step (phase)
    assert counts[1] == counts[2] == expected


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_unaligned_H_runs_on_rows_padded_to_16(backend, monkeypatch, device):
    """H = 20: the kernels get a row stride that is a multiple of 16 (Triton then specialises it and
    vectorises the loads), and the user still gets nn.RNN's contiguous (T, B, H) output."""
    module = stepwise if backend == "stepwise" else persistent
    name = "elman_step_fwd_kernel" if backend == "stepwise" else "elman_persistent_small_fwd_kernel"
    seen = []
    kernel = getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                seen.append(args)
                return kernel[grid](*args, **meta)
            return launch

        def __getattr__(self, attr):
            return getattr(kernel, attr)
    monkeypatch.setattr(module, name, Spy())
    _, x, h0, params = make_layer(3, 5, 4, 20, 1, False, torch.float32, device)
    y, _ = layer_call(x, h0, params, backend, None, False)
    args = seen[0]
    stride_t, stride_b, stride_d = (args[i] for i in range(len(args)) if kernel.arg_names[i] in
                                    ("stride_y_t", "stride_y_b", "stride_y_d"))
    assert stride_b == stride_d == padded(20) == 32 and stride_t == 5 * 32
    assert y.shape == (3, 5, 20) and y.is_contiguous()


@pytest.mark.parametrize("lengths,error,pattern", [
    (torch.tensor([3, 0, 2]), ValueError, r"every length must be in \[1, T\] = \[1, 3\], got values from 0"),
    (torch.tensor([3, 4, 2]), ValueError, r"every length must be in \[1, T\] = \[1, 3\], got values from 2 to 4"),
    (torch.tensor([3, 2]), ValueError, r"lengths must have shape \(B,\) = \(3,\)"),
    (torch.tensor([[3, 2, 1]]), ValueError, r"lengths must have shape"),
    (torch.tensor([3.0, 2.0, 1.0]), TypeError, r"lengths must be int32 or int64"),
    ([3, 2, 1], TypeError, r"lengths must be a \(B,\) integer tensor"),
], ids=["zero", "past-T", "short", "2-d", "float", "list"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_lengths_are_rejected(backend, lengths, error, pattern, device):
    _, x, h0, params = make_layer(3, 3, 2, 4, 1, False, device=device)
    if torch.is_tensor(lengths):
        lengths = lengths.to(device)
    with pytest.raises(error, match=pattern):
        layer_call(x, h0, params, backend, lengths, False)


@pytest.mark.gpu
def test_gpu_lengths_on_another_device_are_rejected():
    _, x, h0, params = make_layer(3, 3, 2, 4, 1, False, device="cuda")
    with pytest.raises(ValueError, match="lengths is on cpu but x is on cuda"):
        layer_call(x, h0, params, "stepwise", torch.tensor([3, 2, 1]), False)


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_module_runs_one_launch_per_layer_for_both_directions(backend, monkeypatch, device):
    """A 2-layer bidirectional ElmanRNN on packed input: per pass, the launches of one direction per
    layer (persistent: 1 per layer; stepwise: T per layer), so both directions share every launch."""
    from elman_triton import ElmanRNN
    T, B, D, H = 4, 3, 5, 12
    module = stepwise if backend == "stepwise" else persistent
    names = (("elman_step_fwd_kernel", "elman_step_bwd_kernel") if backend == "stepwise" else
             ("elman_persistent_small_fwd_kernel", "elman_persistent_small_bwd_kernel"))
    fwd, bwd = count_launches(monkeypatch, module, *names)
    rnn = ElmanRNN(D, H, num_layers=2, bidirectional=True, backend=backend, device=device)
    x = torch.randn(T, B, D, device=device)
    packed = pack_padded_sequence(x, torch.tensor([4, 2, 3]), enforce_sorted=False)
    y, h_n = rnn(packed)
    (y.data.square().sum() + h_n.sum()).backward()
    per_layer = T if backend == "stepwise" else 1
    assert (fwd.launches, bwd.launches) == (2 * per_layer, 2 * per_layer)


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_module_gathers_nothing_for_the_reverse_direction(backend, monkeypatch, device):
    """Packed input through a 2-layer bidirectional ElmanRNN: one index op into the padded batch and one
    back into packed rows (what packing needs), and no gather or flip of x or y in either pass; the only
    cat joins the layers' small h_n."""
    from elman_triton import ElmanRNN
    T, B, D, H = 4, 3, 5, 16
    rnn = ElmanRNN(D, H, num_layers=2, bidirectional=True, backend=backend, device=device)
    packed = pack_padded_sequence(torch.randn(T, B, D, device=device), torch.tensor([4, 2, 3]), enforce_sorted=False)
    with OpLog() as log:
        for module, name in ((stepwise, "elman_step_fwd_kernel"), (stepwise, "elman_step_bwd_kernel"),
                             (persistent, "elman_persistent_small_fwd_kernel"),
                             (persistent, "elman_persistent_small_bwd_kernel")):
            log.silence(monkeypatch, module, name)
        y, h_n = rnn(packed)
        (y.data.square().sum() + h_n.sum()).backward()
    assert not [n for n in log.names if n.startswith(("gather", "flip"))], log.names
    assert [n for n in log.names if n.startswith("cat")] == ["cat.default"]
    end = log.names.index("sum.default")  # the loss: forward ends here
    moved = [n for n, on_float in zip(log.names[:end], log.on_floats[:end]) if on_float and n == "index.Tensor"]
    assert moved == ["index.Tensor"] * 2  # pad the packed rows once, pack the output once
