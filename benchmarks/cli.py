"""python -m benchmarks: argument parsing, the run, the output files and the exit status.

The run: the Elman sweep, the module rows, then the LSTM / GRU family (--family picks the cells; the
Elman part runs first and unchanged, so a run cut short keeps it). Without a GPU the run is a check,
not a measurement: its timings run on one thread and carry no speedups or plots, and the Triton
kernels are verified in Triton's interpreter instead of timed."""
import argparse
import dataclasses
import datetime
import re
import sys
from pathlib import Path

import torch

from . import interpret_without_gpu

interpret_without_gpu()  # before the imports below define elman_triton's kernels; nothing changes with a GPU

from .measure import CPU_NOTE, environment, machine_figures, make_timer  # noqa: E402
from .module_rows import interpreter_module_checks, module_lines, module_rows, module_shape  # noqa: E402
from .providers import (CELLS, DTYPES, FAMILY_INTERPRETER_PROVIDERS, FAMILY_PROVIDERS, MODES,  # noqa: E402
                        PROVIDERS, shape_text)
from .report import (ANCHOR, NO_GPU_NOTE, SAME_KERNEL_NOTE, SPEEDUP_TEXT, add_derived, evaluate_targets,  # noqa: E402
                     interpreter_summary, provider_geomeans, same_kernel_providers, summary_markdown, targets_for,
                     targets_not_evaluated, write_csv, write_json, write_plots)
from .sweep import FAMILY_INTERPRETER_SHAPES, Config, Shape, grid, interpreter_checks, run_sweep  # noqa: E402

HERE = Path(__file__).resolve().parent
# In a checkout (python -m benchmarks, or an editable install) results go beside the suite; an installed
# copy writes under the current folder instead of into site-packages.
RESULTS = HERE / "results" if (HERE.parent / "pyproject.toml").exists() else Path("elman-bench-results")

# quick differs per device: on CPU it is a smoke test that must finish in under a minute on 2 cores.
PRESETS = {
    "quick": {"cpu": dict(dtype=["fp32"], batch=[1, 8], hidden=[32, 64], seq=[32]),
              "cuda": dict(dtype=["bf16"], batch=[1, 16], hidden=[256, 1024], seq=[256])},
    "standard": dict(dtype=["bf16"], batch=[1, 8, 16, 64], hidden=[256, 512, 1024, 2048], seq=[1024]),
    "full": dict(dtype=list(DTYPES), batch=[1, 8, 16, 64, 256], hidden=[256, 512, 1024, 2048],
                 seq=[256, 1024, 4096]),
}
FAMILY_MODES = ("forward", "fwd_bwd")  # the LSTM / GRU rows' modes (of --modes)


def cell_list(text):
    """--family's value: cells separated by commas (or given as several words)."""
    cells = [c.strip().lower() for c in text.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown or not cells:
        raise argparse.ArgumentTypeError(f"unknown cell {', '.join(unknown) or repr(text)}; "
                                         f"choose from {','.join(CELLS)}")
    return cells


def parse_args(argv, prog="python -m benchmarks"):
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark the Elman RNN providers (nn.RNN/cuDNN, eager loop, torch.compile, the Triton "
                    "backends) in forward, backward and fwd+bwd, then the LSTM and GRU (nn.LSTM / nn.GRU, cuDNN on a "
                    "GPU, against elman_triton.family's drop-ins, backend auto) in forward and fwd+bwd on the same "
                    "shapes, plus on a GPU the anchor LSTM H=768, B=16, T=1024 (bf16); check each against float64 "
                    "first. Writes "
                    "results.json, results.csv, summary.md and (on a GPU) PNG plots. Without a GPU it checks the "
                    "Triton kernels in Triton's interpreter instead of timing them, and times the rest on one "
                    "thread, as a smoke test (CPU: not a performance result).",
        epilog="Presets: --quick (default; CPU: fp32 T=32 B∈{1,8} H∈{32,64}; GPU: bf16 T=256 B∈{1,16} "
               "H∈{256,1024}), --standard (bf16 T=1024 B∈{1,8,16,64} H∈{256..2048}: the target grid), "
               "--full (all dtypes, B∈{1,8,16,64,256}, H∈{256..2048}, T∈{256,1024,4096}). "
               "Any flag below overrides the preset's value; the LSTM / GRU rows (--family) take the same shapes. "
               "Exit status 1 if one of this project's providers fails verification.")
    preset = parser.add_mutually_exclusive_group()
    for name, text in (("quick", "smoke-test sizes (the default; about half a minute on a 2-core CPU)"),
                       ("standard", "the target grid"), ("full", "every dtype, batch, hidden size and length")):
        preset.add_argument(f"--{name}", dest="preset", action="store_const", const=name, help=text)
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES))
    parser.add_argument("--batch", nargs="+", type=int, metavar="B")
    parser.add_argument("--hidden", nargs="+", type=int, metavar="H")
    parser.add_argument("--seq", nargs="+", type=int, metavar="T")
    parser.add_argument("--input-size", nargs="+", type=int, metavar="D", help="input sizes D (default: D = H)")
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS),
                        help="the Elman providers (the LSTM / GRU rows always compare nn's module with ours, auto)")
    parser.add_argument("--family", nargs="+", type=cell_list, default=[list(CELLS)], metavar="CELLS",
                        help="cells to run, e.g. elman,lstm,gru (the default) or lstm,gru: elman is the Elman sweep "
                             "and module rows; lstm and gru run after it on the same shapes (on CPU only at the "
                             "largest, a smoke test), forward and fwd+bwd, and on a GPU with bf16 the LSTM anchor "
                             f"H={ANCHOR['H']}, B={ANCHOR['B']}, T={ANCHOR['T']} first")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--nonlinearity", choices=["tanh", "relu"], default="tanh")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<date>-<device> in a "
                                                 "checkout, else elman-bench-results/<date>-<device>)")
    parser.add_argument("--check-seq", type=int, default=1024, metavar="T",
                        help="longest T of the float64 check; longer shapes are checked at this T (default 1024)")
    parser.add_argument("--rep-ms", type=float, default=100.0,
                        help="timing budget per measurement in ms (do_bench rep on GPU; default 100)")
    parser.add_argument("--verify-only", action="store_true", help="check every provider, time nothing")
    parser.add_argument("--no-tf32", action="store_true",
                        help="turn TF32 off for cuDNN and matmuls (torch's default: cuDNN on, matmul off)")
    parser.add_argument("--no-module-rows", dest="module_rows", action="store_false",
                        help="skip the module-level rows (ElmanRNN against nn.RNN: 2 layers bidirectional "
                             "batch_first, packed mixed lengths, packed ÷ padded), run at the sweep's largest shape")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.preset = args.preset or "quick"
    args.family = list(dict.fromkeys(cell for cells in args.family for cell in cells))
    return args


def sweep_shapes(args, device):
    preset = PRESETS[args.preset]
    if "cuda" in preset:  # a per-device preset
        preset = preset[device.type]
    pick = {key: getattr(args, key) or preset[key] for key in ("dtype", "batch", "hidden", "seq")}
    return grid(pick["dtype"], pick["batch"], pick["hidden"], pick["seq"], args.input_size)


def family_shapes(args, device, shapes):
    """{cell: shapes} of the LSTM / GRU rows: the Elman sweep's shapes with the cell, on CPU only its
    largest (the rows show the paths run; CPU: not a performance result); on a GPU the LSTM starts with
    the anchor shape when the run has bf16 (so a run cut short has its target)."""
    if device.type != "cuda":
        shapes = [max(shapes, key=lambda s: (s.T, s.B, s.H, s.D))]
    by_cell = {}
    for cell in args.family:
        if cell == "elman":
            continue
        cell_shapes = [dataclasses.replace(s, cell=cell) for s in shapes]
        if cell == ANCHOR["cell"] and device.type == "cuda" and any(s.dtype == "bf16" for s in shapes):
            cell_shapes.insert(0, Shape("bf16", ANCHOR["T"], ANCHOR["B"], ANCHOR["H"], ANCHOR["H"], cell))
        by_cell[cell] = list(dict.fromkeys(cell_shapes))
    return by_cell


def default_out(metadata):
    slug = re.sub(r"[^a-z0-9]+", "-", metadata["device"].lower()).strip("-")
    return RESULTS / f"{datetime.date.today().isoformat()}-{slug}"


def main(argv=None, prog="python -m benchmarks"):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # Several threads on small CPU shapes mostly wait for each other (and for other jobs): 3-4× slower
        # on 2 shared cores, with times that say nothing. One thread; restored at the end for a caller.
        torch.set_num_threads(1)
    try:
        return _run(args, argv, prog, device)
    finally:
        torch.set_num_threads(threads)


def _run(args, argv, prog, device):
    gpu = device.type == "cuda"
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    elman = "elman" in args.family
    grid_shapes = sweep_shapes(args, device)
    shapes = grid_shapes if elman else []
    providers = [PROVIDERS[name] for name in args.providers] if elman else []
    config = Config(shapes=shapes, providers=providers, modes=tuple(args.modes), device=device,
                    check_seq=args.check_seq, rep_ms=args.rep_ms, verify_only=args.verify_only,
                    nonlinearity=args.nonlinearity, seed=args.seed)
    family_modes = tuple(m for m in args.modes if m in FAMILY_MODES)
    family = {cell: Config(shapes=cell_shapes, providers=list(FAMILY_PROVIDERS[cell]), modes=family_modes,
                           device=device, check_seq=args.check_seq, rep_ms=args.rep_ms, verify_only=args.verify_only,
                           seed=args.seed)
              for cell, cell_shapes in family_shapes(args, device, grid_shapes).items() if family_modes}
    targets_run = targets_for(args.family)
    metadata = environment(device)
    metadata["command"] = " ".join([prog, *argv])
    metadata["preset"] = args.preset
    metadata["cells"] = args.family
    out = args.out or default_out(metadata)
    out.mkdir(parents=True, exist_ok=True)

    print(f"{metadata['device']} | torch {metadata['torch']} | triton {metadata['triton']} | "
          f"CUDA {metadata['cuda']} | commit {metadata['git_commit'][:12]}")
    if not gpu:
        print(NO_GPU_NOTE)
    if elman:
        print(f"{len(shapes)} shapes × {len(providers)} providers × {len(config.modes)} modes ({args.preset} preset)"
              + ("" if gpu else "; CPU timings on one thread (torch.set_num_threads(1))"))
    for cell, c in family.items():
        names = ", ".join(p.name for p in c.providers)
        print(f"{cell.upper()}: {len(c.shapes)} shapes × {len(c.providers)} providers ({names}) × {len(c.modes)} modes"
              + ("" if gpu else " (CPU: the sweep's largest shape only)"))
    if {"lstm", "gru"} & set(args.family) and not family_modes:
        print(f"LSTM / GRU: no rows (they run in {' and '.join(FAMILY_MODES)}, none of --modes)")

    interpreted = []
    if not gpu:
        if elman:
            interpreted = (interpreter_checks(providers, args.nonlinearity, args.seed)
                           + interpreter_module_checks(providers, args.nonlinearity, args.seed))
        for cell in family:
            interpreted += interpreter_checks(FAMILY_INTERPRETER_PROVIDERS[cell], seed=args.seed,
                                              shapes=FAMILY_INTERPRETER_SHAPES[cell])
    all_shapes = shapes + [s for c in family.values() for s in c.shapes]
    dtypes = {name: DTYPES[name] for name in sorted({s.dtype for s in all_shapes})}
    machine = machine_figures(device, dtypes, make_timer(device, args.rep_ms))

    def save(rows, targets=(), modules=()):
        add_derived(rows, machine, speedups=gpu)
        write_json(out / "results.json", metadata, machine, list(targets), rows, modules, interpreted)
        write_csv(out / "results.csv", rows)

    def judge(rows):
        return (evaluate_targets(rows, targets_run) if gpu
                else targets_not_evaluated("needs a GPU: this run is CPU-only", targets_run))

    metadata["complete"] = False  # until the last shape is done: a run cut short says so
    rows = run_sweep(config, metadata, checkpoint=save)
    add_derived(rows, machine, speedups=gpu)
    targets = judge(rows)
    save(rows, targets)
    modules = []
    if args.module_rows and elman:
        modules = module_rows(module_shape(shapes), device, make_timer(device, args.rep_ms), seed=args.seed)
        save(rows, targets, modules)
    # The LSTM / GRU after everything of the Elman run: a run cut short (the GPU session's limits) keeps it.
    for cell_config in family.values():
        done = list(rows)
        rows = done + run_sweep(cell_config, metadata, checkpoint=lambda new: save(done + new, targets, modules))
    add_derived(rows, machine, speedups=gpu)
    targets = judge(rows)
    metadata["complete"] = True
    save(rows, targets, modules)
    (out / "summary.md").write_text(summary_markdown(metadata, machine, targets, rows, modules, interpreted) + "\n")
    # CPU times are no performance result: no plots of them, which would read as one
    plots = write_plots(out, rows) if gpu else []
    ours = providers + [p for c in family.values() for p in c.providers] + \
        [p for cell in family for p in FAMILY_INTERPRETER_PROVIDERS[cell]]
    return report_to_stdout(rows, targets, ours, out, plots, device, modules, interpreted)


def report_to_stdout(rows, targets, providers, out, plots, device, modules=(), interpreted=()):
    """Print the headline figures and the verification outcome; return the exit status."""
    gpu = device.type == "cuda"
    for mode, by_provider in provider_geomeans(rows).items():
        figures = ", ".join(f"{p} {v:.3g}×" for p, v in sorted(by_provider.items()))
        print(f"{SPEEDUP_TEXT}, geomean, {mode}: {figures}")
    for name in same_kernel_providers(rows):
        print(f"{name}: {SAME_KERNEL_NOTE}")
    if gpu:
        for t in targets:
            print(f"[{t['result']}] {t['target']}: {t['measured']} (target {t['threshold']}) {t['detail']}")
    else:
        print(f"no speedups, targets or plots: {CPU_NOTE} (one thread; the times in summary.md only show the "
              "suite runs)")
    ours = {p.name for p in providers if p.ours}
    failed = [r for r in rows if r["status"] == "failed"]
    for r in failed + [r for r in rows if r["status"] == "error"]:
        print(f"{r['status'].upper()}: {r['provider']} {r['mode']} {shape_text(r)}: {r['reason']}")
    checked = sum(r["status"] in ("ok", "verified", "failed", "error") for r in rows)
    ran = ", ".join(dict.fromkeys(r["provider"] for r in rows if r["status"] in ("ok", "verified", "failed", "error")))
    print(f"verification: {checked - len(failed)}/{checked} rows passed" + (f" ({ran})" if ran and not gpu else ""))
    failed_interpreted = [r for r in interpreted if r["status"] == "failed"]
    if interpreted:
        summary = interpreter_summary(interpreted)
        print("verification of the Triton kernels in Triton's interpreter (correctness, not timed): "
              + (summary or "none ran"))
    for r in interpreted:
        if r["status"] not in ("passed", "needs_gpu"):
            print(f"{r['status'].upper()}: interpreter {r['check']} {r['provider']} ({r['kernel']}) {r['mode']} "
                  f"{r['dtype']} T={r['T']} B={r['B']} H={r['H']} D={r['D']}: {r['reason']}")
    failed_modules = [r for r in modules if r["status"] == "failed"]
    for line in module_lines(modules, gpu):
        print(line)
    for r in failed_modules + [r for r in modules if r["status"] == "error"]:
        print(f"{r['status'].upper()}: module {r['case']} {r['provider']} {r['mode']}: {r['reason']}")
    if plots is None:
        drawn = "no plots (matplotlib is not installed)"
    else:
        drawn = ", ".join(p.name for p in plots) if plots else f"no plots ({CPU_NOTE})"
    print(f"wrote {out}/results.json, results.csv, summary.md, {drawn}")
    gating = [r for r in failed + failed_modules + failed_interpreted if r["provider"] in ours]
    if gating:
        print(f"FAILED: {len(gating)} rows of this project's providers failed verification", file=sys.stderr)
        return 1
    return 0
