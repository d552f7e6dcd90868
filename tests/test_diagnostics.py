"""record_state_gradients and elman_rnn(state_grad_norms=): ‖∂L/∂h_t‖ from the op's own backward, against a
float64 Python loop in which every h_t is a graph node with retain_grad() (its .grad is the total derivative)."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from elman_triton import ElmanRNN, ElmanRNNCell, elman_rnn, persistent, record_state_gradients, stepwise
from elman_triton.ops import run_layer
from elman_triton.state_gradients import state_gradient_norms
from oracles import INPUT_NAMES
from utils import TOLERANCE, as_float64, count_launches, make_problem, rel_err

BACKENDS = ["auto", "stepwise", "persistent", "reference"]
TOL = 1e-4  # fp32 against float64, relative norm error


def oracle_per_sample(rnn, x, h0, lengths, w_out, w_h):
    """(L*D, T, B) float64 ‖∂L/∂h_t[b]‖ of L = Σ w_out·output + Σ w_h·h_n, one row at a time over its own
    length (what nn.RNN means by packed input), every state a retain_grad() node."""
    T, B, _ = x.shape
    dirs = 2 if rnn.bidirectional else 1
    params = [[w.detach().double().requires_grad_() for w in ws] for ws in rnn.all_weights]
    act = torch.tanh if rnn.nonlinearity == "tanh" else torch.relu
    states, loss = [], 0
    for b in range(B):
        n = int(lengths[b])
        inp = x[:n, b].double()
        row_states = []
        for layer in range(rnn.num_layers):
            outputs = []
            for d in range(dirs):
                k = layer * dirs + d
                w_ih, w_hh, b_ih, b_hh = params[k]
                h, hs = h0[k, b].double(), [None] * n
                for t in (reversed(range(n)) if d else range(n)):
                    h = act(inp[t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh)
                    h.retain_grad()
                    hs[t] = h
                row_states.append(hs)
                outputs.append(torch.stack(hs))
                loss = loss + (h * w_h[k, b]).sum()
            inp = torch.cat(outputs, dim=1)
        loss = loss + (inp * w_out[:n, b]).sum()
        states.append(row_states)
    loss.backward()
    norms = torch.zeros(rnn.num_layers * dirs, T, B, dtype=torch.float64)
    for b, row_states in enumerate(states):
        for k, hs in enumerate(row_states):
            for t, h in enumerate(hs):
                norms[k, t, b] = h.grad.norm()
    return norms


def recorded_per_sample(rnn, x, h0, lengths, w_out, w_h):
    """Run rnn on x (packed when lengths is given) inside record_state_gradients; the same loss as the oracle."""
    with record_state_gradients(rnn, per_sample=True) as rec:
        if lengths is None:
            y, h_n = rnn(x, h0)
        else:
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
            y, h_n = rnn(packed, h0)
            y, _ = pad_packed_sequence(y, total_length=x.shape[0])
        ((y * w_out.float()).sum() + (h_n * w_h.float()).sum()).backward()
    return rec


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_records_total_state_gradient(backend, num_layers, bidirectional, packed, device):
    T, B, D, H = 5, 4, 3, 6
    dirs = 2 if bidirectional else 1
    rnn = ElmanRNN(D, H, num_layers, bidirectional=bidirectional, backend=backend, device=device)
    x, h0 = torch.randn(T, B, D, device=device), torch.randn(num_layers * dirs, B, H, device=device)
    lengths = torch.tensor([3, 5, 1, 4]) if packed else torch.full((B,), T)
    w_out, w_h = torch.randn(T, B, dirs * H, dtype=torch.float64), torch.randn(num_layers * dirs, B, H,
                                                                                 dtype=torch.float64)
    expected = oracle_per_sample(rnn, x.cpu(), h0.cpu(), lengths, w_out, w_h)
    rec = recorded_per_sample(rnn, x, h0, lengths if packed else None, w_out.to(device), w_h.to(device))
    assert rec.per_sample.shape == (num_layers * dirs, T, B) and rec.per_sample.dtype == torch.float32
    assert rel_err(rec.per_sample.cpu(), expected) < TOL
    assert rel_err(rec.norms.cpu(), expected.norm(dim=2)) < TOL
    if packed:  # steps past a row's length count as zero
        past = torch.arange(T).unsqueeze(1) >= lengths
        assert (rec.per_sample.cpu()[:, past] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_and_batch_first(backend, device):
    """relu (the IRNN) and batch_first input: per_sample stays time-major (T, B)."""
    T, B, D, H = 6, 3, 2, 5
    rnn = ElmanRNN(D, H, 2, nonlinearity="relu", batch_first=True, backend=backend, device=device)
    x, h0 = torch.randn(B, T, D, device=device), torch.rand(2, B, H, device=device)
    w_out, w_h = torch.randn(T, B, H, dtype=torch.float64), torch.randn(2, B, H, dtype=torch.float64)
    expected = oracle_per_sample(rnn, x.cpu().transpose(0, 1), h0.cpu(), torch.full((B,), T), w_out, w_h)
    rec = recorded_per_sample(rnn, x, h0, None, w_out.transpose(0, 1).to(device), w_h.to(device))
    assert rel_err(rec.per_sample.cpu(), expected) < TOL


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_op_fills_state_grad_norms(backend, reverse, device):
    """The op's own argument, on y and h_n together, in float32, float64 and bfloat16 (whose gradients
    the norm sums in fp32)."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        problem = make_problem(5, 3, 4, 7, dtype=dtype, device=device)
        w_y, w_h = torch.randn(5, 3, 7, dtype=dtype, device=device), torch.randn(3, 7, dtype=dtype, device=device)
        norms = torch.zeros(5, 3, device=device)
        y, h_n = elman_rnn(*(problem[n] for n in INPUT_NAMES), backend=backend, reverse=reverse,
                           state_grad_norms=norms)
        ((y * w_y).sum() + (h_n * w_h).sum()).backward()

        ref = as_float64(problem)
        x, h, states = ref["x"], ref["h0"], [None] * 5
        for t in (reversed(range(5)) if reverse else range(5)):
            h = torch.tanh(x[t] @ ref["weight_ih"].T + ref["bias_ih"] + h @ ref["weight_hh"].T + ref["bias_hh"])
            h.retain_grad()
            states[t] = h
        ((torch.stack(states) * w_y.double()).sum() + (h * w_h.double()).sum()).backward()
        assert rel_err(norms, torch.stack([s.grad.norm(dim=1) for s in states])) < max(TOL, TOLERANCE[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_gradients_do_not_underflow(backend, device):
    """Gradients near 1e-25 (far down a vanishing gradient) have fp32 squares below fp32's range: the norm
    is summed in float64, so it is still right rather than 0."""
    problem = make_problem(4, 3, 2, 5, device=device)
    w_y = torch.randn(4, 3, 5, device=device)
    norms = torch.zeros(4, 3, device=device)
    y, _ = elman_rnn(*(problem[n] for n in INPUT_NAMES), backend=backend, state_grad_norms=norms)
    ((y * w_y).sum() * 1e-25).backward()
    unscaled = torch.zeros(4, 3, device=device)
    y, _ = elman_rnn(*(problem[n] for n in INPUT_NAMES), backend=backend, state_grad_norms=unscaled)
    (y * w_y).sum().backward()
    assert (norms > 0).all() and rel_err(norms.double() * 1e25, unscaled) < 1e-5
    rnn = ElmanRNN(2, 5, backend=backend, device=device)  # and rec.norms, the norm over the batch
    x = torch.randn(4, 3, 2, device=device)
    with record_state_gradients(rnn) as tiny:
        (rnn(x)[0].sum() * 1e-25).backward()
    with record_state_gradients(rnn) as plain:
        rnn(x)[0].sum().backward()
    assert (tiny.norms > 0).all() and rel_err(tiny.norms.double() * 1e25, plain.norms) < 1e-5


def test_state_gradient_norms_with_lengths():
    """The lengths parameter (for kernels that run variable lengths themselves): row b's last step is
    lengths[b]-1 forward (where dh_n enters), 0 in reverse; steps past it are zero whatever they hold."""
    T, B, H = 5, 3, 4
    lengths = torch.tensor([5, 2, 3])
    w = torch.randn(H, H, dtype=torch.float64)
    for reverse in (False, True):
        dy, dz, dh_n = torch.randn(T, B, H, dtype=torch.float64), torch.randn(T, B, H, dtype=torch.float64), \
            torch.randn(B, H, dtype=torch.float64)
        out = torch.zeros(T, B)
        state_gradient_norms(dy, dz, dh_n, w, reverse, out, lengths)
        expected = torch.zeros(T, B, dtype=torch.float64)
        for b, n in enumerate(lengths.tolist()):
            for t in range(n):
                g = dy[t, b].clone()
                neighbour = t - 1 if reverse else t + 1
                if 0 <= neighbour < n:
                    g += dz[neighbour, b] @ w
                if t == (0 if reverse else n - 1):
                    g += dh_n[b]
                expected[t, b] = g.norm()
        assert rel_err(out, expected) < 1e-6


@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
def test_recording_runs_no_second_backward(backend, monkeypatch, device):
    """The same kernel launches with and without recording: the norms come from the one backward."""
    module = stepwise if backend == "stepwise" else persistent
    names = (["elman_step_fwd_kernel", "elman_step_bwd_kernel"] if backend == "stepwise"
             else ["elman_persistent_small_fwd_kernel", "elman_persistent_small_bwd_kernel"])
    rnn = ElmanRNN(3, 6, 2, bidirectional=True, backend=backend, device=device)
    x = torch.randn(4, 2, 3, device=device)
    launches = []
    for record in (False, True):
        counters = count_launches(monkeypatch, module, *names)
        if record:
            with record_state_gradients(rnn) as rec:
                rnn(x)[0].sum().backward()
            assert rec.norms.shape == (4, 4) and (rec.norms > 0).all()
        else:
            rnn(x)[0].sum().backward()
        launches.append([c.launches for c in counters])
        monkeypatch.undo()
    assert launches[0] == launches[1]


def test_cell_records_one_step_per_call(device):
    """ElmanRNNCell: each call is one step; carried through a loop, the norms are those of the sequence."""
    T, B, D, H = 4, 3, 2, 5
    cell = ElmanRNNCell(D, H, device=device)
    x, w = torch.randn(T, B, D, device=device), torch.randn(T, B, H, dtype=torch.float64)
    with record_state_gradients(cell, per_sample=True) as rec:
        h, loss = None, 0
        for t in range(T):
            h = cell(x[t], h)
            loss = loss + (h * w[t].to(device).float()).sum()
        loss.backward()
    params = [p.detach().double().requires_grad_() for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih,
                                                              cell.bias_hh)]
    h, states, loss = torch.zeros(B, H, dtype=torch.float64), [], 0
    for t in range(T):
        h = torch.tanh(x[t].cpu().double() @ params[0].T + params[2] + h @ params[1].T + params[3])
        h.retain_grad()
        states.append(h)
        loss = loss + (h * w[t]).sum()
    loss.backward()
    expected = torch.stack([s.grad.norm(dim=1) for s in states])
    assert rec.norms.shape == (1, T) and rel_err(rec.per_sample[0].cpu(), expected) < TOL


def test_nothing_recorded_or_patched_outside_the_context(device):
    rnn = ElmanRNN(3, 4, device=device)
    forward = rnn.forward
    with record_state_gradients(rnn) as rec:
        rnn(torch.randn(3, 2, 3, device=device))[0].sum().backward()
    norms = rec.norms.clone()
    rnn(torch.randn(5, 2, 3, device=device))[0].sum().backward()  # outside: rec does not change
    assert torch.equal(rec.norms, norms) and "forward" not in vars(rnn) and rnn.forward == forward
    assert rnn.state_grad_norms_hook is None and "state_grad_norms_hook" not in vars(rnn)  # the hook is removed
    import elman_triton.modules
    assert elman_triton.modules.elman_rnn is elman_rnn and elman_triton.modules.run_layer is run_layer


@pytest.mark.parametrize("kind", ["rnn", "cell"])
def test_norms_read_before_backward_raise(kind, device):
    """The buffers are zeros until a backward writes them: reading them earlier is an error, not all-zero norms
    (which would read as a vanished gradient)."""
    module = ElmanRNN(3, 4, 2, device=device) if kind == "rnn" else ElmanRNNCell(3, 4, device=device)
    x = torch.randn(5, 2, 3, device=device) if kind == "rnn" else torch.randn(2, 3, device=device)
    with record_state_gradients(module, per_sample=True) as rec:
        out = module(x)
        for name in ("norms", "per_sample"):
            with pytest.raises(RuntimeError, match="no backward has run"):
                getattr(rec, name)
        (out[0] if kind == "rnn" else out).sum().backward()
        assert (rec.norms > 0).all()
        if kind == "rnn":  # a new forward replaces the recorded pass: its norms are not there until its backward
            module(x)
            with pytest.raises(RuntimeError, match="no backward has run"):
                rec.norms


def test_hook_protocol(device):
    """modules' documented state_grad_norms_hook: asked once per forward for one (directions, T, B) buffer per
    layer (T and B of the padded, length-sorted batch; batch_first input too), which the backward fills."""
    rnn = ElmanRNN(3, 4, 2, bidirectional=True, batch_first=True, backend="reference", device=device)
    asked = []

    def hook(T, B, device, unsorted_indices):
        asked.append((T, B, unsorted_indices))
        return [torch.zeros(2, T, B, device=device) for _ in range(2)]

    rnn.state_grad_norms_hook = hook
    try:
        rnn(torch.randn(2, 5, 3, device=device))
        packed = pack_padded_sequence(torch.randn(2, 5, 3, device=device), torch.tensor([2, 5]), batch_first=True,
                                      enforce_sorted=False)
        y, _ = rnn(packed)
        buffers = hook(5, 2, device, None)
        asked.pop()
        rnn.state_grad_norms_hook = lambda *args: buffers
        rnn(packed)[0].data.sum().backward()
    finally:
        del rnn.state_grad_norms_hook
    assert [a[:2] for a in asked] == [(5, 2), (5, 2)] and asked[0][2] is None
    assert torch.equal(asked[1][2], packed.unsorted_indices)
    # Rows in sorted order: the length-5 row first, then the length-2 row, zero past its 2 steps.
    assert all((b[:, :2] > 0).all() and (b[:, 2:, 0] > 0).all() and (b[:, 2:, 1] == 0).all() for b in buffers)


def test_errors(device):
    rnn = ElmanRNN(3, 4, device=device)
    with pytest.raises(TypeError, match="ElmanRNN or ElmanRNNCell"):
        with record_state_gradients(torch.nn.RNN(3, 4)):
            pass
    with record_state_gradients(rnn) as rec:
        with pytest.raises(RuntimeError, match="nothing recorded"):
            rec.norms
        with pytest.raises(AttributeError, match="per_sample=True"):
            rec.per_sample
        with pytest.raises(RuntimeError, match="already"):
            with record_state_gradients(rnn):
                pass
    problem = make_problem(3, 2, 4, 5, device=device)
    args = [problem[n] for n in INPUT_NAMES]
    with pytest.raises(ValueError, match=r"state_grad_norms must have shape \(T, B\)"):
        elman_rnn(*args, state_grad_norms=torch.zeros(2, 3, device=device))
    with pytest.raises(TypeError, match="state_grad_norms must be float32"):
        elman_rnn(*args, state_grad_norms=torch.zeros(3, 2, dtype=torch.float64, device=device))


@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
def test_recording_under_torch_compile(backend, device):
    """Under torch.compile the op and the norm writer are custom ops: fullgraph, the same norms as eager."""
    torch.compiler.reset()
    problem = make_problem(4, 3, 2, 5, device=device)
    w_y = torch.randn(4, 3, 5, device=device)

    def run(norms, **p):
        y, h_n = elman_rnn(*(p[n] for n in INPUT_NAMES), backend=backend, reverse=True, state_grad_norms=norms)
        return (y * w_y).sum() + h_n.sum()

    eager, compiled = torch.zeros(4, 3, device=device), torch.zeros(4, 3, device=device)
    run(eager, **problem).backward()
    torch.compile(run, fullgraph=True)(compiled, **problem).backward()
    torch.compiler.reset()
    assert (eager > 0).all() and rel_err(compiled, eager) < 1e-6


def test_norm_writer_passes_opcheck(device):
    args = (torch.randn(3, 2, 4, device=device), torch.randn(3, 2, 4, device=device), torch.randn(2, 4, device=device),
            torch.randn(4, 4, device=device), False, torch.zeros(3, 2, device=device), torch.tensor([3, 2], device=device))
    torch.library.opcheck(torch.ops.elman_triton.state_gradient_norms, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compiled_module_records_eagerly(device):
    """A torch.compile'd module inside the context runs its recorded calls eagerly: the eager norms."""
    torch.compiler.reset()
    rnn = ElmanRNN(3, 5, 2, bidirectional=True, backend="stepwise", device=device)
    x = torch.randn(4, 2, 3, device=device)
    with record_state_gradients(rnn) as rec:
        rnn(x)[0].square().sum().backward()
    eager = rec.norms.clone()
    compiled = torch.compile(rnn)
    compiled(x)  # compiled outside the context first
    with record_state_gradients(rnn) as rec:
        compiled(x)[0].square().sum().backward()
    torch.compiler.reset()
    assert (eager > 0).all() and torch.equal(rec.norms, eager)
