"""The sweep: for each shape, check every provider against the float64 reference, then time the
providers that passed, in each mode. One row per provider × shape × mode, whatever happened.
A shape's cell (Shape.cell) says which layer: the Elman RNN, whose reference is elman_rnn_reference,
or the LSTM / GRU, whose reference is nn.LSTM / nn.GRU itself in float64.

Without a GPU the Triton providers are not timed; interpreter_checks runs their kernels through
Triton's interpreter at a few tiny shapes instead, for correctness only."""
import itertools
from dataclasses import asdict, dataclass

import torch

from elman_triton import elman_rnn_reference, persistent
from elman_triton.config import INTERPRETED

from .measure import ROW_METADATA, cache_and_budget, make_timer, peak_training_memory, rotation_count
from .providers import (TORCH_MODULES, Shape, family_persistent_kernel, layer_outputs, make_problem, module_state,
                        one_line, shape_text)

# ‖a − b‖ / ‖b‖ against the float64 reference.
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}
TF32_TOLERANCE = TOLERANCE["fp16"]  # TF32 products keep fp16's 10-bit mantissa


@dataclass
class Config:
    shapes: list
    providers: list
    modes: tuple
    device: torch.device
    check_seq: int  # the longest T the float64 check runs at
    rep_ms: float
    verify_only: bool = False
    nonlinearity: str = "tanh"
    seed: int = 0


def grid(dtypes, batches, hiddens, seqs, input_sizes=None):
    """Every combination; D = H unless input sizes are given."""
    return [Shape(dtype, T, B, H, D)
            for dtype, T, B, H in itertools.product(dtypes, seqs, batches, hiddens)
            for D in (input_sizes or [H])]


def tolerance(dtype, tf32):
    return TF32_TOLERANCE if dtype == "fp32" and tf32 else TOLERANCE[dtype]


def rel_err(a, b):
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@dataclass
class Reference:
    outputs: tuple  # (y, h_n), or (y, h_n, c_n) for the LSTM: problem.output_names
    grads: list | None  # of problem.args, in order

    @property
    def y(self):
        return self.outputs[0]

    @property
    def h_n(self):
        return self.outputs[1]


def float64_reference(problem, with_grad):
    """The problem's layer in float64: elman_rnn_reference for the Elman cell; for the LSTM / GRU,
    nn.LSTM / nn.GRU themselves with the problem's weights. Gradients of dy (and dstates) with respect
    to every tensor in problem.args."""
    if problem.cell == "elman":
        leaves = [t.detach().double().requires_grad_(with_grad) for t in problem.args]
        with torch.set_grad_enabled(with_grad):
            outputs = elman_rnn_reference(*leaves, nonlinearity=problem.nonlinearity)
    else:
        module = TORCH_MODULES[problem.cell](problem.rnn.input_size, problem.rnn.hidden_size,
                                             device=problem.x.device, dtype=torch.float64)
        module.load_state_dict(problem.rnn.state_dict())  # copies the weights into float64
        x, *states = [t.detach().double().requires_grad_(with_grad) for t in problem.inputs]
        leaves = [x, *states, *module.parameters()]  # nn's parameter order is problem.weights'
        with torch.set_grad_enabled(with_grad):
            outputs = layer_outputs(*module(x, module_state(*states)))
    grads = None
    if with_grad:
        cotangents = [t.double() for t in (problem.dy, *problem.dstates)]
        grads = list(torch.autograd.grad(outputs[:len(cotangents)], leaves, cotangents))
    return Reference(tuple(t.detach() for t in outputs), grads)


def output_errors(outputs, ref, names):
    """{'err_y': …, 'err_h_n': …[, 'err_c_n': …]}: each output against the reference's."""
    if len(outputs) != len(names):
        raise ValueError(f"expected {len(names)} outputs ({', '.join(names)}), got {len(outputs)}")
    return {f"err_{name}": rel_err(o, r) for name, o, r in zip(names, outputs, ref.outputs)}


def verify(provider, problem, ref, training, tol):
    """Run once and compare with the reference: inference (no_grad forward) or training (forward
    and backward, gradients of every input). Returns the row fields, with 'passed' and 'reason'."""
    try:
        run = provider.build(problem)
        if not training:
            with torch.no_grad():
                outputs = run()
            errors = output_errors(outputs, ref, problem.output_names)
        else:
            for t in problem.args:
                t.grad = None
            outputs = run()
            problem.backward(outputs)
            errors = output_errors(outputs, ref, problem.output_names)
            per_input = {name: float("inf") if t.grad is None else rel_err(t.grad, g)
                         for name, t, g in zip(problem.arg_names, problem.args, ref.grads)}
    except Exception as e:
        return {"passed": False, "reason": f"raised {one_line(e)}"}
    finally:
        for t in problem.args:
            t.grad = None
    return judge(errors, tol, per_input if training else None)


def judge(errors, tol, per_grad=None):
    """errors ({'err_y': …, 'err_h_n': …[, 'err_c_n': …]}) with 'passed' and 'reason' added; per_grad
    ({name: error} of each gradient) adds its worst as 'err_grad', named in the reason when it is too big."""
    worst = max(per_grad, key=per_grad.get) if per_grad else None
    if worst:
        errors = {**errors, "err_grad": per_grad[worst]}
    too_big = [f"{k}={v:.2e}" + (f" ({worst})" if k == "err_grad" else "")
               for k, v in errors.items() if not v <= tol]  # `not <=` also catches NaN
    reason = f"error above tolerance {tol:g}: {', '.join(too_big)}" if too_big else None
    return {**errors, "passed": not too_big, "reason": reason}


def time_mode(provider, problems, mode, timer):
    """Time one mode, rotating among the input sets. backward: each set keeps one forward graph and
    the timed call is only its backward (retain_graph), so the forward is not in the number."""
    runs = [provider.build(p) for p in problems]
    order = itertools.cycle(range(len(problems)))
    grads = [t for p in problems for t in p.args]
    try:
        if mode == "forward":
            def call():
                runs[next(order)]()
            with torch.no_grad():
                return timer(call, ())
        if mode == "fwd_bwd":
            def call():
                i = next(order)
                problems[i].backward(runs[i]())
            return timer(call, grads)
        outputs = [run() for run in runs]

        def call():
            i = next(order)
            problems[i].backward(outputs[i], retain_graph=True)
        return timer(call, grads)
    finally:
        for t in grads:
            t.grad = None


def run_shape(shape, config, timer):
    """All rows of one shape."""
    device = config.device
    blocked = {(p.name, m): p.availability(shape, device, m) for p in config.providers for m in config.modes}
    runnable = [p for p in config.providers if any(blocked[p.name, m] is None for m in config.modes)]
    needs_training = any(m != "forward" and blocked[p.name, m] is None for p in runnable for m in config.modes)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    for p in runnable:
        if p.per_shape_setup:
            p.per_shape_setup()

    # Check at check_T ≤ T: the float64 reference at very long T costs more than the timing itself.
    check_T = min(shape.T, config.check_seq)
    verdicts = {}
    if runnable:
        check = make_problem(shape, check_T, device, generator, config.nonlinearity, needs_training)
        reference = float64_reference(check, needs_training)  # its y and h_n serve the inference check too
        for p in runnable:
            tol = tolerance(shape.dtype, p.uses_tf32(device))
            for training in {m != "forward" for m in config.modes if blocked[p.name, m] is None}:
                verdicts[p.name, training] = verify(p, check, reference, training, tol)
        del check, reference

    timed = {}
    if runnable and not config.verify_only:
        cache_bytes, budget = cache_and_budget(device)
        first = make_problem(shape, shape.T, device, generator, config.nonlinearity, needs_training)
        problems = [first] + [make_problem(shape, shape.T, device, generator, config.nonlinearity, needs_training)
                              for _ in range(rotation_count(first.nbytes(), cache_bytes, budget) - 1)]
        for p in runnable:
            for mode in config.modes:
                if blocked[p.name, mode] is None and verdicts[p.name, mode != "forward"]["passed"]:
                    timed[p.name, mode] = _measure(p, problems, mode, timer)
        del problems, first
        if device.type == "cuda":
            torch.cuda.empty_cache()

    rows = []
    for p in config.providers:
        for mode in config.modes:
            tf32 = p.uses_tf32(device)
            row = {"provider": p.name, "mode": mode, **asdict(shape), "backend": p.describe(shape, device),
                   "note": p.note, "check_seq": check_T, "tolerance": tolerance(shape.dtype, tf32), "tf32": tf32,
                   "same_kernel_as_baseline": p.runs_baseline_on_cpu and device.type != "cuda"}
            if blocked[p.name, mode] is not None:
                row["status"], row["reason"] = blocked[p.name, mode]
            else:
                verdict = dict(verdicts[p.name, mode != "forward"])
                passed = verdict.pop("passed")
                row.update(verdict)
                if not passed:
                    row["status"] = "failed"
                elif config.verify_only:
                    row["status"] = "verified"
                else:
                    row.update(timed[p.name, mode], timer=timer.description)
            rows.append(row)
    return rows


def _measure(provider, problems, mode, timer):
    """Timing fields of one row (and peak memory for fwd_bwd); a crash becomes status 'error'."""
    try:
        timing = time_mode(provider, problems, mode, timer)
        fields = {"status": "ok", "median_ms": timing.median_ms, "q20_ms": timing.q20_ms,
                  "q80_ms": timing.q80_ms, "calls": timing.calls, "rotation_sets": len(problems)}
        if mode == "fwd_bwd":
            peak, how = peak_training_memory(provider.build(problems[0]), problems[0])
            fields["peak_train_mem_mib"] = None if peak is None else peak / 2 ** 20
            fields["peak_mem_note"] = how
        return fields
    except Exception as e:
        return {"status": "error", "reason": f"verified, then raised while timing: {one_line(e)}"}


def progress(shapes, label):
    """Iterate over shapes with a tqdm bar, or one printed line per shape where tqdm (an extra) is
    not installed, as on a GPU image without network."""
    try:
        from tqdm import tqdm
    except ImportError:
        for i, shape in enumerate(shapes):
            print(f"sweep {i + 1}/{len(shapes)}: {label(shape)}", flush=True)
            yield shape
        return
    bar = tqdm(shapes, desc="sweep", unit="shape")
    for shape in bar:
        bar.set_postfix_str(label(shape))
        yield shape


def run_sweep(config, metadata, checkpoint=None):
    """Rows of the whole sweep, each carrying the run's metadata, with a progress bar over shapes.
    checkpoint(rows) is called after every shape, so a run cut short still leaves what it measured."""
    timer = make_timer(config.device, config.rep_ms)
    rows = []
    for shape in progress(config.shapes, lambda s: shape_text(asdict(s))):
        try:
            shape_rows = run_shape(shape, config, timer)
        except Exception as e:  # e.g. out of memory making the inputs: report the shape, go on
            reason = f"shape setup raised {one_line(e)}"
            shape_rows = [{"provider": p.name, "mode": m, **asdict(shape), "status": "error", "reason": reason}
                          for p in config.providers for m in config.modes]
        for row in shape_rows:
            row.update({k: metadata[k] for k in ROW_METADATA})
            rows.append(row)
        if checkpoint:
            checkpoint(rows)
    return rows


# ---- the Triton kernels on CPU ----------------------------------------------------------------

# Tiny odd shapes (T, B, H, D not powers of 2) that reach every kernel: fp32 H = 17 takes persistent's
# small-H kernel and H = 72 (above SMALL_H_MAX[fp32] = 64) its large-H one, split over column programs;
# bf16 takes the half-precision path (bf16 storage, fp32 state).
INTERPRETER_SHAPES = (Shape("fp32", 5, 3, 17, 11), Shape("fp32", 4, 2, 72, 9), Shape("bf16", 5, 3, 17, 11))
# The LSTM's and GRU's kernels (the cell as a constexpr), against nn.LSTM / nn.GRU in float64, with gradients
# of h_n (and c_n) as well as y flowing into the backward kernels: fp32 H = 17 takes persistent's small-H
# kernel (H ≤ CELL_SMALL_H_MAX[fp32] = 32) and H = 40 its large-H one, over six column programs of
# CELL_BN = 8 units (Hp = 48); stepwise runs both.
FAMILY_INTERPRETER_SHAPES = {cell: (Shape("fp32", 5, 3, 17, 11, cell), Shape("fp32", 2, 3, 40, 7, cell))
                             for cell in ("lstm", "gru")}
INTERPRETER_MODES = {"inference": False, "training": True}  # mode name -> with gradients


def interpreter_kernel(provider, shape):
    """Which kernel a Triton provider runs at shape under the interpreter (where on-chip memory is
    unbounded, so H ≤ SMALL_H_MAX alone picks persistent's small-H kernel for the Elman cell, H ≤
    CELL_SMALL_H_MAX for the LSTM / GRU)."""
    if provider.name not in ("persistent", f"{shape.cell}_persistent"):
        return "one launch per step"
    if shape.cell != "elman":
        return family_persistent_kernel(shape)
    small = shape.H <= persistent.SMALL_H_MAX.get(shape.torch_dtype, 0)
    return "small-H kernel" if small else "large-H kernel"


def interpreter_checks(providers, nonlinearity="tanh", seed=0, shapes=INTERPRETER_SHAPES):
    """The Triton providers among `providers`, run through Triton's interpreter on CPU at each of
    `shapes` (INTERPRETER_SHAPES, the Elman cell's; FAMILY_INTERPRETER_SHAPES[cell] for the LSTM's and
    GRU's providers) and checked against the float64 reference: inference (y, h_n[, c_n]) and training
    (also the gradient of every input and weight). Correctness only: nothing is timed. One row per
    provider × shape × mode; status passed, failed, unsupported, needs_gpu (the provider cannot run
    in the interpreter) or not_run (this process imported the kernels without TRITON_INTERPRET=1)."""
    triton_providers = [p for p in providers if p.triton]
    device = torch.device("cpu")
    rows = []
    for shape in shapes if triton_providers else ():
        problem = make_problem(shape, shape.T, device, torch.Generator().manual_seed(seed), nonlinearity, True)
        reference = float64_reference(problem, with_grad=True)
        for p, (mode, training) in itertools.product(triton_providers, INTERPRETER_MODES.items()):
            row = {"check": "layer", "provider": p.name, "kernel": interpreter_kernel(p, shape), "mode": mode,
                   **asdict(shape), "tolerance": TOLERANCE[shape.dtype]}
            blocked = interpreter_blocked(p, shape, device)
            if blocked:
                row["status"], row["reason"] = blocked
            else:
                verdict = verify(p, problem, reference, training, TOLERANCE[shape.dtype])
                passed = verdict.pop("passed")
                row.update(verdict, status="passed" if passed else "failed")
            rows.append(row)
    return rows


def interpreter_blocked(provider, shape, device):
    """(status, reason) when provider is not checked in the interpreter at shape, else None."""
    if provider.no_interpreter:
        return "needs_gpu", provider.no_interpreter
    if not INTERPRETED:
        return "not_run", ("this process imported elman_triton without TRITON_INTERPRET=1, so its Triton kernels "
                           "cannot run on CPU; python -m benchmarks sets it when there is no GPU")
    if provider.check_support is not None:
        try:
            provider.check_support(shape, device)
        except (NotImplementedError, ValueError, TypeError) as e:
            return "unsupported", one_line(e)
    return None
