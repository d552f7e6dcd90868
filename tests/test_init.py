"""elman_triton.init: irnn_ and orthogonal_ on every layer and direction of ElmanRNN, and on ElmanRNNCell."""
import warnings

import pytest
import torch

from elman_triton import GRU, LSTM, ElmanRNN, ElmanRNNCell, LSTMCell, init


def recurrent_weights(module):
    return [p for name, p in module.named_parameters() if name.startswith("weight_hh")]


def modules(device):
    return [ElmanRNN(3, 7, num_layers=2, bidirectional=True, nonlinearity="relu", device=device),
            ElmanRNNCell(3, 7, nonlinearity="relu", device=device)]


@pytest.mark.parametrize("kind", ["rnn", "cell"])
def test_irnn_sets_identity_zero_bias_small_input_weights(kind, device):
    module = modules(device)[kind == "cell"]
    assert init.irnn_(module, scale=0.9) is module
    count = 0
    for name, p in module.named_parameters():
        if name.startswith("weight_hh"):
            assert torch.equal(p, 0.9 * torch.eye(7, device=device))
            count += 1
        elif name.startswith("bias"):
            assert (p == 0).all()
        else:  # weight_ih ~ N(0, 1e-3²): small, random, not zero
            assert 0 < p.abs().max() < 1e-2 and p.std() > 1e-4
    assert count == (4 if kind == "rnn" else 1)  # every layer and direction


@pytest.mark.parametrize("backend", ["stepwise", "persistent", "reference"])
def test_irnn_relu_carries_the_state_unchanged(backend, device):
    """The point of the IRNN: with no input and a non-negative state, relu(h I) = h at every step."""
    rnn = init.irnn_(ElmanRNN(2, 5, bidirectional=True, nonlinearity="relu", backend=backend, device=device))
    h0 = torch.rand(2, 3, 5, device=device)
    y, h_n = rnn(torch.zeros(6, 3, 2, device=device), h0)
    assert torch.equal(h_n, h0) and torch.equal(y, torch.cat([h0[0], h0[1]], dim=1).expand(6, 3, 10))


@pytest.mark.parametrize("radius", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("kind", ["rnn", "cell"])
def test_orthogonal_has_the_chosen_spectral_radius(kind, radius, device):
    module = modules(device)[kind == "cell"]
    others = {n: p.clone() for n, p in module.named_parameters() if not n.startswith("weight_hh")}
    before = [w.clone() for w in recurrent_weights(module)]
    assert init.orthogonal_(module, spectral_radius=radius) is module
    weights = recurrent_weights(module)
    for w, old in zip(weights, before):
        w = w.detach().double().cpu()
        eigenvalues = torch.linalg.eigvals(w).abs()
        assert torch.allclose(eigenvalues.max(), torch.tensor(radius, dtype=torch.float64), rtol=1e-5)
        assert torch.allclose(eigenvalues, torch.full_like(eigenvalues, radius), rtol=1e-5)  # every |λ| = ρ
        assert torch.allclose(torch.linalg.svdvals(w), torch.full((7,), radius, dtype=torch.float64), rtol=1e-5)
        assert not torch.allclose(w, old.double().cpu())
    if len(weights) > 1:  # each layer and direction gets its own matrix
        assert not torch.allclose(weights[0], weights[1])
    for n, p in module.named_parameters():  # W_ih and biases untouched
        if n in others:
            assert torch.equal(p, others[n])


def test_orthogonal_is_reproducible_with_a_generator():
    a, b = (init.orthogonal_(ElmanRNN(2, 6), 0.9, generator=torch.Generator().manual_seed(3))
            for _ in range(2))
    assert torch.equal(a.weight_hh_l0, b.weight_hh_l0)


def test_errors():
    with pytest.raises(TypeError, match="Elman RNN"):
        init.irnn_(torch.nn.LSTM(3, 4))
    with pytest.raises(TypeError, match="ElmanRNN, ElmanRNNCell"):
        init.orthogonal_(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match="spectral_radius"):
        init.orthogonal_(ElmanRNN(3, 4), spectral_radius=-1.0)


@pytest.mark.parametrize("kind", ["rnn", "cell", "nn.RNN"])
def test_irnn_warns_on_tanh(kind, device):
    """The IRNN is meant for relu: on a tanh module irnn_ warns (and still initialises); on relu it is silent."""
    make = {"rnn": ElmanRNN, "cell": ElmanRNNCell, "nn.RNN": torch.nn.RNN}[kind]
    tanh = make(3, 4, device=device)
    with pytest.warns(UserWarning, match="nonlinearity='relu'"):
        assert init.irnn_(tanh) is tanh
    assert torch.equal(tanh.weight_hh_l0 if kind != "cell" else tanh.weight_hh, torch.eye(4, device=device))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        init.irnn_(make(3, 4, nonlinearity="relu", device=device))
        init.orthogonal_(make(3, 4, device=device))  # orthogonal_ suits both


@pytest.mark.parametrize("kind", ["lstm", "cell", "nn.LSTM"])
def test_forget_gate_bias_sets_only_the_forget_gate(kind, device):
    """b_if + b_hf = value in every layer and direction (rows [H, 2H): gate order i, f, g, o); every other
    bias row and every weight keeps its value; the LSTM then keeps its cell state (f = σ(value))."""
    H = 7
    module = {"lstm": lambda: LSTM(3, H, num_layers=2, bidirectional=True, device=device),
              "cell": lambda: LSTMCell(3, H, device=device),
              "nn.LSTM": lambda: torch.nn.LSTM(3, H, device=device)}[kind]()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    assert init.forget_gate_bias_(module, value=2.5) is module
    for name, param in module.named_parameters():
        if not name.startswith("bias_"):
            assert torch.equal(param, before[name]), name
            continue
        forget = 2.5 if name.startswith("bias_hh") else 0.0
        assert torch.equal(param[H:2 * H], torch.full((H,), forget, device=device)), name
        rest = torch.cat([param[:H], param[2 * H:]])
        assert torch.equal(rest, torch.cat([before[name][:H], before[name][2 * H:]])), name


def test_forget_gate_bias_errors():
    with pytest.raises(TypeError, match="needs an LSTM or LSTMCell.*got GRU"):
        init.forget_gate_bias_(GRU(3, 4))
    with pytest.raises(TypeError, match="got ElmanRNN"):
        init.forget_gate_bias_(ElmanRNN(3, 4))
    with pytest.raises(ValueError, match="bias=False"):
        init.forget_gate_bias_(LSTM(3, 4, bias=False))
