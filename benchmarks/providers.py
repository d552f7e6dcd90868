"""What the suite runs: input sets (Problem) and the implementations it compares (Provider).

Every provider of a cell computes the same layer on the same tensors: the Elman cell (PROVIDERS),
h_t = act(x_t W_ihᵀ + b_ih + h_{t-1} W_hhᵀ + b_hh), or the LSTM / GRU (FAMILY_PROVIDERS: nn.LSTM / nn.GRU
against elman_triton.family's drop-ins, PyTorch's maths and gate order). A provider's `build(problem)`
returns a zero-argument callable giving the layer's outputs, (y, h_n), or (y, h_n, c_n) for the LSTM;
building is where per-input-set work happens (CUDA-graph capture), so the timed call is only the run itself.
"""
from dataclasses import dataclass
from functools import cache
from typing import Callable

import torch

from elman_triton import elman_rnn, elman_rnn_reference, family_ops, persistent
from elman_triton.family import GRU, LSTM
from elman_triton.family_ops import GATES

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("forward", "backward", "fwd_bwd")
CELLS = ("elman", "lstm", "gru")
TORCH_MODULES = {"elman": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}


@dataclass(frozen=True)
class Shape:
    dtype: str  # a key of DTYPES
    T: int
    B: int
    H: int
    D: int
    cell: str = "elman"  # a key of TORCH_MODULES

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]


@dataclass
class Problem:
    """One input set. The weights are the parameters of an nn.RNN (nn.LSTM, nn.GRU) module, so cuDNN
    gets its own flattened weight buffer (no per-call repacking) and every provider's gradients land
    in the same .grad fields. dy is the upstream gradient of y for the backward modes (None if not
    needed); dstates those of the final states, LSTM / GRU only (h_n, and c_n for the LSTM), so their
    backward kernels' dh_n / dc_n inputs are checked too. c0: the LSTM's initial cell state."""
    rnn: torch.nn.RNNBase
    x: torch.Tensor
    h0: torch.Tensor
    dy: torch.Tensor | None
    c0: torch.Tensor | None = None
    dstates: tuple = ()

    @property
    def cell(self):
        return "lstm" if self.rnn.mode == "LSTM" else "gru" if self.rnn.mode == "GRU" else "elman"

    @property
    def nonlinearity(self):
        return self.rnn.nonlinearity

    @property
    def weights(self):
        r = self.rnn
        return r.weight_ih_l0, r.weight_hh_l0, r.bias_ih_l0, r.bias_hh_l0

    @property
    def inputs(self):
        """(x, h0), or (x, h0, c0) for the LSTM."""
        return (self.x, self.h0) if self.c0 is None else (self.x, self.h0, self.c0)

    @property
    def args(self):
        """Every tensor a gradient is checked for: (x, h0, weight_ih, weight_hh, bias_ih, bias_hh), which
        are elman_rnn's positional arguments, with the LSTM's c0 after h0."""
        return (*self.inputs, *self.weights)

    @property
    def arg_names(self):
        return ("x", "h0", *(("c0",) if self.c0 is not None else ()), "weight_ih", "weight_hh", "bias_ih", "bias_hh")

    @property
    def output_names(self):
        return ("y", "h_n", "c_n") if self.cell == "lstm" else ("y", "h_n")

    @property
    def hx(self):
        return module_state(self.h0, self.c0)

    def backward(self, outputs, retain_graph=False):
        """Backpropagate dy (and dstates) through a provider's outputs."""
        torch.autograd.backward(outputs[:1 + len(self.dstates)], (self.dy, *self.dstates), retain_graph=retain_graph)

    def nbytes(self):
        tensors = (*self.args, *((self.dy, *self.dstates) if self.dy is not None else ()))
        return sum(t.numel() * t.element_size() for t in tensors)


def module_state(h0, c0=None):
    """A one-layer, one-direction initial state as the torch modules take it: h0 (1, B, H), or
    (h0, c0) for the LSTM."""
    return h0.unsqueeze(0) if c0 is None else (h0.unsqueeze(0), c0.unsqueeze(0))


def layer_outputs(y, state):
    """(y, h_n) or (y, h_n, c_n), (B, H) each, from a one-layer, one-direction module's (y, h_n) or
    (y, (h_n, c_n))."""
    return (y, *(s[0] for s in (state if isinstance(state, tuple) else (state,))))


def make_problem(shape, T, device, generator, nonlinearity, with_dy):
    """Random inputs at sequence length T (the check may use a shorter T than the timed shape), for
    the shape's cell (nonlinearity: the Elman cell's). Weights are drawn like nn.RNN's (nn.LSTM's,
    nn.GRU's) init, U(-1/√H, 1/√H), so the recurrence neither explodes nor saturates; the draws come
    from `generator` so a run is reproducible."""
    dtype = shape.torch_dtype

    def uniform(*size, scale=1.0):
        return (torch.rand(*size, device=device, dtype=dtype, generator=generator) * 2 - 1) * scale

    kwargs = {"nonlinearity": nonlinearity} if shape.cell == "elman" else {}
    rnn = TORCH_MODULES[shape.cell](shape.D, shape.H, device=device, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in rnn.parameters():  # in place: the cuDNN flat buffer keeps backing the parameters
            p.copy_(uniform(*p.shape, scale=shape.H ** -0.5))
    problem = Problem(
        rnn=rnn,
        x=uniform(T, shape.B, shape.D).requires_grad_(),
        h0=uniform(shape.B, shape.H).requires_grad_(),
        dy=uniform(T, shape.B, shape.H) if with_dy else None,
    )
    if shape.cell == "lstm":
        problem.c0 = uniform(shape.B, shape.H).requires_grad_()
    if shape.cell != "elman" and with_dy:
        problem.dstates = tuple(uniform(shape.B, shape.H) for _ in problem.output_names[1:])
    return problem


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[Problem], Callable[[], tuple]]
    describe: Callable[[Shape, torch.device], str]  # what actually runs for this shape and device
    ours: bool = False  # this project's code: a failed verification fails the run (exit code)
    triton: bool = False  # runs Triton kernels: needs a CUDA GPU
    tf32_flag: str = "matmul"  # the torch flag that lets its fp32 math use TF32: "matmul" or "cudnn"
    forward_only: str | None = None  # why the backward modes are skipped, if they are
    check_support: Callable[[Shape, torch.device], None] | None = None  # raises if the shape is not held
    per_shape_setup: Callable[[], None] | None = None  # called once per shape, before any build
    runs_baseline_on_cpu: bool = False  # on CPU it runs its torch module's own kernel: a speedup would be noise
    no_interpreter: str | None = None  # why the CPU run cannot check it in Triton's interpreter, if it cannot
    note: str = ""

    def availability(self, shape, device, mode):
        """(status, reason) when this provider does not run for (shape, mode) here, else None."""
        if self.triton and device.type != "cuda":
            return "needs_gpu", ("timing Triton kernels needs a CUDA GPU; on CPU their correctness is checked in "
                                 "Triton's interpreter (the interpreter rows)")
        if mode != "forward" and self.forward_only:
            return "skipped", self.forward_only
        if self.check_support is not None:
            try:
                self.check_support(shape, device)
            except (NotImplementedError, ValueError, TypeError) as e:
                return "unsupported", one_line(e)
            except Exception as e:  # a crash in the support check is a bug, not a limit
                return "failed", f"support check raised {one_line(e)}"
        return None

    def uses_tf32(self, device):
        if device.type != "cuda":
            return False
        flag = torch.backends.cudnn if self.tf32_flag == "cudnn" else torch.backends.cuda.matmul
        return bool(flag.allow_tf32)


def shape_text(fields):
    """'LSTM bf16 T=1024 B=16 H=768 D=768' from a row's (or asdict(Shape)'s) fields; no cell word for Elman."""
    cell = fields.get("cell", "elman")
    return ("" if cell == "elman" else f"{cell.upper()} ") + \
        f"{fields['dtype']} T={fields['T']} B={fields['B']} H={fields['H']} D={fields['D']}"


def one_line(error, limit=300):
    text = f"{type(error).__name__}: {error}".splitlines()[0] if str(error) else type(error).__name__
    return text[:limit]


# ---- builders -------------------------------------------------------------------------------

def _torch_rnn(problem):
    """nn.RNN, nn.LSTM or nn.GRU itself (the problem's module)."""
    def run():
        # cuDNN's inference path (no reserve space) under no_grad; its training path, which backward needs, otherwise
        problem.rnn.training = torch.is_grad_enabled()
        y, state = problem.rnn(problem.x, problem.hx)
        return layer_outputs(y, state)
    return run


def _eager(problem):
    return lambda: elman_rnn_reference(*problem.args, nonlinearity=problem.nonlinearity)


@cache
def _compiled_step():
    """One step of the reference, compiled: a T=1 call of elman_rnn_reference is exactly one step of
    the same math. Compiling the whole loop would unroll all T steps (minutes of compile per T).
    Made on first use: torch.compile imports dynamo, seconds the other providers should not pay."""
    return torch.compile(elman_rnn_reference)


def _compiled_loop(problem):
    x, h0, *weights = problem.args
    step = _compiled_step()

    def run():
        h, ys = h0, []
        for t in range(x.shape[0]):
            _, h = step(x[t:t + 1], h, *weights, nonlinearity=problem.nonlinearity)
            ys.append(h)
        return torch.stack(ys), h
    return run


def _op(backend):
    def build(problem):
        return lambda: elman_rnn(*problem.args, nonlinearity=problem.nonlinearity, backend=backend)
    return build


def _stepwise_graph(problem):
    """Capture one stepwise forward (T launches) in a CUDA graph bound to this input set; the timed
    call is the replay. Inference only: the capture runs under no_grad."""
    run = _op("stepwise")(problem)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()  # compiles the kernels and warms the allocator outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()

    def replay():
        graph.replay()
        return out
    return replay


def _family(backend):
    """elman_triton.family's LSTM / GRU drop-in on the problem's own parameters (the nn module's
    Parameter objects, so gradients land where every provider's do), as a user swaps it for nn's."""
    def build(problem):
        D, H = problem.rnn.input_size, problem.rnn.hidden_size
        dtype = problem.rnn.weight_hh_l0.dtype
        module = (LSTM if problem.cell == "lstm" else GRU)(D, H, device="meta", dtype=dtype, backend=backend)
        for name, parameter in problem.rnn.named_parameters():
            setattr(module, name, parameter)

        def run():
            y, state = module(problem.x, problem.hx)
            return layer_outputs(y, state)
        return run
    return build


# ---- descriptions and support checks --------------------------------------------------------

def _describe_torch_rnn(shape, device):
    name = TORCH_MODULES[shape.cell].__name__
    if device.type != "cuda":
        return f"nn.{name}, native CPU kernel"
    probe = torch.empty(1, device=device, dtype=shape.torch_dtype)
    # The same test ATen's rnn_tanh/rnn_relu (lstm, gru) use to pick cuDNN over its own per-step loop.
    if torch.cudnn_is_acceptable(probe):
        return f"nn.{name}, cuDNN"
    return f"nn.{name}, ATen per-step loop (cuDNN does not take this dtype here)"


def family_auto_backend(shape, device):
    """The backend elman_triton.family's LSTM / GRU with backend="auto" runs for a plain call (no lengths,
    transforms or state-gradient hook) at shape on device, as family_ops decides it (family_ops.auto_backend):
    on CUDA "persistent" or "stepwise", on CPU "native" (torch.lstm / torch.gru)."""
    return family_ops.auto_backend(shape.cell, shape.H, shape.torch_dtype, device)


def check_family_persistent(shape, device):
    """ValueError, naming the limit, where backend="persistent" does not hold the LSTM / GRU at shape on device
    (persistent.cell_check_supported); under the interpreter only H counts."""
    persistent.cell_check_supported(GATES[shape.cell], shape.H, shape.torch_dtype,
                                    device if device.type == "cuda" else None)


def family_persistent_kernel(shape):
    """Which of persistent's kernels an LSTM / GRU at shape runs: its small-H kernel within
    persistent.CELL_SMALL_H_MAX (the limits are powers of 2, so H ≤ limit is the launcher's next_pow2(H) ≤
    limit), else its large-H kernel."""
    small = shape.H <= persistent.CELL_SMALL_H_MAX[GATES[shape.cell]].get(shape.torch_dtype, 0)
    return "small-H kernel" if small else "large-H kernel"


def _describe_family(backend):
    def describe(shape, device):
        name = f"elman_triton.family.{TORCH_MODULES[shape.cell].__name__}(backend={backend!r})"
        if backend == "stepwise":
            return f"{name}, one launch per step"
        if backend == "persistent":
            return f"{name}, one launch per sequence ({family_persistent_kernel(shape)})"
        try:
            picked = family_auto_backend(shape, device)
        except Exception as e:
            return f"{name} (persistent.cell_supports raised {one_line(e)})"
        return f"{name} -> " + (f"torch.{shape.cell}, native CPU kernel" if picked == "native" else picked)
    return describe


def _describe_auto(shape, device):
    if device.type != "cuda":
        return "elman_rnn auto -> nn.RNN's native CPU kernel"
    try:
        picked = "persistent" if persistent.supports(shape.B, shape.H, shape.torch_dtype, device) else "stepwise"
    except Exception as e:
        return f"elman_rnn auto (persistent.supports raised {one_line(e)})"
    return f"elman_rnn auto -> {picked}"


def _check_persistent(shape, device):
    persistent.check_supported(shape.B, shape.H, shape.torch_dtype, device)


def _fixed(text):
    return lambda shape, device: text


PROVIDERS = {p.name: p for p in (
    Provider("torch_rnn", _torch_rnn, _describe_torch_rnn, tf32_flag="cudnn",
             note="the baseline for speedups"),
    Provider("eager", _eager, _fixed("elman_rnn_reference, Python loop"),
             note="timed at full T; the timer budget gives few calls at long T"),
    Provider("compile", _compiled_loop, _fixed("torch.compile of one reference step, Python loop over T"),
             per_shape_setup=torch.compiler.reset,  # fresh dynamo caches: no recompile-limit fallback to eager
             note="compile time excluded (first call is the warm-up)"),
    Provider("stepwise", _op("stepwise"), _fixed("elman_rnn stepwise, one launch per step"),
             ours=True, triton=True),
    Provider("stepwise_graph", _stepwise_graph, _fixed("elman_rnn stepwise, CUDA-graph replay"),
             ours=True, triton=True,
             forward_only="CUDA-graph capture covers the forward only; backward modes not captured",
             no_interpreter="CUDA-graph capture needs a GPU; it replays the stepwise kernels, checked in the "
                            "stepwise rows"),
    Provider("persistent", _op("persistent"), _fixed("elman_rnn persistent, one launch per sequence"),
             ours=True, triton=True, check_support=_check_persistent),
    Provider("auto", _op("auto"), _describe_auto, ours=True, runs_baseline_on_cpu=True),
)}

# The LSTM and GRU (issue 17): nn.LSTM / nn.GRU (cuDNN on a GPU) and elman_triton.family's drop-in with
# backend="auto", what its users get (on a GPU persistent where persistent.cell_supports holds the cell, else
# stepwise; the row's backend says which); its Triton backends, "stepwise" and "persistent" (the small-H and
# large-H kernels), are checked in Triton's interpreter on CPU (FAMILY_INTERPRETER_PROVIDERS).
FAMILY_PROVIDERS = {cell: (Provider(f"torch_{cell}", _torch_rnn, _describe_torch_rnn, tf32_flag="cudnn",
                                    note=f"the baseline for the {cell.upper()} speedups"),
                           Provider(f"{cell}_auto", _family("auto"), _describe_family("auto"), ours=True,
                                    runs_baseline_on_cpu=True))
                    for cell in CELLS[1:]}
FAMILY_INTERPRETER_PROVIDERS = {cell: (Provider(f"{cell}_stepwise", _family("stepwise"), _describe_family("stepwise"),
                                                ours=True, triton=True),
                                       Provider(f"{cell}_persistent", _family("persistent"),
                                                _describe_family("persistent"), ours=True, triton=True,
                                                check_support=check_family_persistent))
                                for cell in CELLS[1:]}
BASELINES = {"elman": "torch_rnn", **{cell: providers[0].name for cell, providers in FAMILY_PROVIDERS.items()}}
