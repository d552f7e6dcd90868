"""Derived figures (FLOPs, speedups, floors), the project's targets, and the output files."""
import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from itertools import product
from typing import Callable

from .measure import CPU_NOTE, ROW_METADATA
from .module_rows import MODULE_FIELDS, module_markdown
from .providers import BASELINES, DTYPES, FAMILY_PROVIDERS, MODES, shape_text

BASELINE, EAGER, OURS = "torch_rnn", "eager", "auto"
MODE_FLOP_FACTOR = {"forward": 1, "backward": 2, "fwd_bwd": 3}  # backward ≈ 2× forward
ELEMENT_BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}
GATES = {"elman": 1, "gru": 3, "lstm": 4}  # a cell's matmul columns per hidden unit

SAME_KERNEL_NOTE = ("runs the same native kernel as the torch module it is compared with (nn.RNN, nn.LSTM, "
                    "nn.GRU) on this device: its time differs from that module's only by noise, so no speedup "
                    "is computed")
SPEEDUP_TEXT = "speedup over torch (nn.RNN; nn.LSTM / nn.GRU for the lstm_ / gru_ providers)"
NO_GPU_NOTE = ("CPU-only run: GPU figures need a GPU. The Triton kernels are checked for correctness in "
               "Triton's interpreter, not timed (their sweep rows read 'needs_gpu'); cuDNN, peak training "
               "memory, speedups and the targets are GPU measurements. CPU times are taken on one thread "
               f"(torch.set_num_threads(1)) only to show the suite works: {CPU_NOTE}.")

ROW_FIELDS = (
    "cell", "provider", "mode", "dtype", "T", "B", "H", "D", "status", "reason", "backend", "note",
    "same_kernel_as_baseline", "check_seq", "tolerance", "tf32", "err_y", "err_h_n", "err_c_n", "err_grad",
    "median_ms", "q20_ms", "q80_ms", "calls", "rotation_sets", "timer",
    "per_step_us", "tflops", "speedup_vs_torch_rnn", "speedup_vs_eager", "peak_train_mem_mib", "peak_mem_note",
    "floor_compute_us", "floor_memory_us", "floor_barrier_us", "floor_us",
    *ROW_METADATA,
)
INTERPRETER_FIELDS = ("check", "cell", "provider", "kernel", "mode", "dtype", "T", "B", "H", "D", "status", "reason",
                      "tolerance", "err_y", "err_h_n", "err_c_n", "err_grad")
SHAPE_KEYS = ("dtype", "T", "B", "H", "D")


def forward_flops(T, B, H, D, gates=1):
    """Input projection plus recurrence: 2·T·B·G·H·(D + H), G = GATES[cell] (the pointwise gate maths
    is not counted)."""
    return 2 * T * B * gates * H * (D + H)


def mode_flops(mode, T, B, H, D, gates=1):
    return MODE_FLOP_FACTOR[mode] * forward_flops(T, B, H, D, gates)


def min_bytes(mode, dtype, T, B, H, D, gates=1):
    """The least DRAM traffic of a pass: each tensor it must read or write, touched once.
    forward: read x and the weights, write y. backward: read dy, y, x and the weights, write dx and
    the weight gradients. A gated cell has G times the weights (G = GATES[cell])."""
    inputs, outputs, weights = T * B * D, T * B * H, gates * (H * (D + H) + 2 * H)
    elements = {"forward": inputs + outputs + weights, "backward": 2 * (inputs + outputs + weights)}
    elements["fwd_bwd"] = elements["forward"] + elements["backward"]
    return elements[mode] * ELEMENT_BYTES[dtype]


def floor(mode, dtype, T, B, H, D, machine, gates=1):
    """Lower bounds in µs from the measured machine figures; the barrier term is the persistent
    design's (one grid barrier per step, per direction), absent when the barrier was not measured."""
    compute = mode_flops(mode, T, B, H, D, gates) / (machine["matmul_tflops"][dtype] * 1e12) * 1e6
    memory = min_bytes(mode, dtype, T, B, H, D, gates) / (machine["copy_gbps"] * 1e9) * 1e6
    barrier = None
    if machine["barrier_us"] is not None:
        barrier = machine["barrier_us"] * T * (2 if mode == "fwd_bwd" else 1)
    bounds = [b for b in (compute, memory, barrier) if b is not None]
    return {"floor_compute_us": compute, "floor_memory_us": memory, "floor_barrier_us": barrier,
            "floor_us": max(bounds)}


def shape_of(row):
    return tuple(row[k] for k in SHAPE_KEYS)


def add_derived(rows, machine, speedups=True):
    """Per-step latency, TFLOP/s, speedups over the torch module of the row's cell (nn.RNN, nn.LSTM,
    nn.GRU: BASELINES; the field keeps its name speedup_vs_torch_rnn) and over the eager loop (Elman
    only), same shape and mode in this run, and the floor, written into each row. speedups=False (a CPU
    run, where they would be no performance result) leaves the speedups None."""
    ok = {(r["provider"], r["mode"], shape_of(r)): r for r in rows if r.get("status") == "ok"}
    for row in rows:
        dims, cell = shape_of(row), row.get("cell", "elman")
        row.update(floor(row["mode"], *dims, machine, gates=GATES[cell]))
        if row.get("status") != "ok":
            continue
        seconds = row["median_ms"] * 1e-3
        row["per_step_us"] = seconds * 1e6 / row["T"]
        row["tflops"] = mode_flops(row["mode"], *dims[1:], gates=GATES[cell]) / seconds / 1e12
        # the eager loop computes the Elman cell: no speedup of an LSTM or GRU row over it
        for name, field in ((BASELINES[cell], "speedup_vs_torch_rnn"), (EAGER if cell == "elman" else None,
                                                                         "speedup_vs_eager")):
            other = ok.get((name, row["mode"], dims))
            row[field] = other["median_ms"] / row["median_ms"] if other and speedups else None
        if row.get("same_kernel_as_baseline"):
            row["speedup_vs_torch_rnn"] = None


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


# ---- targets --------------------------------------------------------------------------------

TARGET_GRID = [(B, H) for B, H in product((1, 8, 16, 64), (256, 512, 1024, 2048))]
GRID_TEXT = "bf16, T=1024, B∈{1,8,16,64} × H∈{256,512,1024,2048}, D=H"


@dataclass(frozen=True)
class Target:
    name: str
    mode: str
    baseline: str | None  # the provider compared with, or None when the target is on ours alone
    metric: Callable  # (ours row, baseline row or None) -> value per shape
    aggregate: Callable  # geomean, min or max over the shapes
    threshold: float
    higher_is_better: bool
    unit: str
    shapes: tuple = tuple(TARGET_GRID)
    ours: str = OURS  # the provider judged

    def met(self, value):
        return value >= self.threshold if self.higher_is_better else value <= self.threshold


def _speedup(ours, base):
    return base["median_ms"] / ours["median_ms"]


def _memory_ratio(ours, base):
    if ours.get("peak_train_mem_mib") is None or not base.get("peak_train_mem_mib"):
        return None
    return ours["peak_train_mem_mib"] / base["peak_train_mem_mib"]


TARGETS = (
    Target(f"forward speedup over cuDNN, geomean ({GRID_TEXT})", "forward", BASELINE, _speedup, geomean,
           2.0, True, "×"),
    Target("forward never slower than cuDNN (worst shape of the same grid)", "forward", BASELINE, _speedup, min,
           1.0, True, "×"),
    Target("fwd+bwd speedup over cuDNN, geomean (same grid)", "fwd_bwd", BASELINE, _speedup, geomean,
           1.5, True, "×"),
    Target("forward per-step latency at B=16, H=1024 (bf16, T=1024)", "forward", None,
           lambda ours, _: ours["per_step_us"], max, 1.5, False, " µs", shapes=((16, 1024),)),
    Target("forward speedup over the eager loop, geomean (same grid)", "forward", EAGER, _speedup, geomean,
           50.0, True, "×"),
    Target("peak training memory / cuDNN's (worst shape of the same grid)", "fwd_bwd", BASELINE, _memory_ratio,
           max, 1.0, False, "×"),
)

# The LSTM at FlashRNN's published shape (issue 17; H100, fp16: its fused CUDA LSTM 4.87 ms against cuDNN's
# 2.01 ms forward): elman_triton.family.LSTM (auto) at least as fast as nn.LSTM (cuDNN).
ANCHOR = {"cell": "lstm", "T": 1024, "B": 16, "H": 768}
FAMILY_TARGETS = tuple(
    Target(f"LSTM {text} at H=768, B=16, T=1024 (bf16, D=H): at least cuDNN's speed (nn.LSTM)", mode,
           FAMILY_PROVIDERS["lstm"][0].name, _speedup, min, 1.0, True, "×", shapes=((ANCHOR["B"], ANCHOR["H"]),),
           ours=FAMILY_PROVIDERS["lstm"][1].name)
    for mode, text in (("forward", "forward"), ("fwd_bwd", "fwd+bwd")))


def targets_for(cells):
    """The targets a run of these cells evaluates: the Elman grid's, and the LSTM anchor's."""
    return (TARGETS if "elman" in cells else ()) + (FAMILY_TARGETS if "lstm" in cells else ())


def evaluate_targets(rows, targets=TARGETS):
    """PASS / MISS / NOT MEASURED per target, for its provider (`auto` for the Elman targets: what users
    get) against the baseline.

    PASS needs every shape of the target measured. MISS when the measured value misses, when ours
    failed or errored on a target shape, or when a worst-case target is already missed on the shapes
    measured. Otherwise NOT MEASURED, with whatever partial figure there is.
    """
    index = {(r["provider"], r["mode"], shape_of(r)): r for r in rows}
    results = []
    for target in targets:
        values, broken, base_broken = [], [], []
        for B, H in target.shapes:
            dims = ("bf16", 1024, B, H, H)
            ours = index.get((target.ours, target.mode, dims))
            base = index.get((target.baseline, target.mode, dims)) if target.baseline else None
            if ours is not None and ours["status"] in ("failed", "error"):
                broken.append(f"B={B},H={H}")
            if base is not None and base["status"] in ("failed", "error"):
                base_broken.append(f"{target.baseline} {base['status']} at B={B},H={H}: {base.get('reason')}")
            base_ok = target.baseline is None or (base is not None and base["status"] == "ok")
            if ours is None or ours["status"] != "ok" or not base_ok:
                continue
            value = target.metric(ours, base)
            if value is not None:
                values.append(value)
        value = target.aggregate(values) if values else None
        complete = len(values) == len(target.shapes)
        measured = "—" if value is None else f"{value:.3g}{target.unit} ({len(values)}/{len(target.shapes)} shapes)"
        if broken:
            result, detail = "MISS", f"{target.ours} failed or errored at {', '.join(broken)}"
        elif value is None:
            result = "NOT MEASURED"
            detail = "; ".join(base_broken) or "the run has no timed rows for this target's shapes"
        elif not target.met(value) and (complete or target.aggregate in (min, max)):
            result, detail = "MISS", ""
        elif complete:
            result, detail = "PASS", ""
        else:
            result, detail = "NOT MEASURED", "only part of the target's shapes were timed"
        sign = "≥" if target.higher_is_better else "≤"
        results.append({"target": target.name, "threshold": f"{sign} {target.threshold:g}{target.unit}",
                        "measured": measured, "value": value, "result": result, "detail": detail})
    return results


def targets_not_evaluated(reason, targets=TARGETS):
    sign = {True: "≥", False: "≤"}
    return [{"target": t.name, "threshold": f"{sign[t.higher_is_better]} {t.threshold:g}{t.unit}",
             "measured": "—", "value": None, "result": "NOT MEASURED", "detail": reason} for t in targets]


# ---- auto's choice --------------------------------------------------------------------------

CANDIDATES = ("persistent", "stepwise")  # the Triton backends auto chooses between


def dispatch_check(rows):
    """Per shape and mode where both candidates were timed: the faster one, what auto ran (from its
    row's backend text, "elman_rnn auto -> <backend>"), and how much auto lost to the faster one.
    This is the measured crossover that elman_triton.persistent.supports (auto's rule) answers to."""
    index = {(r["provider"], r["mode"], shape_of(r)): r for r in rows if r.get("status") == "ok"}
    checks = []
    for (provider, mode, dims), auto in sorted(index.items(), key=lambda item: (item[0][1], item[0][2])):
        timed = {name: index.get((name, mode, dims)) for name in CANDIDATES}
        if provider != OURS or not all(timed.values()):
            continue
        faster = min(CANDIDATES, key=lambda name: timed[name]["median_ms"])
        picked = auto.get("backend", "").rpartition("-> ")[2] or "unknown"
        checks.append({"mode": mode, **dict(zip(SHAPE_KEYS, dims)), "faster": faster, "picked": picked,
                       "ratio": timed[CANDIDATES[1]]["median_ms"] / timed[CANDIDATES[0]]["median_ms"],
                       "auto_over_best": auto["median_ms"] / timed[faster]["median_ms"]})
    return checks


def dispatch_markdown(checks):
    if not checks:
        return ["No shape has both persistent and stepwise timed, so auto's rule is not checked by this run."]
    agree = sum(c["picked"] == c["faster"] for c in checks)
    out = [f"auto ran the faster Triton backend in {agree} of {len(checks)} shape × mode cells.", "",
           "| mode | dtype | T | B | H | D | stepwise / persistent time | faster | auto ran | auto / faster |",
           "|---" * 10 + "|"]
    out += [f"| {c['mode']} | {c['dtype']} | {c['T']} | {c['B']} | {c['H']} | {c['D']} | {c['ratio']:.3g} "
            f"| {c['faster']} | {c['picked']}{'' if c['picked'] == c['faster'] else ' ✗'} | {c['auto_over_best']:.3g} |"
            for c in checks]
    return out


# ---- files ----------------------------------------------------------------------------------

def _finite(value):
    """JSON has no NaN or infinity; write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json(path, metadata, machine, targets, rows, module_rows=(), interpreter_rows=()):
    doc = {"metadata": metadata, "machine": machine, "targets": targets,
           "rows": [{k: _finite(row.get(k)) for k in ROW_FIELDS} for row in rows],
           "module_rows": [{k: _finite(row.get(k)) for k in MODULE_FIELDS} for row in module_rows],
           "interpreter_rows": [{k: _finite(row.get(k)) for k in INTERPRETER_FIELDS} for row in interpreter_rows]}
    path.write_text(json.dumps(doc, indent=1) + "\n")


def write_csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value, digits=3):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def provider_geomeans(rows):
    """{mode: {provider: geomean speedup over its cell's torch module across this run's shapes}}."""
    speedups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("speedup_vs_torch_rnn"):
            speedups[r["mode"]][r["provider"]].append(r["speedup_vs_torch_rnn"])
    return {mode: {p: geomean(v) for p, v in by.items()} for mode, by in speedups.items()}


def same_kernel_providers(rows):
    """Providers that ran their torch module's own kernel in this run (auto, lstm_auto, gru_auto on CPU),
    in order of appearance."""
    return list(dict.fromkeys(r["provider"] for r in rows if r.get("same_kernel_as_baseline")))


def interpreter_summary(interpreter_rows):
    """'k/n checks passed: provider (kernel), …' over the interpreter rows that ran, or None when none did."""
    ran = [r for r in interpreter_rows if r["status"] in ("passed", "failed")]
    if not ran:
        return None
    passed = sum(r["status"] == "passed" for r in ran)
    kernels = ", ".join(dict.fromkeys(f"{r['provider']} ({r['kernel']})" for r in ran))
    return f"{passed}/{len(ran)} checks passed: {kernels}"


def interpreter_markdown(interpreter_rows):
    if not interpreter_rows:
        return []
    out = ["## Triton kernels in Triton's interpreter (CPU)", "",
           "Without a GPU the Triton kernels are not timed; each is run through the interpreter at tiny shapes "
           "and checked against float64 (y, h_n, the LSTM's c_n and, in training, every gradient; the lstm_ and "
           "gru_ rows against nn.LSTM / nn.GRU in float64). Correctness only.", "",
           interpreter_summary(interpreter_rows) or "No check ran.", "",
           "| check | provider | kernel | mode | dtype | T | B | H | D | status | err y | err h_n | err c_n "
           "| err grad | reason |",
           "|---" * 15 + "|"]
    out += [f"| {r['check']} | {r['provider']} | {r['kernel']} | {r['mode']} | {r['dtype']} | {r['T']} | {r['B']} "
            f"| {r['H']} | {r['D']} | {r['status']} | {_fmt(r.get('err_y'))} | {_fmt(r.get('err_h_n'))} "
            f"| {_fmt(r.get('err_c_n'))} | {_fmt(r.get('err_grad'))} | {r.get('reason') or ''} |"
            for r in interpreter_rows]
    return out + [""]


def summary_markdown(metadata, machine, targets, rows, module_rows=(), interpreter_rows=()):
    gpu = metadata["gpu"]
    out = [f"# Elman RNN benchmarks (with LSTM / GRU): {metadata['device']}, {metadata['date']}", ""]
    dirty = " (uncommitted changes)" if metadata["git_dirty"] else ""
    out += [f"- torch {metadata['torch']}, triton {metadata['triton']}, CUDA {metadata['cuda']}, "
            f"cuDNN {metadata['cudnn']}, commit {metadata['git_commit']}{dirty}",
            f"- TF32: torch.backends.cudnn.allow_tf32={metadata['cudnn_allow_tf32']}, "
            f"torch.backends.cuda.matmul.allow_tf32={metadata['cuda_matmul_allow_tf32']} "
            "(fp32 rows computed with TF32 are checked at the fp16 tolerance)",
            f"- command: `{metadata['command']}`", ""]
    if not gpu:
        out += [f"> **{NO_GPU_NOTE}**", ""]

    out += ["## Targets", "", f"For `{OURS}` (what `elman_rnn` users get) on {GRID_TEXT}; the LSTM targets for "
            f"`{FAMILY_PROVIDERS['lstm'][1].name}` (elman_triton.family.LSTM, backend='auto') against "
            f"`{FAMILY_PROVIDERS['lstm'][0].name}` (nn.LSTM).", "",
            "| target | threshold | measured | result | detail |", "|---|---|---|---|---|"]
    out += [f"| {t['target']} | {t['threshold']} | {t['measured']} | **{t['result']}** | {t['detail']} |"
            for t in targets]

    bad = [r for r in rows if r["status"] in ("failed", "error")]
    checked = [r for r in rows if r["status"] in ("ok", "verified", "failed", "error")]
    out += ["", "## Verification", "",
            f"{len(checked) - sum(r['status'] == 'failed' for r in rows)} of {len(checked)} checked rows passed "
            "(relative norm error of y, h_n, the LSTM's c_n and, for backward modes, every gradient, against "
            "float64; the LSTM and GRU rows against nn.LSTM / nn.GRU in float64)."]
    out += [f"- **{r['status']}**: {r['provider']} {r['mode']} {shape_text(r)}: {r['reason']}" for r in bad]
    out += [""] + interpreter_markdown(list(interpreter_rows))

    out += ["## Machine figures (the floor)" + ("" if gpu else f" ({CPU_NOTE})"), "",
            "| figure | value |", "|---|---|"]
    out += [f"| dense matmul {n}×{n}×{n}, {d} | {v:.3g} TFLOP/s |"
            for d, v in machine["matmul_tflops"].items() for n in [machine["matmul_size"]]]
    out += [f"| device copy ({machine['copy_bytes'] / 2 ** 30:.2g} GiB moved) | {machine['copy_gbps']:.4g} GB/s |",
            f"| grid barrier | {_barrier_text(machine)} |", ""]

    geo = provider_geomeans(rows)
    if geo:
        names = sorted({p for by in geo.values() for p in by})
        out += [f"## {SPEEDUP_TEXT[0].upper()}{SPEEDUP_TEXT[1:]} (geomean over this run's shapes)", "",
                "| mode | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        out += [f"| {mode} | " + " | ".join(_fmt(geo[mode].get(p)) for p in names) + " |" for mode in geo]
        out += [""]
    same = same_kernel_providers(rows)
    if same:
        out += [f"- {p} {SAME_KERNEL_NOTE}." for p in same] + [""]

    out += ["## auto's choice against the measured crossover", ""] + dispatch_markdown(dispatch_check(rows)) + [""]
    out += module_markdown(list(module_rows), gpu)

    out += ["## Results", "", "Times are medians; per step = median / T; × columns are speedups "
            "(same shape and mode; × nn.RNN is over the row's own torch module: nn.LSTM for the lstm_ rows, nn.GRU "
            "for the gru_ rows); floor = max(FLOPs / matmul peak, bytes / copy bandwidth, barrier × T), FLOPs and "
            "weights ×4 for the LSTM, ×3 for the GRU."
            + ("" if gpu else f" **{CPU_NOTE}**: one thread, no speedups; the times show the suite runs."), ""]
    for mode in MODES:
        mode_rows = [r for r in rows if r["mode"] == mode]
        if not mode_rows:
            continue
        out += [f"### {mode}", "",
                "| provider | dtype | T | B | H | D | status | ms | µs/step | TFLOP/s | × nn.RNN | × eager "
                "| peak MiB | floor µs | runs / reason |",
                "|---" * 15 + "|"]
        for r in mode_rows:
            detail = r.get("reason") or r.get("backend", "")
            out.append(f"| {r['provider']} | {r['dtype']} | {r['T']} | {r['B']} | {r['H']} | {r['D']} | {r['status']} "
                       f"| {_fmt(r.get('median_ms'))} | {_fmt(r.get('per_step_us'))} | {_fmt(r.get('tflops'))} "
                       f"| {_fmt(r.get('speedup_vs_torch_rnn'))} | {_fmt(r.get('speedup_vs_eager'))} "
                       f"| {_fmt(r.get('peak_train_mem_mib'))} | {_fmt(r.get('floor_us'))} | {detail} |")
        out += [""]
    return "\n".join(out)


def _barrier_text(machine):
    if machine["barrier_us"] is None:
        return machine["barrier_note"]
    groups = ", ".join(f"{n} programs {us:.3g} µs" for n, us in machine.get("barrier_us_by_programs", {}).items())
    return f"{machine['barrier_us']:.3g} µs ({machine['barrier_note']})" + (f"; {groups}" if groups else "")


def _preferred(values, preferred):
    values = sorted(set(values))
    return preferred if preferred in values else values[-1]


def write_plots(out_dir, rows):
    """speedup_by_hidden.png (geomean over B of the speedup over nn.RNN, per H) and
    step_latency_by_batch.png (per-step latency against B), one panel per mode, at the run's bf16
    (else largest-name) dtype and T=1024 (else the longest T). None where matplotlib (an extra) is not
    installed, as on a GPU image without network: the figures are all in results.json."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("status") == "ok"]
    paths = []
    dtype = _preferred([r["dtype"] for r in timed], "bf16") if timed else None
    T = _preferred([r["T"] for r in timed if r["dtype"] == dtype], 1024) if timed else None
    H_latency = _preferred([r["H"] for r in timed if r["dtype"] == dtype and r["T"] == T], 1024) if timed else None
    picked = [r for r in timed if r["dtype"] == dtype and r["T"] == T]

    def panels(name, title, x_key, y_of, select, ylabel):
        modes = [m for m in MODES if any(r["mode"] == m for r in rows)] or ["forward"]
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            series = defaultdict(lambda: defaultdict(list))
            for r in picked:
                if r["mode"] == mode and select(r) and y_of(r) is not None:
                    series[r["provider"]][r[x_key]].append(y_of(r))
            for provider, points in sorted(series.items()):
                xs = sorted(points)
                ax.plot(xs, [geomean(points[x]) for x in xs], marker="o", label=provider)
            if not series:
                ax.text(0.5, 0.5, "no timed rows", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.legend(fontsize=8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(x_key)
            ax.set_ylabel(ylabel)
            ax.set_title(mode)
            ax.grid(True, which="both", alpha=0.3)
        fig.suptitle(title)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    panels("speedup_by_hidden.png", f"speedup over nn.RNN, geomean over B ({dtype}, T={T})", "H",
           lambda r: r.get("speedup_vs_torch_rnn"), lambda r: True, "speedup (×)")
    panels("step_latency_by_batch.png", f"per-step latency ({dtype}, T={T}, H={H_latency})", "B",
           lambda r: r.get("per_step_us"), lambda r: r["H"] == H_latency, "µs per step")
    return paths
