"""LSTM, GRU, LSTMCell and GRUCell as modules, beyond their values (tests/test_family.py): nn's errors
through the forward they share with ElmanRNN (modules.RecurrentBase), determinism, autocast, eval-mode
backward, the state-gradient hook (record_state_gradients through the modules) and CUDA-graph capture.
DDP: tests/test_ddp.py. Tiny odd shapes: H, B not powers of 2; B = 17
spans two of the persistent kernel's 16-row batch tiles."""
import re

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from elman_triton.diagnostics import record_state_gradients
from elman_triton.family import GRU, LSTM, GRUCell, LSTMCell
from elman_triton.reference import gru_reference, lstm_reference
from test_family import assert_same, flat, twins
from test_module import assert_raises_like
from utils import TOLERANCE, rel_err

F64 = torch.float64
T, B, D, H = 3, 3, 4, 5
OURS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell}


def rand(*shape, dtype=F64):
    return torch.randn(*shape, dtype=dtype)


def hx(lstm, h_shape, c_shape=None, dtype=F64):
    """The GRU's h0, or the LSTM's (h0, c0) (c0 of h0's shape unless given)."""
    return (rand(*h_shape, dtype=dtype), rand(*(c_shape or h_shape))) if lstm else rand(*h_shape, dtype=dtype)


def packed(lengths, features=D, enforce_sorted=True):
    return pack_padded_sequence(rand(max(lengths), len(lengths), features), lengths, enforce_sorted=enforce_sorted)


# name: (inputs factory taking `lstm`, None: torch's message exactly, or what ours must name instead)
MODULE_ERRORS = {
    "1-D input": (lambda lstm: (rand(D),), None),
    "4-D input": (lambda lstm: (rand(2, T, B, D),), None),
    "feature size": (lambda lstm: (rand(T, B, D + 1),), None),
    "hx batch": (lambda lstm: (rand(T, B, D), hx(lstm, (1, B - 1, H))), None),
    "hx width": (lambda lstm: (rand(T, B, D), hx(lstm, (1, B, H + 1), (1, B, H))), None),
    "hx 2-D for batched input": (lambda lstm: (rand(T, B, D), hx(lstm, (B, H))), None),
    "hx 3-D for unbatched input": (lambda lstm: (rand(T, D), hx(lstm, (1, 1, H))), None),
    "hx width, unbatched": (lambda lstm: (rand(T, D), hx(lstm, (1, H + 1), (1, H))), None),
    "empty sequence": (lambda lstm: (rand(0, B, D),), None),
    "input dtype": (lambda lstm: (rand(T, B, D, dtype=torch.float32),), None),
    "hx dtype": (lambda lstm: (rand(T, B, D), hx(lstm, (1, B, H), dtype=torch.float32)), "hx"),
    "packed unsorted hx batch": (lambda lstm: (packed([2, 3, 1], enforce_sorted=False), hx(lstm, (1, 2, H))), None),
}
# nn.GRU checks packed input and its hx like nn.RNN; nn.LSTM leaves them to its kernel (a shape error from
# a matmul, or "got an incorrect number of RNN parameters"), where ours checks them with nn.LSTM's messages.
PACKED_ERRORS = {
    "packed feature size": (lambda lstm: (packed([3, 2, 1], D + 1),), "input.size\\(-1\\) must be equal to input_size"),
    "packed hx batch": (lambda lstm: (packed([3, 2, 1]), hx(lstm, (1, 2, H))),
                        re.escape("Expected hidden[0] size (1, 3, 5), got [1, 2, 5]")),
    "packed hx width": (lambda lstm: (packed([3, 2, 1]), hx(lstm, (1, 3, H - 1), (1, 3, H))),
                        re.escape("Expected hidden[0] size (1, 3, 5), got [1, 3, 4]")),
}


@pytest.mark.parametrize("case", [*MODULE_ERRORS, *PACKED_ERRORS])
@pytest.mark.parametrize("nn_cls", [nn.LSTM, nn.GRU], ids=["LSTM", "GRU"])
def test_module_errors_match_torch(nn_cls, case):
    make_inputs, match = MODULE_ERRORS[case] if case in MODULE_ERRORS else PACKED_ERRORS[case]
    lstm = nn_cls is nn.LSTM
    if case in PACKED_ERRORS and not lstm:
        match = None
    ref, ours = nn_cls(D, H, dtype=F64), OURS[nn_cls](D, H, dtype=F64, backend="stepwise")
    inputs = make_inputs(lstm)
    assert_raises_like(lambda: ours(*inputs), lambda: ref(*inputs), match)


# The LSTM's cell state and proj_size: name: (proj_size, inputs, None: torch's message exactly, or ours)
LSTM_ERRORS = {
    "cx width": (0, lambda: (rand(T, B, D), hx(True, (1, B, H), (1, B, H + 1))), None),
    "cx 2-D for batched input": (0, lambda: (rand(T, B, D), hx(True, (1, B, H), (B, H))), None),
    "packed cx width": (0, lambda: (packed([3, 2, 1]), hx(True, (1, 3, H), (1, 3, H + 1))),
                        re.escape("Expected hidden[1] size (1, 3, 5), got [1, 3, 6]")),
    "proj_size hx width": (2, lambda: (rand(T, B, D), hx(True, (1, B, H))), None),
    "packed proj_size hx width": (2, lambda: (packed([3, 2, 1]), hx(True, (1, 3, H))),
                                  re.escape("Expected hidden[0] size (1, 3, 2), got [1, 3, 5]")),
}


@pytest.mark.parametrize("case", LSTM_ERRORS)
def test_lstm_state_errors_match_torch(case):
    proj_size, make_inputs, match = LSTM_ERRORS[case]
    ref = nn.LSTM(D, H, proj_size=proj_size, dtype=F64)
    ours = LSTM(D, H, proj_size=proj_size, dtype=F64, backend="stepwise")
    inputs = make_inputs()
    assert_raises_like(lambda: ours(*inputs), lambda: ref(*inputs), match)


CELL_ERRORS = {
    "3-D input": (lambda lstm: (rand(2, B, D),), None),
    "3-D hx": (lambda lstm: (rand(B, D), hx(lstm, (1, B, H))), None),
    "feature size": (lambda lstm: (rand(B, D + 1),), "input_size"),
    "hx batch": (lambda lstm: (rand(B, D), hx(lstm, (B - 1, H))), "batch size"),
    "hx width": (lambda lstm: (rand(B, D), hx(lstm, (B, H + 1))), "hidden0"),
    "hx dtype": (lambda lstm: (rand(B, D), hx(lstm, (B, H), dtype=torch.float32)), "hx"),
}


@pytest.mark.parametrize("case", CELL_ERRORS)
@pytest.mark.parametrize("nn_cls", [nn.LSTMCell, nn.GRUCell], ids=["LSTMCell", "GRUCell"])
def test_cell_errors_match_torch(nn_cls, case):
    make_inputs, match = CELL_ERRORS[case]
    ref, ours = nn_cls(D, H, dtype=F64), OURS[nn_cls](D, H, dtype=F64, backend="stepwise")
    inputs = make_inputs(nn_cls is nn.LSTMCell)
    assert_raises_like(lambda: ours(*inputs), lambda: ref(*inputs), match)


# --- Determinism, autocast, eval-mode backward ---------------------------------------------------------


def states(lstm, shape, device, dtype=F64):
    """A fresh hx of `shape` that requires grad: h0, or the LSTM's (h0, c0)."""
    def one():
        return torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)
    return (one(), one()) if lstm else one()


def run_and_grads(module, inputs, cotangents=None):
    """The outputs and the gradients of the inputs and every parameter under a fixed random cotangent per
    output (drawn on the first call; pass them back in to reuse them)."""
    outs = flat(module(*inputs))
    cotangents = cotangents or [torch.randn_like(t) for t in outs]
    loss = sum((w * t.float()).sum() for w, t in zip(cotangents, outs))
    leaves = [t for t in flat(inputs) if t.requires_grad] + list(module.parameters())
    return outs, list(torch.autograd.grad(loss, leaves)), cotangents


@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_forward_and_backward_are_deterministic(cls, backend, device):
    """Two runs give bitwise-equal outputs, final states and gradients (fp32, both directions, B across
    batch tiles, packed input: lengths in the kernels)."""
    T, B = 3, 17
    module = cls(D, H, bidirectional=True, device=device, backend=backend)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    x = torch.randn(T, B, D, device=device, requires_grad=True)
    inputs = (pack_padded_sequence(x, lengths, enforce_sorted=False), states(cls is LSTM, (2, B, H), device,
                                                                                  torch.float32))
    first, first_grads, cotangents = run_and_grads(module, inputs)
    second, second_grads, _ = run_and_grads(module, inputs, cotangents)
    assert len(first_grads) == 2 + (cls is LSTM) + len(list(module.parameters()))
    for i, (a, b) in enumerate(zip(first + first_grads, second + second_grads)):
        assert a.dtype == torch.float32 and torch.equal(a, b), i


@pytest.mark.parametrize("nn_cls", [nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell],
                         ids=["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_autocast_bf16(nn_cls, device):
    """Under autocast (bf16) the op runs in autocast's dtype, as nn's modules do: bf16 outputs and states,
    close to nn's fp32 module outside autocast; the gradients reach the fp32 inputs and parameters in fp32,
    close to nn's. Without hx too (the zero state the module makes)."""
    cell = nn_cls in (nn.LSTMCell, nn.GRUCell)
    ref = nn_cls(D, H, device=device, **({} if cell else dict(bidirectional=True)))
    ours = OURS[nn_cls](D, H, device=device, backend="stepwise", **({} if cell else dict(bidirectional=True)))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(*((B, D) if cell else (T, B, D)), device=device, requires_grad=True)
    inputs = (x, states(nn_cls in (nn.LSTM, nn.LSTMCell), (B, H) if cell else (2, B, H), device, torch.float32))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        outs, grads, cotangents = run_and_grads(ours, inputs)
    want, want_grads, _ = run_and_grads(ref, inputs, cotangents)
    assert [t.dtype for t in outs] == [torch.bfloat16] * len(want)
    assert [g.dtype for g in grads] == [torch.float32] * len(want_grads)
    for i, (a, b) in enumerate(zip(outs + grads, want + want_grads)):
        assert rel_err(a, b) <= TOLERANCE[torch.bfloat16], i
    with torch.no_grad():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            outs = flat(ours(x))
        want = flat(ref(x))
    assert [t.dtype for t in outs] == [torch.bfloat16] * len(want)
    for i, (a, b) in enumerate(zip(outs, want)):
        assert rel_err(a, b) <= TOLERANCE[torch.bfloat16], f"no hx: {i}"


@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
@pytest.mark.parametrize("nn_cls", [nn.LSTM, nn.GRU], ids=["LSTM", "GRU"])
def test_backward_in_eval_mode(nn_cls, backend, device):
    """model.eval() changes nothing but dropout: backward runs and matches nn's (float64, every gradient;
    cuDNN refuses backward in eval mode), padded and packed input."""
    ref, ours = twins(nn_cls, backend, device, input_size=D, hidden_size=H, num_layers=2, dropout=0.5)
    ref.eval()
    ours.eval()
    lstm = nn_cls is nn.LSTM

    def padded():
        return rand(T, B, D).to(device).detach().requires_grad_(), states(lstm, (2, B, H), device)

    def packed_input():
        x = rand(T, B, D).to(device).detach().requires_grad_()
        return (pack_padded_sequence(x, [2, T, 1], enforce_sorted=False),)
    assert_same(ref, ours, padded)
    assert_same(ref, ours, packed_input)


# --- record_state_gradients through the modules, against retain_grad on every state -----------------------

BACKENDS = ["reference", "auto", "stepwise", "persistent"]


def loop_state_gradients(cell, x, lengths, layers, cotangents):
    """The oracle: nn's two-layer bidirectional maths as a loop of the references' single steps, every
    state (h_t, and c_t for the LSTM) a tensor of its own with retain_grad; returns per layer the
    (2 or 1, dirs, T, B) norms of their gradients (0 at padding steps) after one backward."""
    T, B = x.shape[:2]
    active = torch.arange(T).unsqueeze(1) < lengths  # (T, B)
    states, outs = [], []
    inp = x
    for w_ih, w_hh, b_ih, b_hh, h0, c0 in layers:
        ys, per_dir = [], []
        for d in range(2):
            h, c = h0[d], c0[d]
            y, kept = [None] * T, [None] * T
            for t in (reversed(range(T)) if d else range(T)):
                step = inp[t:t + 1]
                if cell == "lstm":  # each step's own states (h_t depends on this c_t, not on the kept one)
                    _, h_new, c_new = lstm_reference(step, h, c, w_ih[d], w_hh[d], b_ih[d], b_hh[d])
                    c = torch.where(active[t, :, None], c_new, c)
                    kept[t] = (h_new, c_new)
                else:
                    _, h_new = gru_reference(step, h, w_ih[d], w_hh[d], b_ih[d], b_hh[d])
                    kept[t] = (h_new,)
                for s in kept[t]:
                    s.retain_grad()
                h = torch.where(active[t, :, None], h_new, h)
                y[t] = torch.where(active[t, :, None], h, 0.0)
            ys.append(torch.stack(y))
            per_dir.append(kept)
            outs += [h] + ([c] if cell == "lstm" else [])
        inp = torch.cat(ys, dim=2)
        states.append(per_dir)
    outs.append(inp)
    sum((o * w).sum() for o, w in zip(outs, cotangents)).backward()
    norms = []
    for per_dir in states:
        kinds = len(per_dir[0][0])
        n = torch.stack([torch.stack([torch.stack([s[k].grad.norm(dim=1) for s in per_dir[d]]) for d in range(2)])
                         for k in range(kinds)])  # (kinds, dirs, T, B)
        norms.append(n * active)
    return norms



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_module_records_state_gradients(cls, backend, device):
    """record_state_gradients on a two-layer bidirectional module, unsorted packed input with hx, on every
    backend: each layer's buffer reaches its layer's op, nothing is recorded before the backward, rows come
    back in the caller's order, and the norms (h, and the LSTM's c; the GRU has none) equal a float64 loop
    of single steps with retain_grad on every state (loop_state_gradients); padding steps are exactly 0."""
    lstm = cls is LSTM
    module = cls(2, H, num_layers=2, bidirectional=True, dtype=F64, device=device, backend=backend)
    lengths = torch.tensor([3, 1, 4])
    x = torch.randn(4, 3, 2, dtype=F64)
    h0, c0 = torch.randn(4, 3, H, dtype=F64), torch.randn(4, 3, H, dtype=F64)
    cotangents = [torch.randn(3, H, dtype=F64) for _ in range(4 * (1 + lstm))]
    cotangents.append(torch.randn(4, 3, 2 * H, dtype=F64))  # y's
    cpu = [[t.detach().cpu().requires_grad_() for t in w] for w in module.all_weights]  # per layer and direction
    layers = [(*[tuple(cpu[2 * k + d][j] for d in range(2)) for j in range(4)], h0[2 * k:2 * k + 2],
               c0[2 * k:2 * k + 2]) for k in range(2)]
    want = loop_state_gradients(cls.__name__.lower(), x, lengths, layers, cotangents)  # per layer (kinds, 2, T, B)

    with record_state_gradients(module, per_sample=True) as rec:
        packed_x = pack_padded_sequence(x.to(device), lengths, enforce_sorted=False)
        out, h_n = module(packed_x, (h0.to(device), c0.to(device)) if lstm else h0.to(device))
        finals = torch.stack(h_n, 1).flatten(0, 1) if lstm else h_n  # (h, c) per layer and direction, as the loop
        y = pad_packed_sequence(out)[0]
        with pytest.raises(RuntimeError, match="no backward has run"):  # the forward wrote no buffer
            rec.norms
        (sum((f * w.to(device)).sum() for f, w in zip(finals, cotangents)) + (y * cotangents[-1].to(device)).sum()
         ).backward()
    if not lstm:
        with pytest.raises(AttributeError, match="LSTM"):
            rec.cell_norms
    kinds = [("per_sample", "norms")] + [("cell_per_sample", "cell_norms")] * lstm
    for kind, (per_row, total) in enumerate(kinds):
        expected = torch.cat([w[kind] for w in want])  # (layers · directions, T, B)
        assert rel_err(getattr(rec, per_row), expected) <= 1e-6, per_row
        assert rel_err(getattr(rec, total), expected.norm(dim=2)) <= 1e-6, total
        assert (getattr(rec, per_row)[:, 1:, 1] == 0).all()  # row 1 has one step: the rest is padding


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nn_cls", [nn.LSTMCell, nn.GRUCell], ids=["LSTMCell", "GRUCell"])
def test_cell_records_state_gradients(nn_cls, backend, device):
    """record_state_gradients on a cell called twice, on every backend: per call ‖∂L/∂h'‖ (and ‖∂L/∂c'‖; the
    GRUCell has none), the total derivative through the later call, against nn's cell with retain_grad on
    each state."""
    lstm = nn_cls is nn.LSTMCell
    ref, ours = twins(nn_cls, backend, device, input_size=D, hidden_size=H)
    xs = [torch.randn(B, D, dtype=F64, device=device) for _ in range(2)]
    hx = states(lstm, (B, H), device)
    cotangent = torch.randn(B, H, dtype=F64, device=device)
    per_call = []
    for module in (ref, ours):
        state, kept = hx, []
        for x in xs:
            state = module(x, state)
            kept.append(state)
            for s in state if lstm else (state,):
                s.retain_grad()
        ((state[0] if lstm else state) * cotangent).sum().backward()
        per_call.append(kept)
    with record_state_gradients(ours, per_sample=True) as rec:
        state = hx
        for x in xs:
            state = ours(x, state)
        ((state[0] if lstm else state) * cotangent).sum().backward()
    if not lstm:
        with pytest.raises(AttributeError, match="LSTM"):
            rec.cell_norms
    kinds = ["per_sample", "cell_per_sample"][:1 + lstm]
    for kind, name in enumerate(kinds):
        want = torch.stack([(s[kind] if lstm else s).grad.norm(dim=1) for s in per_call[0]])[None]  # (1, 2, B)
        assert want.all() and rel_err(getattr(rec, name), want) <= 1e-6, name


@pytest.mark.parametrize("cls", [LSTM, LSTMCell], ids=["LSTM", "LSTMCell"])
def test_compiled_module_records_eagerly(cls, device):
    """A torch.compile'd LSTM / LSTMCell inside the context runs its recorded calls eagerly (a graph break,
    see elman_triton.modules): the eager norms of h and c. aot_eager: Dynamo and AOTAutograd without
    inductor's minutes of code generation on CPU."""
    torch.compiler.reset()
    module = cls(D, H, backend="stepwise", device=device)
    x = torch.randn(*((B, D) if cls is LSTMCell else (T, B, D)), device=device)

    def loss(out):  # the cell's h', or the module's y
        return out[0].square().sum()
    with record_state_gradients(module) as rec:
        loss(module(x)).backward()
    eager = [rec.norms.clone(), rec.cell_norms.clone()]
    compiled = torch.compile(module, backend="aot_eager")
    compiled(x)  # compiled outside the context first
    with record_state_gradients(module) as rec:
        loss(compiled(x)).backward()
    torch.compiler.reset()
    for got, want in zip([rec.norms, rec.cell_norms], eager):
        assert (want > 0).all() and torch.equal(got, want)


# --- CUDA graphs ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_cuda_graph_capture_of_forward_and_backward(cls, backend):
    """A training step (forward, loss, backward into .grad) captured in a CUDA graph and replayed on new
    input gives the eager step's outputs and gradients, bitwise."""
    torch.manual_seed(0)
    module = cls(D, H, num_layers=2, bidirectional=True, device="cuda", backend=backend)
    static_x = torch.randn(T, B, D, device="cuda", requires_grad=True)
    cotangent = torch.randn(T, B, 2 * H, device="cuda")

    def step():
        y = module(static_x)[0]
        (y * cotangent).sum().backward()
        return y

    side = torch.cuda.Stream()  # warm up (compile the kernels, allocate) off the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            module.zero_grad(set_to_none=True)
            static_x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    module.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step()
    for _ in range(2):  # replay on new input; .grad is overwritten, not accumulated, by each replay
        static_x.detach().copy_(torch.randn(T, B, D, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        got = [static_y.clone(), static_x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
        x = static_x.detach().clone().requires_grad_()
        y = module(x)[0]
        want = [y] + list(torch.autograd.grad((y * cotangent).sum(), [x, *module.parameters()]))
        assert len(got) == len(want)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), i
