"""ElmanRNN / ElmanRNNCell against torch.nn.RNN / torch.nn.RNNCell.

Each comparison loads one state dict into both modules (strict, both ways), runs the same inputs
through both and backpropagates L = Σ_i Σ out_i·w_i over every output, h_n included (random w_i).
Outputs, input gradients and every parameter gradient must agree in relative norm error
‖a − b‖/‖b‖ within TOLERANCE of the checked module's dtype; the torch module runs in float64, so it is
the ground truth. Sizes are tiny and odd because without CUDA the Triton backends run in Triton's
interpreter (see conftest.py); with CUDA every test runs on the GPU and the @pytest.mark.gpu tests run too.
"""
import copy
import functools
import itertools
import pickle
import re

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from elman_triton import ElmanRNN, ElmanRNNCell, elman_rnn
from utils import TOLERANCE, rel_err

BACKENDS = ["stepwise", "persistent", "auto", "reference"]
T, B, D, H = 4, 3, 7, 9
F64 = torch.float64
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # conftest's `device` fixture


@functools.cache
def persistent_missing():
    """The reason to skip backend='persistent', or None once it runs (a 1-step call tells)."""
    x, w_ih, w_hh = torch.randn(1, 1, D, dtype=F64), torch.randn(H, D, dtype=F64), torch.randn(H, H, dtype=F64)
    try:
        elman_rnn(x.to(DEVICE), None, w_ih.to(DEVICE), w_hh.to(DEVICE), backend="persistent")
    except NotImplementedError as error:
        return f"backend='persistent' is still the placeholder: {error}"
    return None


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "persistent" and persistent_missing():
        pytest.skip(persistent_missing())
    return request.param


def rand(*shape, dtype=F64):
    """Uniform in (-1, 1): inputs and states of the size an RNN sees."""
    return (torch.rand(shape, dtype=F64, device=DEVICE) * 2 - 1).to(dtype)


def make_pair(backend, dtype=F64, **kwargs):
    """(ElmanRNN in dtype, nn.RNN in float64) holding the same parameters, synced both ways strictly."""
    ref = nn.RNN(**kwargs, dtype=F64, device=DEVICE)
    ours = ElmanRNN(**kwargs, dtype=dtype, device=DEVICE, backend=backend)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)  # ref now holds ours' (possibly rounded) values
    return ours, ref


def make_cell_pair(backend, dtype=F64, **kwargs):
    ref = nn.RNNCell(**kwargs, dtype=F64, device=DEVICE)
    ours = ElmanRNNCell(**kwargs, dtype=dtype, device=DEVICE, backend=backend)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def call(module, *args):
    return module(*args)


def forward_backward(module, run, inputs, dtype=F64, loss_weights=None):
    """run(module, *leaves) -> tuple of tensors on fresh leaf copies of inputs (None stays None) in dtype;
    backpropagates Σ out·w. Returns (outputs, {name: grad} for inputs and parameters, loss weights)."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs]
    module.zero_grad(set_to_none=True)
    outputs = run(module, *leaves)
    if loss_weights is None:
        loss_weights = [torch.randn_like(o, dtype=F64) for o in outputs]
    sum((o.double() * w).sum() for o, w in zip(outputs, loss_weights)).backward()
    grads = {f"input {i}": t.grad for i, t in enumerate(leaves) if t is not None}
    grads.update((name, p.grad) for name, p in module.named_parameters())
    return outputs, grads, loss_weights


def assert_close(got, want, tol):
    """got, want: {name: tensor}, the same names."""
    assert got.keys() == want.keys()
    for name, a in got.items():
        b = want[name]
        assert a is not None and b is not None, f"{name}: no gradient"
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        err = rel_err(a, b)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def check_matches(ours, ref, run, inputs, dtype=F64, compute_dtype=None):
    """ours (inputs in dtype) against ref (float64) on the same inputs: outputs and all gradients, within
    the tolerance of compute_dtype (default dtype), the outputs' dtype. Returns ours' outputs and gradients."""
    compute_dtype = compute_dtype or dtype
    want, want_grads, loss_weights = forward_backward(ref, run, inputs)
    got, got_grads, _ = forward_backward(ours, run, inputs, dtype, loss_weights)
    tol = TOLERANCE[compute_dtype]
    for out in got:
        assert out.dtype == compute_dtype
    assert_close(dict(enumerate(got)), dict(enumerate(want)), tol)
    assert_close(got_grads, want_grads, tol)
    return got, got_grads


# --- Outputs and gradients against torch --------------------------------------------------------------


@pytest.mark.parametrize("num_layers, bidirectional, batch_first, bias, nonlinearity",
                         list(itertools.product([1, 3], [False, True], [False, True], [True, False], ["tanh", "relu"])))
def test_matches_nn_rnn_float64(backend, num_layers, bidirectional, batch_first, bias, nonlinearity):
    ours, ref = make_pair(backend, input_size=D, hidden_size=H, num_layers=num_layers, bias=bias,
                          nonlinearity=nonlinearity, batch_first=batch_first, bidirectional=bidirectional)
    x = rand(B, T, D) if batch_first else rand(T, B, D)
    hx = rand(num_layers * (2 if bidirectional else 1), B, H)
    (output, h_n), _ = check_matches(ours, ref, call, [x, hx])
    assert output.shape == x.shape[:2] + (H * (2 if bidirectional else 1),) and output.is_contiguous()
    assert h_n.shape == hx.shape


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_matches_nn_rnn_float32(backend, nonlinearity):
    ours, ref = make_pair(backend, torch.float32, input_size=D, hidden_size=H, num_layers=2,
                          nonlinearity=nonlinearity, bidirectional=True)
    check_matches(ours, ref, call, [rand(T, B, D), None], torch.float32)  # hx=None: zeros


@pytest.mark.parametrize("enforce_sorted, with_hx", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequence(backend, enforce_sorted, with_hx, bidirectional):
    """Drawn lengths in [1, T] (one of them T); unsorted: the longest is not first, so hx and h_n are permuted."""
    batch = 5
    lengths = [T] + torch.randint(1, T + 1, (batch - 1,)).tolist()
    lengths = sorted(lengths, reverse=True) if enforce_sorted else lengths[1:3] + [T] + lengths[3:]
    ours, ref = make_pair(backend, input_size=D, hidden_size=H, num_layers=2, bidirectional=bidirectional)
    dirs = 2 if bidirectional else 1

    def run(module, x, hx):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
        out, h_n = module(packed, hx)
        assert torch.equal(out.batch_sizes, packed.batch_sizes)
        for got, want in ((out.sorted_indices, packed.sorted_indices), (out.unsorted_indices, packed.unsorted_indices)):
            assert (got is None and want is None) or torch.equal(got, want)
        padded, out_lengths = pad_packed_sequence(out, total_length=T)
        assert out_lengths.tolist() == lengths
        return padded, h_n

    hx = rand(2 * dirs, batch, H) if with_hx else None
    (padded, h_n), grads = check_matches(ours, ref, run, [rand(T, batch, D), hx])
    valid = torch.arange(T, device=DEVICE)[:, None] < torch.tensor(lengths, device=DEVICE)
    assert torch.all(padded[~valid] == 0), "padded outputs must be zeros"
    assert torch.all(grads["input 0"][~valid] == 0), "padded inputs must get no gradient"
    assert h_n.shape == (2 * dirs, batch, H)


@pytest.mark.parametrize("batch_first, with_hx", [(False, True), (True, False)])
def test_unbatched(backend, batch_first, with_hx):
    ours, ref = make_pair(backend, input_size=D, hidden_size=H, bidirectional=True, batch_first=batch_first)
    (output, h_n), _ = check_matches(ours, ref, call, [rand(T, D), rand(2, H) if with_hx else None])
    assert output.shape == (T, 2 * H) and h_n.shape == (2, H)


def test_chunks_equal_whole_sequence(backend):
    """Running T in two chunks, feeding h_n back as hx, gives the whole run's outputs and gradients."""
    model = ElmanRNN(D, H, num_layers=2, dtype=F64, device=DEVICE, backend=backend)

    def chunked(module, x, hx):
        y1, h1 = module(x[:3], hx)
        y2, h2 = module(x[3:], h1)
        return torch.cat([y1, y2]), h2

    inputs = [rand(T, B, D), rand(2, B, H)]
    want, want_grads, loss_weights = forward_backward(model, call, inputs)
    got, got_grads, _ = forward_backward(model, chunked, inputs, loss_weights=loss_weights)
    assert_close(dict(enumerate(got)), dict(enumerate(want)), TOLERANCE[F64])
    assert_close(got_grads, want_grads, TOLERANCE[F64])


def test_dropout_between_layers(backend):
    kwargs = dict(input_size=D, hidden_size=H, num_layers=2, bidirectional=True)
    x, hx = rand(T, B, D), rand(4, B, H)
    ours, ref = make_pair(backend, dropout=0.5, **kwargs)
    ours.eval()
    ref.eval()
    check_matches(ours, ref, call, [x, hx])  # eval: no dropout
    eval_out, eval_h = ours(x, hx)
    ours.train()
    train_out, train_h = ours(x, hx)
    assert rel_err(train_h[:2], eval_h[:2]) < TOLERANCE[F64], "dropout must not touch the first layer"
    assert rel_err(train_out, eval_out) > 1e-2, "training mode must drop between layers"
    # p = 1 zeroes every later layer's input in both, deterministically.
    ours, ref = make_pair(backend, dropout=1.0, **kwargs)
    check_matches(ours.train(), ref.train(), call, [x, hx])


def test_backward_in_eval_mode(backend):
    """model.eval() changes nothing but dropout: backward still runs and matches nn.RNN (cuDNN refuses
    backward in eval mode; attribution methods such as integrated gradients need it), packed input too."""
    ours, ref = make_pair(backend, input_size=D, hidden_size=H, num_layers=2, bidirectional=True, dropout=0.5)
    ours.eval()
    ref.eval()
    _, grads = check_matches(ours, ref, call, [rand(T, B, D), rand(4, B, H)])
    assert all(g.abs().sum() > 0 for g in grads.values())

    def run_packed(module, x):
        out, h_n = module(pack_padded_sequence(x, [2, T, 1], enforce_sorted=False))
        return out.data, h_n

    check_matches(ours, ref, run_packed, [rand(T, B, D)])


def test_empty_batch(backend):
    """nn.RNN and nn.RNNCell return empty outputs for B = 0."""
    ours, ref = make_pair(backend, input_size=D, hidden_size=H, num_layers=2, bidirectional=True)
    for got, want in zip(ours(rand(T, 0, D)), ref(rand(T, 0, D))):
        assert got.shape == want.shape and got.dtype == want.dtype
    cell, ref_cell = make_cell_pair(backend, input_size=D, hidden_size=H)
    assert cell(rand(0, D)).shape == ref_cell(rand(0, D)).shape == (0, H)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("batched, with_hx", [(True, True), (True, False), (False, True)])
def test_cell_matches_nn_rnn_cell(backend, bias, nonlinearity, batched, with_hx):
    ours, ref = make_cell_pair(backend, input_size=D, hidden_size=H, bias=bias, nonlinearity=nonlinearity)
    batch = (B,) if batched else ()
    (h,), _ = check_matches(ours, ref, lambda m, x, hx: (m(x, hx),),
                            [rand(*batch, D), rand(*batch, H) if with_hx else None])
    assert h.shape == batch + (H,)


# --- Parameters, state dicts, conversions -------------------------------------------------------------


@pytest.mark.parametrize("num_layers, bidirectional, bias", [(1, False, True), (3, True, True), (2, True, False)])
def test_parameters_and_state_dict_match_nn_rnn(num_layers, bidirectional, bias):
    kwargs = dict(input_size=D, hidden_size=H, num_layers=num_layers, bias=bias, bidirectional=bidirectional)
    ref, ours = nn.RNN(**kwargs), ElmanRNN(**kwargs)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    values = torch.cat([p.detach().flatten() for p in ours.parameters()])
    bound = H ** -0.5  # nn.RNN's init: U(-1/√H, 1/√H)
    assert values.abs().max() <= bound and values.max() > bound / 2 and values.min() < -bound / 2
    ours.load_state_dict(ref.state_dict(), strict=True)
    for (_, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b)
    ref.load_state_dict(ElmanRNN(**kwargs).state_dict(), strict=True)


def test_cell_parameters_and_state_dict_match_nn_rnn_cell():
    for bias in (True, False):
        ref, ours = nn.RNNCell(D, H, bias), ElmanRNNCell(D, H, bias)
        assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
        assert all(p.abs().max() <= H ** -0.5 for p in ours.parameters())
        ours.load_state_dict(ref.state_dict(), strict=True)
        ref.load_state_dict(ours.state_dict(), strict=True)
        assert (ours.bias_ih is None) == (not bias)


def test_dtype_conversions(backend):
    """.double(), .half() and .to(bfloat16) convert the parameters; the module then computes in that dtype."""
    ours, ref = make_pair(backend, torch.float32, input_size=D, hidden_size=H)
    inputs = [rand(T, B, D), rand(1, B, H)]
    conversions = {F64: ours.double, torch.float16: ours.half, torch.bfloat16: lambda: ours.to(torch.bfloat16)}
    for dtype, convert in conversions.items():
        convert()
        assert all(p.dtype == dtype for p in ours.parameters())
        check_matches(ours, ref, call, inputs, dtype)


@pytest.mark.parametrize("device_type", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_autocast(backend, device_type):
    """Under autocast the module computes in the autocast dtype, as nn.RNN does; gradients reach the
    float32 parameters in float32."""
    if DEVICE.type != device_type:
        pytest.skip(f"tensors live on {DEVICE.type}")
    ours, ref = make_pair(backend, torch.float32, input_size=D, hidden_size=H, bidirectional=True)
    fp32_ref = nn.RNN(D, H, bidirectional=True, device=DEVICE)
    fp32_ref.load_state_dict(ours.state_dict())
    low = torch.bfloat16

    def run(module, x, hx):
        with torch.autocast(device_type, dtype=low):
            return module(x, hx)

    x, hx = rand(T, B, D, dtype=torch.float32), rand(2, B, H, dtype=torch.float32)
    assert [t.dtype for t in run(fp32_ref, x, hx)] == [low, low]  # what nn.RNN does under autocast
    _, grads = check_matches(ours, ref, run, [x, hx], torch.float32, compute_dtype=low)  # ref: fp64, not cast
    assert all(g.dtype == torch.float32 for g in grads.values())


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_is_an_rnn_base_with_nn_rnn_attributes(nonlinearity):
    """ElmanRNN derives from nn.RNNBase, not nn.RNN (Dynamo refuses to trace nn.RNN), takes nn.RNN's
    positional arguments and carries every attribute an nn.RNN has, with the same values, plus `backend`."""
    args = (D, H, 2, nonlinearity, False, True, 0.25, True)  # positional, in nn.RNN's order
    ours, ref = ElmanRNN(*args), nn.RNN(*args)
    assert isinstance(ours, nn.RNNBase) and not isinstance(ours, nn.RNN)
    assert vars(ours).keys() - {"backend"} == vars(ref).keys()
    for name in ("mode", "nonlinearity", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
                 "dropout", "bidirectional", "proj_size", "_flat_weights_names", "_all_weights"):
        assert getattr(ours, name) == getattr(ref, name), name


def test_pickle_round_trip(tmp_path):
    """torch.save / torch.load of whole modules and pickle, as nn.RNN: same class, backend, parameters
    and outputs, also after a weight was replaced by a new Parameter."""
    model = ElmanRNN(D, H, num_layers=2, bidirectional=True, backend="reference", dtype=F64, device=DEVICE)
    model.weight_hh_l1 = nn.Parameter(rand(H, H))
    cell = ElmanRNNCell(D, H, nonlinearity="relu", backend="reference", dtype=F64, device=DEVICE)
    x = rand(T, B, D)
    torch.save([model, cell], tmp_path / "modules.pt")
    for loaded_model, loaded_cell in (torch.load(tmp_path / "modules.pt", weights_only=False),
                                      pickle.loads(pickle.dumps([model, cell]))):
        for loaded, original in ((loaded_model, model), (loaded_cell, cell)):
            assert type(loaded) is type(original) and loaded.backend == "reference"
            for (name, a), (_, b) in zip(loaded.named_parameters(), original.named_parameters(), strict=True):
                assert torch.equal(a, b), name
        for got, want in zip(loaded_model(x), model(x)):
            assert torch.equal(got, want)
        assert torch.equal(loaded_cell(x[0]), cell(x[0]))


def test_repr_flatten_and_copy():
    kwargs = dict(num_layers=2, bias=False, batch_first=True, dropout=0.25, bidirectional=True)
    assert repr(ElmanRNN(D, H, **kwargs)) == "Elman" + repr(nn.RNN(D, H, **kwargs))
    assert repr(ElmanRNN(D, H, nonlinearity="relu", backend="stepwise")) == \
        "ElmanRNN(7, 9, nonlinearity='relu', backend='stepwise')"
    assert repr(ElmanRNNCell(D, H, nonlinearity="relu")) == "Elman" + repr(nn.RNNCell(D, H, nonlinearity="relu"))
    assert repr(ElmanRNNCell(D, H, backend="reference")) == "ElmanRNNCell(7, 9, backend='reference')"

    model = ElmanRNN(D, H, backend="reference", dtype=F64, device=DEVICE)
    pointers = [p.data_ptr() for p in model.parameters()]
    assert model.flatten_parameters() is None
    assert [p.data_ptr() for p in model.parameters()] == pointers
    clone = copy.deepcopy(model)
    x = rand(T, B, D)
    assert clone.backend == "reference" and torch.equal(clone(x)[0], model(x)[0])


def test_functional_call(backend):
    """torch.func.functional_call swaps parameters per call, as with nn.RNN."""
    ours, ref = make_pair(backend, input_size=D, hidden_size=H, bidirectional=True)
    params = {name: rand(*p.shape) for name, p in ours.named_parameters()}
    x = rand(T, B, D)
    for got, want in zip(torch.func.functional_call(ours, params, (x,)), torch.func.functional_call(ref, params, (x,))):
        assert rel_err(got, want) < TOLERANCE[F64]


def test_swap_in_trained_nn_rnn_checkpoint(backend):
    """A model trained with torch.nn.RNN loads into the same model built on ElmanRNN (strict) and gives
    the same outputs and gradients."""
    def tagger(rnn):
        return nn.ModuleDict(dict(rnn=rnn, head=nn.Linear(2 * H, 4))).to(DEVICE)

    def run(model, x):
        y, h_n = model["rnn"](x)
        return model["head"](y), h_n

    rnn_kwargs = dict(input_size=D, hidden_size=H, num_layers=2, bidirectional=True, batch_first=True)
    trained = tagger(nn.RNN(**rnn_kwargs))
    initial = copy.deepcopy(trained.state_dict())
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
    for _ in range(3):
        x, target = rand(B, T, D, dtype=torch.float32), rand(B, T, 4, dtype=torch.float32)
        loss = (run(trained, x)[0] - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    checkpoint = trained.state_dict()
    assert any(not torch.equal(checkpoint[k], initial[k]) for k in checkpoint), "training changed nothing"

    swapped = tagger(ElmanRNN(**rnn_kwargs, backend=backend))
    swapped.load_state_dict(checkpoint, strict=True)
    check_matches(swapped.double(), trained.double(), run, [rand(B, T, D)])


# --- Errors: the same exception types as torch --------------------------------------------------------


def raised(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - any exception torch raises is the expectation
        return error
    return None


def assert_raises_like(ours_fn, torch_fn, match):
    """ours_fn raises what torch_fn raises: the same type, and the same message where match is None,
    else a message matching `match` (where ours says more than torch's kernel does)."""
    expected = raised(torch_fn)
    assert expected is not None, "torch accepted this input; the case is wrong"
    with pytest.raises(type(expected), match=re.escape(str(expected)) + r"\Z" if match is None else match):
        ours_fn()


def packed(lengths, features=D, enforce_sorted=True):
    return pack_padded_sequence(rand(max(lengths), len(lengths), features), lengths, enforce_sorted=enforce_sorted)


# name: (constructor kwargs, inputs factory, None: torch's message exactly, or what ours must name instead)
RNN_ERRORS = {
    "feature size": ({}, lambda: (rand(T, B, D + 1),), None),
    "hx shape": ({}, lambda: (rand(T, B, D), rand(1, B - 1, H)), None),
    "hx 2-D for batched input": ({}, lambda: (rand(T, B, D), rand(B, H)), None),
    "hx 3-D for unbatched input": ({}, lambda: (rand(T, D), rand(1, 1, H)), None),
    "hx hidden size, unbatched": ({}, lambda: (rand(T, D), rand(1, H + 1)), None),
    "1-D input": ({}, lambda: (rand(D),), None),
    "4-D input": ({}, lambda: (rand(2, T, B, D),), None),
    "input dtype": ({}, lambda: (rand(T, B, D, dtype=torch.float32),), None),
    "integer input": ({}, lambda: (torch.ones(T, B, D, dtype=torch.long, device=DEVICE),), None),
    "hx dtype": ({}, lambda: (rand(T, B, D), rand(1, B, H, dtype=torch.float32)), "hx"),
    "empty sequence": ({}, lambda: (rand(0, B, D),), None),
    "empty sequence, batch_first": (dict(batch_first=True), lambda: (rand(B, 0, D),), None),
    "empty unbatched sequence": ({}, lambda: (rand(0, D),), None),
    "packed feature size": ({}, lambda: (packed([4, 3, 2], D + 1),), None),
    "packed hx shape": ({}, lambda: (packed([4, 3, 2]), rand(1, 2, H)), None),
    "packed hx 2-D": ({}, lambda: (packed([4, 3, 2]), rand(B, H)), None),
    # Both fail in permute_hidden's index_select.
    "packed unsorted hx batch": ({}, lambda: (packed([2, 4, 3], enforce_sorted=False), rand(1, 2, H)), None),
    "packed dtype": ({}, lambda: (packed([4, 3, 2]).to(torch.float32),), None),
}


@pytest.mark.parametrize("case", RNN_ERRORS)
@pytest.mark.parametrize("err_backend", ["auto", "stepwise"])
def test_rnn_errors_match_torch(case, err_backend):
    kwargs, make_inputs, match = RNN_ERRORS[case]
    ours = ElmanRNN(D, H, **kwargs, dtype=F64, device=DEVICE, backend=err_backend)
    ref = nn.RNN(D, H, **kwargs, dtype=F64, device=DEVICE)
    inputs = make_inputs()
    assert_raises_like(lambda: ours(*inputs), lambda: ref(*inputs), match)


CELL_ERRORS = {
    "3-D input": (lambda: (rand(2, B, D),), "1D or 2D"),
    "0-D input": (lambda: (rand(),), "1D or 2D"),
    "3-D hx": (lambda: (rand(B, D), rand(1, B, H)), "hidden to be 1D or 2D"),
    "feature size": (lambda: (rand(B, D + 1),), "input_size"),
    "batch size": (lambda: (rand(B, D), rand(B - 1, H)), "batch size"),
    "hidden size": (lambda: (rand(B, D), rand(B, H + 1)), "hidden0"),
    "2-D hx for unbatched input": (lambda: (rand(D), rand(1, H)), "hidden0"),
    "input dtype": (lambda: (rand(B, D, dtype=torch.float32),), "dtype"),
    "hx dtype": (lambda: (rand(B, D), rand(B, H, dtype=torch.float32)), "hx"),
}


@pytest.mark.parametrize("case", CELL_ERRORS)
def test_cell_errors_match_torch(case):
    make_inputs, match = CELL_ERRORS[case]
    ours = ElmanRNNCell(D, H, dtype=F64, device=DEVICE, backend="stepwise")
    ref = nn.RNNCell(D, H, dtype=F64, device=DEVICE)
    inputs = make_inputs()
    assert_raises_like(lambda: ours(*inputs), lambda: ref(*inputs), match)


def test_cell_1d_hx_for_batched_input_is_a_runtime_error():
    """nn.RNNCell fails here with an accidental IndexError from its kernel; this names the problem."""
    cell = ElmanRNNCell(D, H, dtype=F64, device=DEVICE)
    with pytest.raises(RuntimeError, match="hidden0"):
        cell(rand(H, D), rand(H))


@pytest.mark.parametrize("kwargs", [dict(nonlinearity="gelu"), dict(dropout=1.5), dict(dropout=-0.1),
                                    dict(dropout=True), dict(num_layers=0), dict(hidden_size=0),
                                    dict(bias=1), dict(batch_first=None), dict(hidden_size=9.0)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_constructor_errors_match_torch(kwargs):
    full = {"input_size": D, "hidden_size": H, **kwargs}
    assert_raises_like(lambda: ElmanRNN(**full), lambda: nn.RNN(**full), None)


def test_unknown_backend_or_nonlinearity_raise_at_construction():
    for make in (lambda: ElmanRNN(D, H, backend="cudnn"), lambda: ElmanRNNCell(D, H, backend="cudnn")):
        with pytest.raises(ValueError, match="backend"):
            make()
    with pytest.raises(ValueError, match="nonlinearity"):  # nn.RNNCell would wait for forward
        ElmanRNNCell(D, H, nonlinearity="gelu")


def test_dropout_with_one_layer_warns_like_torch():
    for module in (nn.RNN, ElmanRNN):
        with pytest.warns(UserWarning, match="num_layers greater than 1"):
            module(D, H, dropout=0.5)


# --- GPU only ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("bidirectional", [False, True])
def test_large_matches_nn_rnn_on_gpu(backend, bidirectional):
    """Sizes the interpreter cannot afford: several batch tiles and column tiles, a long sequence,
    variable lengths."""
    ours, ref = make_pair(backend, torch.float32, input_size=96, hidden_size=257, num_layers=2,
                          bidirectional=bidirectional)
    dirs = 2 if bidirectional else 1
    check_matches(ours, ref, call, [rand(64, 37, 96), rand(2 * dirs, 37, 257)], torch.float32)
    lengths = torch.randint(1, 65, (37,)).tolist()

    def run(module, x, hx):
        out, h_n = module(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
        return pad_packed_sequence(out, total_length=64)[0], h_n

    check_matches(ours, ref, run, [rand(64, 37, 96), rand(2 * dirs, 37, 257)], torch.float32)
