"""LSTM, GRU, LSTMCell, GRUCell and their ops against torch.nn's, in float64 on every backend: outputs,
h_n, c_n and the gradient of the input, the initial states and every parameter; the Triton path on odd
shapes (H and B not powers of 2, T = 1, B = 1, B across batch tiles), both directions, several layers,
batch_first, packed input, lengths in reverse, proj_size; fp64 gradcheck of the kernels; state dicts
both ways; nn's errors."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from elman_triton import stepwise
from elman_triton.family import GRU, LSTM, GRUCell, LSTMCell
from elman_triton.family_ops import gru, gru_layer, lstm, lstm_layer
from elman_triton.reference import gru_reference, lstm_reference
from utils import count_launches, rel_err

F64 = torch.float64
TOL = 1e-12  # float64, as utils.TOLERANCE
OURS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell}
BACKENDS = ["reference", "auto", "stepwise", "persistent"]


def twins(nn_cls, backend, device, **kwargs):
    """torch.nn's module and ours with the same parameters (loaded through our state dict), float64."""
    ref = nn_cls(**kwargs, dtype=F64, device=device)
    ours = OURS[nn_cls](**kwargs, dtype=F64, device=device, backend=backend)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def flat(out):
    """The tensors of a module's output: (y, h) or (y, (h, c)), PackedSequence data for packed y."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, nn.utils.rnn.PackedSequence):
        return [out.data]
    return [t for o in out for t in flat(o)]


def assert_same(ref, ours, make_inputs):
    """Values and every gradient (inputs, states, parameters) of ours against ref on fresh inputs."""
    inputs = make_inputs()
    leaves = [t for t in flat(inputs) if t.requires_grad]
    outs = [flat(m(*inputs)) for m in (ref, ours)]
    assert len(outs[0]) == len(outs[1])
    for a, b in zip(outs[1], outs[0]):
        assert a.shape == b.shape and rel_err(a, b) <= TOL
    weights = [torch.randn_like(t) for t in outs[0]]  # every output gets its own random cotangent
    grads = []
    for m, out in zip((ref, ours), outs):
        loss = sum((w * t).sum() for w, t in zip(weights, out))
        grads.append(torch.autograd.grad(loss, leaves + list(m.parameters())))
    names = [f"input {i}" for i in range(len(leaves))] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, grads[1], grads[0]):
        assert rel_err(a, b) <= TOL, name


def rand(*shape, device):
    return torch.randn(*shape, dtype=F64, device=device, requires_grad=True)


MODULE_CASES = {  # (T, B, D, H, options): odd H and B, T = 1, B = 1, B across the kernels' batch tiles
    "deep-bidirectional": (4, 3, 5, 17, dict(num_layers=2, bidirectional=True)),
    "batch-first-T1": (1, 5, 3, 6, dict(batch_first=True)),
    "B1-no-bias": (3, 1, 2, 5, dict(bias=False)),
    "B-across-tiles": (2, 65, 2, 3, dict()),
}
# The persistent small-H kernel holds H ≤ 16 for the fp64 LSTM (persistent.CELL_SMALL_H_MAX): its own shapes.
PERSISTENT_CASES = {
    "deep-bidirectional": (3, 3, 5, 13, dict(num_layers=2, bidirectional=True)),
    "batch-first-T1": MODULE_CASES["batch-first-T1"],
    "B1-no-bias": MODULE_CASES["B1-no-bias"],
    "B-across-tiles": (2, 17, 2, 3, dict()),
}


@pytest.mark.parametrize("backend", BACKENDS[:3])
@pytest.mark.parametrize("case", MODULE_CASES)
@pytest.mark.parametrize("nn_cls", [nn.LSTM, nn.GRU], ids=["LSTM", "GRU"])
def test_module_matches_nn(nn_cls, case, backend, device):
    check_module(nn_cls, MODULE_CASES[case], backend, device)


@pytest.mark.parametrize("case", PERSISTENT_CASES)
@pytest.mark.parametrize("nn_cls", [nn.LSTM, nn.GRU], ids=["LSTM", "GRU"])
def test_module_matches_nn_persistent(nn_cls, case, device):
    """backend="persistent" (the small-H kernel, one launch per layer and pass) against nn."""
    check_module(nn_cls, PERSISTENT_CASES[case], "persistent", device)


def check_module(nn_cls, case, backend, device):
    T, B, D, H, options = case
    ref, ours = twins(nn_cls, backend, device, input_size=D, hidden_size=H, **options)
    layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    shape = (B, T, D) if options.get("batch_first") else (T, B, D)

    def inputs():
        h0 = rand(layers, B, H, device=device)
        return (rand(*shape, device=device), (h0, rand(layers, B, H, device=device)) if nn_cls is nn.LSTM else h0)
    assert_same(ref, ours, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nn_cls", [nn.LSTM, nn.GRU], ids=["LSTM", "GRU"])
def test_packed_sequence(nn_cls, backend, device):
    """Unsorted lengths, both directions, without and with hx (permuted like the rows): PackedSequence out,
    h_n (c_n) each row's own last state."""
    T, B, D, H = 5, 4, 3, 7
    ref, ours = twins(nn_cls, backend, device, input_size=D, hidden_size=H, bidirectional=True)
    lengths = torch.tensor([3, 5, 1, 4])

    def inputs():
        return (pack_padded_sequence(rand(T, B, D, device=device), lengths, enforce_sorted=False),)
    assert_same(ref, ours, inputs)

    def inputs_with_hx():
        h0 = rand(2, B, H, device=device)
        return inputs() + ((h0, rand(2, B, H, device=device)) if nn_cls is nn.LSTM else h0,)
    assert_same(ref, ours, inputs_with_hx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_proj_size_and_unbatched(backend, device):
    """proj_size (the Triton backends' documented reference path) and unbatched 2-D input with (h0, c0)."""
    T, D, H, P = 3, 4, 6, 3
    ref, ours = twins(nn.LSTM, backend, device, input_size=D, hidden_size=H, proj_size=P, num_layers=2)
    assert_same(ref, ours, lambda: (rand(T, D, device=device), (rand(2, P, device=device), rand(2, H, device=device))))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nn_cls", [nn.LSTMCell, nn.GRUCell], ids=["LSTMCell", "GRUCell"])
def test_cells_match_nn(nn_cls, backend, device):
    B, D, H = 3, 4, 5
    ref, ours = twins(nn_cls, backend, device, input_size=D, hidden_size=H)

    def inputs():
        h0 = rand(B, H, device=device)
        return rand(B, D, device=device), (h0, rand(B, H, device=device)) if nn_cls is nn.LSTMCell else h0
    assert_same(ref, ours, inputs)
    assert_same(ref, ours, lambda: (rand(D, device=device),))  # unbatched, no hx


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_reverse_with_lengths(cell, device):
    """A reverse-only layer with lengths (no nn counterpart): each row starts at its own end; the Triton
    path against the reference loop, values and gradients."""
    T, B, D, H, G = 4, 3, 2, 5, 4 if cell == "lstm" else 3
    x, h0, c0 = rand(T, B, D, device=device), rand(B, H, device=device), rand(B, H, device=device)
    weights = [rand(G * H, D, device=device), rand(G * H, H, device=device), rand(G * H, device=device),
               rand(G * H, device=device)]
    lengths = torch.tensor([2, 4, 1], device=device)
    results = []
    for backend in ("reference", "stepwise", "persistent"):
        if cell == "lstm":
            y, (h, c) = lstm(x, (h0, c0), *weights, backend=backend, reverse=True, lengths=lengths)
            outs = [y, h, c]
        else:
            y, h = gru(x, h0, *weights, backend=backend, reverse=True, lengths=lengths)
            outs = [y, h]
        loss = sum((torch.sin(t) * (i + 1)).sum() for i, t in enumerate(outs))
        results.append(outs + list(torch.autograd.grad(loss, [x, h0] + ([c0] if cell == "lstm" else []) + weights)))
    for a, b in zip(results[1], results[0]):
        assert rel_err(a, b) <= TOL


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradcheck_kernels(cell, device):
    """fp64 gradcheck of the stepwise kernels through the layer op: two directions, batch_first, H not a
    multiple of 16, lengths. fast_mode (a random projection of the Jacobian) keeps it to a few passes
    of the interpreted kernels; the comparisons against nn above check every gradient entry."""
    T, B, D, H, G = 2, 2, 2, 3, 4 if cell == "lstm" else 3
    x = rand(B, T, D, device=device)
    h0, c0 = rand(2, B, H, device=device), rand(2, B, H, device=device)
    w = [rand(G * H, n, device=device) * 0.5 for n in (D, H)] + [rand(G * H, device=device) for _ in range(2)]
    lengths = torch.tensor([2, 1], device=device)

    def run(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        args = ((w_ih, w_ih.flip(0)), (w_hh, w_hh.flip(0)), (b_ih, b_ih), (b_hh, b_hh))
        if cell == "lstm":
            y, (h, c) = lstm_layer(x, (h0, c0), *args, backend="stepwise", batch_first=True, lengths=lengths)
            return y, h, c
        return gru_layer(x, h0, *args, backend="stepwise", batch_first=True, lengths=lengths)
    assert torch.autograd.gradcheck(run, (x, h0, c0, *(t.detach().requires_grad_() for t in w)), fast_mode=True)


def test_functional_ops_match_references(device):
    """lstm / gru (one direction) against lstm_reference / gru_reference, on the Triton path."""
    T, B, D, H = 3, 2, 4, 5
    x, h0, c0 = rand(T, B, D, device=device), rand(B, H, device=device), rand(B, H, device=device)
    lw = [rand(4 * H, D, device=device), rand(4 * H, H, device=device)]
    gw = [rand(3 * H, D, device=device), rand(3 * H, H, device=device)]
    y, (h, c) = lstm(x, (h0, c0), *lw, backend="stepwise")
    y_ref, h_ref, c_ref = lstm_reference(x, h0, c0, *lw)
    assert max(rel_err(a, b) for a, b in ((y, y_ref), (h, h_ref), (c, c_ref))) <= TOL
    y, h = gru(x, h0, *gw, backend="stepwise")
    y_ref, h_ref = gru_reference(x, h0, *gw)
    assert max(rel_err(a, b) for a, b in ((y, y_ref), (h, h_ref))) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_batch_first_ops(backend, device):
    """reverse=True with batch_first on every backend ("auto" on CPU: torch.lstm / torch.gru on the flipped
    input) against the references run time-major."""
    T, B, D, H = 3, 2, 4, 5
    x, h0, c0 = rand(B, T, D, device=device), rand(B, H, device=device), rand(B, H, device=device)
    lw = [rand(4 * H, D, device=device), rand(4 * H, H, device=device), rand(4 * H, device=device), None]
    gw = [rand(3 * H, D, device=device), rand(3 * H, H, device=device), None, rand(3 * H, device=device)]
    y, (h, c) = lstm(x, (h0, c0), *lw, backend=backend, reverse=True, batch_first=True)
    y_ref, h_ref, c_ref = lstm_reference(x.transpose(0, 1), h0, c0, *lw, reverse=True)
    assert max(rel_err(a, b) for a, b in ((y, y_ref.transpose(0, 1)), (h, h_ref), (c, c_ref))) <= TOL
    y, h = gru(x, h0, *gw, backend=backend, reverse=True, batch_first=True)
    y_ref, h_ref = gru_reference(x.transpose(0, 1), h0, *gw, reverse=True)
    assert max(rel_err(a, b) for a, b in ((y, y_ref.transpose(0, 1)), (h, h_ref))) <= TOL


@pytest.mark.parametrize("nn_cls", [nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell],
                         ids=["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_state_dicts_both_ways(nn_cls):
    kwargs = dict(input_size=3, hidden_size=4)
    if nn_cls in (nn.LSTM, nn.GRU):
        kwargs.update(num_layers=2, bidirectional=True)
    if nn_cls is nn.LSTM:
        kwargs.update(proj_size=2)
    ref, ours = nn_cls(**kwargs), OURS[nn_cls](**kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    fresh = nn_cls(**kwargs)
    fresh.load_state_dict(ours.state_dict())
    for (name, a), b in zip(ref.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert isinstance(ours, nn.RNNBase if nn_cls in (nn.LSTM, nn.GRU) else nn_cls)


def test_errors():
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        LSTM(3, 4, proj_size=4)
    with pytest.raises(ValueError, match="Unknown backend"):
        LSTM(3, 4, backend="cudnn")
    # Beyond both persistent kernels (persistent.CELL_SMALL_H_MAX, CELL_LARGE_H_MAX: next_pow2(H) of the large
    # one), raised by the module's forward before any launch; the limits themselves: test_family_large.py.
    for cls, H, dtype, small, large in ((LSTM, 65, F64, 16, 64), (GRU, 129, F64, 32, 128),
                                        (LSTM, 129, torch.float32, 32, 128)):
        with pytest.raises(ValueError, match=f"persistent' does not hold the {cls.__name__} at H={H} in {dtype}: "
                                             f"its small-H kernel holds H ≤ {small} and its large-H kernel "
                                             f"next_pow2\\(H\\) ≤ {large} in {dtype} .*; use backend='stepwise' or "
                                             "'auto'"):
            cls(3, H, dtype=dtype, backend="persistent")(torch.randn(2, 1, 3, dtype=dtype))
    lstm_module = LSTM(3, 4)
    with pytest.raises(ValueError, match="LSTM: Expected input to be 2D or 3D, got 4D"):
        lstm_module(torch.randn(1, 2, 1, 3))
    with pytest.raises(RuntimeError, match="Expected hidden\\[1\\] size \\(1, 2, 4\\), got \\[1, 2, 5\\]"):
        lstm_module(torch.randn(3, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 5)))
    with pytest.raises(RuntimeError, match="hx and cx should also be 3-D"):
        lstm_module(torch.randn(3, 2, 3), (torch.zeros(2, 4), torch.zeros(2, 4)))
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        GRU(3, 4)(torch.randn(2, 1, 5))
    with pytest.raises(ValueError, match="LSTMCell: Expected input to be 1D or 2D"):
        LSTMCell(3, 4)(torch.randn(1, 1, 3))
    with pytest.raises(RuntimeError, match="input has inconsistent input_size"):
        GRUCell(3, 4)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="weight_hh must have shape"):
        lstm(torch.randn(2, 1, 3), None, torch.randn(16, 3), torch.randn(16, 5))


@pytest.mark.parametrize("nn_cls", [nn.LSTM], ids=["LSTM"])  # the GRU takes the same custom ops
def test_fullgraph_compile(nn_cls, device):
    """torch.compile(fullgraph=True), no Dynamo flags: the kernels run as custom ops
    (torch.ops.elman_triton.cell_recurrence*) and the module gives the eager values and gradients. aot_eager:
    Dynamo and AOTAutograd as with inductor, without its minutes of code generation on CPU."""
    torch.compiler.reset()
    T, B, D, H = 3, 2, 3, 5
    ref, ours = twins(nn_cls, "stepwise", device, input_size=D, hidden_size=H, bidirectional=True, batch_first=True)
    x = rand(B, T, D, device=device)
    results = []
    for run in (ours, torch.compile(ours, fullgraph=True, backend="aot_eager")):  # inductor: minutes on 2 cores
        outs = flat(run(x))
        loss = sum((torch.cos(t) * (i + 1)).sum() for i, t in enumerate(outs))
        results.append(outs + list(torch.autograd.grad(loss, [x, *ours.parameters()])))
    torch.compiler.reset()
    for a, b in zip(results[1], results[0]):
        assert rel_err(a, b) <= TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_storage_dtypes(cell, dtype, device):
    """fp32 and bf16 storage (fp32 accumulation, LSTM's c carried in fp32) against the float64 reference:
    values, states and every gradient within the dtype's tolerance."""
    T, B, D, H, G = 4, 3, 5, 20, 4 if cell == "lstm" else 3
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    s = H ** -0.5
    leaves64 = [torch.randn(T, B, D, dtype=F64), torch.randn(B, H, dtype=F64), torch.randn(B, H, dtype=F64),
                torch.rand(G * H, D, dtype=F64) * 2 * s - s, torch.rand(G * H, H, dtype=F64) * 2 * s - s,
                torch.rand(G * H, dtype=F64) * 2 * s - s, torch.rand(G * H, dtype=F64) * 2 * s - s]
    if cell == "gru":
        del leaves64[2]
    results = []
    for backend, dt in (("reference", F64), ("stepwise", dtype)):
        leaves = [t.to(device=device, dtype=dt).requires_grad_() for t in leaves64]
        if cell == "lstm":
            y, (h, c) = lstm(leaves[0], (leaves[1], leaves[2]), *leaves[3:], backend=backend)
            outs = [y, h, c]
        else:
            outs = list(gru(leaves[0], leaves[1], *leaves[2:], backend=backend))
        cotangents = [torch.ones_like(t).cumsum(-1) / t.shape[-1] for t in outs]
        loss = sum((w * t.float()).sum() for w, t in zip(cotangents, outs))
        results.append(outs + list(torch.autograd.grad(loss, leaves)))
    for i, (a, b) in enumerate(zip(results[1], results[0])):
        assert a.dtype == dtype and rel_err(a, b) <= tol, i


# H at which backend="auto" on CUDA runs each kernel, per storage dtype: within persistent.CELL_SMALL_H_MAX the
# small-H kernel, within CELL_LARGE_H_MAX (next_pow2(H)) the large-H one, beyond it stepwise.
CUDA_H = {"persistent-small": {torch.float32: 24, torch.bfloat16: 24},
          "persistent-large": {torch.float32: 100, torch.bfloat16: 200},
          "stepwise": {torch.float32: 200, torch.bfloat16: 1100}}


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", CUDA_H)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nn_cls", [nn.LSTM, nn.GRU], ids=["LSTM", "GRU"])
def test_cuda_auto_matches_float64(nn_cls, dtype, kernel):
    """On CUDA, backend="auto", compiled for the GPU, both directions: values and every gradient against nn in
    float64, on each of the kernels auto picks (CUDA_H; the H asserted to select it)."""
    from elman_triton import persistent
    from elman_triton.config import next_power_of_2
    from elman_triton.family_ops import auto_backend

    T, B, D, H, G = 7, 19, 24, CUDA_H[kernel][dtype], 4 if nn_cls is nn.LSTM else 3
    assert auto_backend(nn_cls.__name__.lower(), H, dtype, "cuda") == kernel.split("-")[0]
    assert (next_power_of_2(H) <= persistent.CELL_SMALL_H_MAX[G][dtype]) == (kernel == "persistent-small")
    ref = nn_cls(D, H, bidirectional=True, dtype=F64, device="cuda")
    ours = OURS[nn_cls](D, H, bidirectional=True, dtype=dtype, device="cuda")
    ours.load_state_dict(ref.state_dict())
    x64 = torch.randn(T, B, D, dtype=F64, device="cuda", requires_grad=True)
    x = x64.detach().to(dtype).requires_grad_()
    outs = [flat(ref(x64)), flat(ours(x))]
    weights = [torch.randn_like(t) for t in outs[0]]
    grads = [torch.autograd.grad(sum((w * t.double()).sum() for w, t in zip(weights, out)), [inp, *m.parameters()])
             for out, inp, m in zip(outs, (x64, x), (ref, ours))]
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for a, b in zip(outs[1] + list(grads[1]), outs[0] + list(grads[0])):
        assert rel_err(a, b) <= tol


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_one_launch_per_step_for_both_directions(monkeypatch, cell, device):
    """A bidirectional layer on the stepwise backend: T forward and T backward launches in all, both
    directions sharing each (the grid's third axis)."""
    fwd, bwd = count_launches(monkeypatch, stepwise, "rnn_step_fwd_kernel", "rnn_step_bwd_kernel")
    T, B, D, H, G = 3, 2, 2, 4, 4 if cell == "lstm" else 3
    weights = [[rand(G * H, n, device=device) for _ in range(2)] for n in (D, H)]
    x = rand(T, B, D, device=device)
    run = lstm_layer if cell == "lstm" else gru_layer
    y = run(x, None, *weights, backend="stepwise")[0]
    y.sum().backward()
    assert (fwd.launches, bwd.launches) == (T, T)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_persistent_small_kernels_match_stepwise(cell, device):
    """The persistent small-H launchers (persistent.cell_forward_recurrence / cell_backward_recurrence) against
    the stepwise ones on the same buffers, outputs poisoned with NaN: y, h_n, c_n, saved gates and aux, then
    dz, ∂L/∂h0, ∂L/∂c0. Both directions, batch_first, lengths, H not a multiple of 16, B across two batch
    tiles."""
    from elman_triton import persistent
    from elman_triton.config import Layout, kernel_options, padded
    from elman_triton.family_ops import _bias_slots, _cell_backward, _cell_forward, _padded_states

    T, B, H, G, dirs = 3, 17, 5, 4 if cell == "lstm" else 3, 2
    Hp = padded(H)
    xp = torch.nn.functional.pad(torch.randn(B, T, dirs, G, H, dtype=F64, device=device), (0, Hp - H)).flatten(2)
    w_hh = torch.nn.functional.pad(torch.randn(dirs, G * H, H, dtype=F64, device=device) * H ** -0.5, (0, Hp - H))
    bias = _bias_slots(cell, [torch.randn(G * H, dtype=F64, device=device) for _ in range(dirs)],
                       [torch.randn(G * H, dtype=F64, device=device) for _ in range(dirs)], dirs, H, xp)
    h0, c0 = torch.randn(dirs, B, H, dtype=F64, device=device), torch.randn(dirs, B, H, dtype=F64, device=device)
    lengths = torch.randint(1, T + 1, (B,), device=device)
    y, h_n, c_n, gates, aux = _cell_forward(xp, h0, c0, w_hh, bias, lengths, G, False, True, "stepwise")

    nan = float("nan")
    mine = [torch.full_like(t, nan) for t in (y, h_n, c_n, gates, aux)]
    h0p, c0p = _padded_states(h0, c0, Hp)
    opts = kernel_options(F64, "tanh")
    lay = Layout.of(y, H, dirs, True, False)
    persistent.cell_forward_recurrence(G, xp, mine[0], mine[3], mine[4], h0p, c0p, w_hh, bias, mine[1], mine[2],
                                       lengths, opts, lay)
    for name, a, b in zip(("y", "h_n", "c_n", "gates", "aux"), mine, (y, h_n, c_n, gates, aux)):
        if name == "aux" or (name == "c_n" and G == 3):
            continue
        assert rel_err(a, b) <= TOL, name
    assert rel_err(mine[4].unflatten(2, (dirs, Hp))[..., :H], aux.unflatten(2, (dirs, Hp))[..., :H]) <= TOL

    dy, dh_n, dc_n = torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(h_n)
    dz, dh0, dc0 = _cell_backward(dy, dh_n, dc_n, y, h0, c0, w_hh, gates, aux, lengths, G, False, True, "stepwise")
    dz_mine = torch.full_like(dz, nan)
    dh0_mine, dc0_mine = persistent.cell_backward_recurrence(G, dy, dh_n, dc_n if G == 4 else None, y, h0p, gates,
                                                             aux, c0p, w_hh, dz_mine, lengths, opts, lay)
    assert rel_err(dz_mine, dz) <= TOL and rel_err(dh0_mine, dh0) <= TOL
    if G == 4:
        assert rel_err(dc0_mine, dc0) <= TOL
    else:
        assert dc0_mine is None
