"""Module-level rows: ElmanRNN against nn.RNN on the same input, in configurations a model uses.

Cases, at one shape (the sweep's longest T, then largest B and H), D = H:
  one_direction   1 layer, time-major, padded (T, B, D): the base of the ratios below
  bidirectional   1 layer, both directions
  2l_bi_bf        2 layers, bidirectional, batch_first (B, T, D)
  packed          1 layer, a PackedSequence of B sequences with lengths uniform in [T/8, T], unsorted
Every provider is first checked against nn.RNN in float64 (same weights, same input) on y and h_n,
then timed forward (no_grad) and fwd+bwd. Each row carries its speedup over nn.RNN on the same case
and, for packed and bidirectional, its time over the same provider's one_direction time (packed ÷
padded; both directions ÷ one). Goals on a GPU (issue 10): ours packed ≤ 1.1× padded (cuDNN: 5–114×),
bidirectional ≤ 1.2× one direction. On CPU the rows are timed on one thread, carry no speedups or
ratios (CPU: not a performance result), and the Triton backends are checked instead in Triton's
interpreter by interpreter_module_checks: 2 layers, bidirectional, packed, at a tiny shape.
"""
import copy
from dataclasses import asdict, dataclass

import torch
from torch.nn.utils.rnn import pack_padded_sequence

from elman_triton import ElmanRNN

from .measure import CPU_NOTE
from .providers import DTYPES, Shape, one_line
from .sweep import TOLERANCE, interpreter_blocked, interpreter_kernel, judge, rel_err

MODULE_MODES = ("forward", "fwd_bwd")
MODULE_FIELDS = ("case", "provider", "mode", "dtype", "T", "B", "H", "D", "status", "reason", "err_y", "err_h_n",
                 "median_ms", "q20_ms", "q80_ms", "speedup_vs_torch_rnn", "same_kernel_as_baseline",
                 "over_one_direction")


@dataclass(frozen=True)
class Case:
    name: str
    layers: int
    bidirectional: bool
    batch_first: bool
    packed: bool


CASES = (Case("one_direction", 1, False, False, False), Case("bidirectional", 1, True, False, False),
         Case("2l_bi_bf", 2, True, True, False), Case("packed", 1, False, False, True))
RATIO_BASE = "one_direction"
# provider name -> ElmanRNN backend (None: nn.RNN itself) and whether it needs a CUDA GPU
MODULE_PROVIDERS = {"torch_rnn": (None, False), "auto": ("auto", False), "stepwise": ("stepwise", True),
                    "persistent": ("persistent", True)}


def module_shape(shapes):
    """The one shape the module rows run at: the sweep's longest T, then largest B, then H."""
    s = max(shapes, key=lambda s: (s.T, s.B, s.H))
    return s.dtype, s.T, s.B, s.H


def make_input(case, T, B, D, device, dtype, generator):
    """(module input, lengths or None): a padded tensor, or a PackedSequence of unsorted lengths
    drawn uniformly in [T/8, T] with one sequence of length T (so the padded time is T)."""
    x = torch.rand(T, B, D, device=device, dtype=dtype, generator=generator) * 2 - 1
    if not case.packed:
        return (x.transpose(0, 1).contiguous() if case.batch_first else x), None
    low = max(1, T // 8)
    lengths = torch.randint(low, T + 1, (B,), generator=generator, device=device).cpu()
    lengths[torch.randint(0, B, (1,), generator=generator, device=device).item()] = T
    return pack_padded_sequence(x, lengths, enforce_sorted=False), lengths


def run_module(module, inp):
    out, h_n = module(inp)
    return (out.data if hasattr(out, "batch_sizes") else out), h_n


def _detached(inp, dtype=None):
    if hasattr(inp, "batch_sizes"):
        return inp._replace(data=inp.data.detach().to(dtype or inp.data.dtype))
    return inp.detach().to(dtype or inp.dtype)


def module_rows(shape, device, timer, seed=0):
    """All module rows at shape (dtype name, T, B, H); a row per case × provider × mode."""
    dtype_name, T, B, H = shape
    dtype, D = DTYPES[dtype_name], H
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for case in CASES:
        base = dict(case=case.name, dtype=dtype_name, T=T, B=B, H=H, D=D)
        reference = torch.nn.RNN(D, H, case.layers, bidirectional=case.bidirectional, batch_first=case.batch_first,
                                 device=device, dtype=dtype)
        inp, _ = make_input(case, T, B, D, device, dtype, generator)
        want = run_module(reference.double(), _detached(inp, torch.float64))
        reference.to(dtype)
        for name, (backend, needs_gpu) in MODULE_PROVIDERS.items():
            if needs_gpu and device.type != "cuda":
                rows += [{**base, "provider": name, "mode": m, "status": "needs_gpu",
                          "reason": "Triton kernels need a CUDA GPU"} for m in MODULE_MODES]
                continue
            module = reference if backend is None else _elman_like(reference, backend)
            for row in _provider_rows(base, name, module, inp, want, timer, TOLERANCE[dtype_name]):
                # auto on CPU runs nn.RNN's own kernel per layer: a speedup would be noise
                row["same_kernel_as_baseline"] = name == "auto" and device.type != "cuda"
                rows.append(row)
    _add_ratios(rows, gpu=device.type == "cuda")
    return rows


def _elman_like(reference, backend):
    module = ElmanRNN(reference.input_size, reference.hidden_size, reference.num_layers,
                      nonlinearity=reference.nonlinearity, bidirectional=reference.bidirectional,
                      batch_first=reference.batch_first, backend=backend,
                      device=reference.weight_hh_l0.device, dtype=reference.weight_hh_l0.dtype)
    module.load_state_dict(reference.state_dict())
    return module


def _provider_rows(base, name, module, inp, want, timer, tol):
    try:
        with torch.no_grad():
            got = run_module(module, inp)
        errors = {"err_y": rel_err(got[0], want[0]), "err_h_n": rel_err(got[1], want[1])}
    except (ValueError, TypeError, NotImplementedError) as e:
        return [{**base, "provider": name, "mode": m, "status": "unsupported", "reason": one_line(e)}
                for m in MODULE_MODES]
    except Exception as e:
        return [{**base, "provider": name, "mode": m, "status": "failed", "reason": f"raised {one_line(e)}"}
                for m in MODULE_MODES]
    if not all(v <= tol for v in errors.values()):
        return [{**base, "provider": name, "mode": m, **errors, "status": "failed",
                 "reason": f"error above tolerance {tol:g} against nn.RNN in float64"} for m in MODULE_MODES]
    rows = []
    trainable = _detached(inp)
    data = trainable.data if hasattr(trainable, "batch_sizes") else trainable
    data.requires_grad_(True)
    dy = torch.randn_like(got[0])
    grads = [data, *module.parameters()]
    for mode in MODULE_MODES:
        row = {**base, "provider": name, "mode": mode, **errors}
        try:
            if mode == "forward":
                with torch.no_grad():
                    timing = timer(lambda: run_module(module, inp), ())
            else:
                timing = timer(lambda: run_module(module, trainable)[0].backward(dy), grads)
            row.update(status="ok", median_ms=timing.median_ms, q20_ms=timing.q20_ms, q80_ms=timing.q80_ms)
        except Exception as e:
            row.update(status="error", reason=f"verified, then raised while timing: {one_line(e)}")
        rows.append(row)
    for t in grads:
        t.grad = None
    return rows


def _add_ratios(rows, gpu):
    """Speedups over nn.RNN and time ratios to one direction: GPU figures only (None on CPU)."""
    ok = {(r["case"], r["provider"], r["mode"]): r["median_ms"] for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok" or not gpu:
            continue
        baseline = ok.get((r["case"], "torch_rnn", r["mode"]))
        same = r.get("same_kernel_as_baseline")
        r["speedup_vs_torch_rnn"] = baseline / r["median_ms"] if baseline and not same else None
        base = ok.get((RATIO_BASE, r["provider"], r["mode"]))
        r["over_one_direction"] = r["median_ms"] / base if base and r["case"] in ("packed", "bidirectional") else None


def module_markdown(rows, gpu):
    """The summary.md section, and the lines printed at the end of a run."""
    if not rows:
        return []
    r0 = rows[0]
    out = [f"## Module rows: ElmanRNN against nn.RNN ({r0['dtype']}, T={r0['T']}, B={r0['B']}, H=D={r0['H']})", "",
           "packed: lengths uniform in [T/8, T]; ÷ one direction is the same provider's time over its one_direction "
           "time (packed ÷ padded, both directions ÷ one)." + ("" if gpu else
                                                                f" **{CPU_NOTE}**: these rows show the module "
                                                                "paths run (one thread); no speedups or ratios."),
           "",
           "| case | provider | mode | status | ms | × nn.RNN | ÷ one direction | reason |", "|---" * 8 + "|"]
    for r in rows:
        out.append(f"| {r['case']} | {r['provider']} | {r['mode']} | {r['status']} | {_fmt(r.get('median_ms'))} "
                   f"| {_fmt(r.get('speedup_vs_torch_rnn'))} | {_fmt(r.get('over_one_direction'))} "
                   f"| {r.get('reason') or ''} |")
    return out + [""]


def _fmt(value):
    return "" if value is None else f"{value:.3g}"


def module_lines(rows, gpu):
    """Short stdout lines: each case's times, then packed ÷ padded and both ÷ one direction."""
    if not rows:
        return []
    r0 = rows[0]
    lines = [f"module rows ({r0['dtype']}, T={r0['T']}, B={r0['B']}, H=D={r0['H']}), ms"
             + (" (× nn.RNN where it is not the same kernel):" if gpu else
                f" on one thread; {CPU_NOTE} (they show the module paths run; no speedups or ratios):")]
    for case in dict.fromkeys(r["case"] for r in rows):
        for mode in MODULE_MODES:
            cells = [f"{r['provider']} " + (f"{r['median_ms']:.3g}" + (f" ({r['speedup_vs_torch_rnn']:.3g}×)"
                                                                      if r.get("speedup_vs_torch_rnn") else "")
                                            if r["status"] == "ok" else r["status"])
                     for r in rows if r["case"] == case and r["mode"] == mode]
            lines.append(f"  {case} {mode}: " + ", ".join(cells))
    for case, text in (("packed", "packed ÷ padded"), ("bidirectional", "both directions ÷ one")):
        for mode in MODULE_MODES:
            ratios = [f"{r['provider']} {r['over_one_direction']:.3g}" for r in rows
                      if r["case"] == case and r["mode"] == mode and r.get("over_one_direction")]
            if ratios:
                lines.append(f"  {text}, {mode}: " + ", ".join(ratios))
    return lines


# ---- the Triton backends on CPU -----------------------------------------------------------------

INTERPRETER_CASE = Case("2 layers, bidirectional, packed", 2, True, False, True)
INTERPRETER_SHAPE = Shape("fp32", 6, 3, 17, 11)


def interpreter_module_checks(providers, nonlinearity="tanh", seed=0):
    """ElmanRNN on each Triton backend among `providers`, through Triton's interpreter on CPU, against
    nn.RNN with the same weights in float64 at INTERPRETER_SHAPE: 2 layers, bidirectional, a packed
    input of unsorted mixed lengths (the kernels' length masking and reverse direction). inference:
    y and h_n; training: also the gradients of the input and of every weight. Correctness only:
    nothing is timed. Rows as sweep.interpreter_checks'."""
    shape, case, device = INTERPRETER_SHAPE, INTERPRETER_CASE, torch.device("cpu")
    checked = [p for p in providers if p.triton]
    if not checked:
        return []
    generator = torch.Generator().manual_seed(seed)
    reference = torch.nn.RNN(shape.D, shape.H, case.layers, nonlinearity=nonlinearity,
                             bidirectional=case.bidirectional)
    with torch.no_grad():
        for weight in reference.parameters():
            weight.copy_((torch.rand(weight.shape, generator=generator) * 2 - 1) * shape.H ** -0.5)
    inp, _ = make_input(case, shape.T, shape.B, shape.D, device, torch.float32, generator)
    want = _outputs_and_grads(copy.deepcopy(reference).double(), _detached(inp, torch.float64), generator)
    rows = []
    for p in checked:
        base = {"check": f"module: {case.name}", "provider": p.name, "kernel": interpreter_kernel(p, shape),
                **asdict(shape), "tolerance": TOLERANCE[shape.dtype]}
        blocked = interpreter_blocked(p, shape, device)
        try:
            got = None if blocked else _outputs_and_grads(_elman_like(reference, p.name), _detached(inp), None,
                                                          weights=want["weights"])
        except Exception as e:
            blocked = "failed", f"raised {one_line(e)}"
        for mode in ("inference", "training"):
            row = {**base, "mode": mode}
            if blocked:
                row["status"], row["reason"] = blocked
            else:
                row.update(_compare(got, want, training=mode == "training", tol=row["tolerance"]))
            rows.append(row)
    return rows


def _outputs_and_grads(module, inp, generator, weights=None):
    """y (packed data), h_n, and the gradients of L = Σ y·w_y + Σ h_n·w_h (fixed random float64 weights,
    drawn from generator on the first call) with respect to the input data and every parameter."""
    data = inp.data.detach().requires_grad_(True)
    y, h_n = run_module(module, inp._replace(data=data))
    if weights is None:
        weights = [torch.randn(y.shape, generator=generator, dtype=torch.float64),
                   torch.randn(h_n.shape, generator=generator, dtype=torch.float64)]
    loss = (y.double() * weights[0]).sum() + (h_n.double() * weights[1]).sum()
    names = ["input", *(name for name, _ in module.named_parameters())]
    grads = torch.autograd.grad(loss, [data, *module.parameters()])
    return {"y": y.detach(), "h_n": h_n.detach(), "grads": dict(zip(names, grads)), "weights": weights}


def _compare(got, want, training, tol):
    errors = {"err_y": rel_err(got["y"], want["y"]), "err_h_n": rel_err(got["h_n"], want["h_n"])}
    per_grad = {name: rel_err(got["grads"][name], g) for name, g in want["grads"].items()} if training else None
    verdict = judge(errors, tol, per_grad)
    verdict["status"] = "passed" if verdict.pop("passed") else "failed"
    return verdict
