"""python -m benchmarks: argument parsing, the run, the output files and the exit status."""
import argparse
import datetime
import re
import sys
from pathlib import Path

import torch

from benchmarks.measure import environment, machine_figures, make_timer
from benchmarks.module_rows import module_lines, module_rows, module_shape
from benchmarks.providers import DTYPES, MODES, PROVIDERS
from benchmarks.report import (NO_GPU_NOTE, SAME_KERNEL_NOTE, add_derived, evaluate_targets, provider_geomeans,
                               same_kernel_providers, summary_markdown, targets_not_evaluated, write_csv, write_json,
                               write_plots)
from benchmarks.sweep import Config, grid, run_sweep

RESULTS = Path(__file__).resolve().parent / "results"

# quick differs per device: on CPU it is a smoke test that must finish in well under two minutes.
PRESETS = {
    "quick": {"cpu": dict(dtype=["fp32"], batch=[1, 8], hidden=[32, 64], seq=[32]),
              "cuda": dict(dtype=["bf16"], batch=[1, 16], hidden=[256, 1024], seq=[256])},
    "standard": dict(dtype=["bf16"], batch=[1, 8, 16, 64], hidden=[256, 512, 1024, 2048], seq=[1024]),
    "full": dict(dtype=list(DTYPES), batch=[1, 8, 16, 64, 256], hidden=[256, 512, 1024, 2048],
                 seq=[256, 1024, 4096]),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark the Elman RNN providers (nn.RNN/cuDNN, eager loop, torch.compile, the Triton "
                    "backends) in forward, backward and fwd+bwd; check each against float64 first. Writes "
                    "results.json, results.csv, summary.md and PNG plots.",
        epilog="Presets: --quick (default; CPU: fp32 T=32 B∈{1,8} H∈{32,64}; GPU: bf16 T=256 B∈{1,16} "
               "H∈{256,1024}), --standard (bf16 T=1024 B∈{1,8,16,64} H∈{256..2048}: the target grid), "
               "--full (all dtypes, B∈{1,8,16,64,256}, H∈{256..2048}, T∈{256,1024,4096}). "
               "Any flag below overrides the preset's value. Exit status 1 if one of this project's "
               "providers fails verification.")
    preset = parser.add_mutually_exclusive_group()
    for name, text in (("quick", "smoke-test sizes (the default)"), ("standard", "the target grid"),
                       ("full", "every dtype, batch, hidden size and length")):
        preset.add_argument(f"--{name}", dest="preset", action="store_const", const=name, help=text)
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES))
    parser.add_argument("--batch", nargs="+", type=int, metavar="B")
    parser.add_argument("--hidden", nargs="+", type=int, metavar="H")
    parser.add_argument("--seq", nargs="+", type=int, metavar="T")
    parser.add_argument("--input-size", nargs="+", type=int, metavar="D", help="input sizes D (default: D = H)")
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--nonlinearity", choices=["tanh", "relu"], default="tanh")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<date>-<device>)")
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
    return args


def sweep_shapes(args, device):
    preset = PRESETS[args.preset]
    if "cuda" in preset:  # a per-device preset
        preset = preset[device.type]
    pick = {key: getattr(args, key) or preset[key] for key in ("dtype", "batch", "hidden", "seq")}
    return grid(pick["dtype"], pick["batch"], pick["hidden"], pick["seq"], args.input_size)


def default_out(metadata):
    slug = re.sub(r"[^a-z0-9]+", "-", metadata["device"].lower()).strip("-")
    return RESULTS / f"{datetime.date.today().isoformat()}-{slug}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    shapes = sweep_shapes(args, device)
    providers = [PROVIDERS[name] for name in args.providers]
    config = Config(shapes=shapes, providers=providers, modes=tuple(args.modes), device=device,
                    check_seq=args.check_seq, rep_ms=args.rep_ms, verify_only=args.verify_only,
                    nonlinearity=args.nonlinearity, seed=args.seed)
    metadata = environment(device)
    metadata["command"] = " ".join(["python -m benchmarks", *argv])
    metadata["preset"] = args.preset
    out = args.out or default_out(metadata)
    out.mkdir(parents=True, exist_ok=True)

    print(f"{metadata['device']} | torch {metadata['torch']} | triton {metadata['triton']} | "
          f"CUDA {metadata['cuda']} | commit {metadata['git_commit'][:12]}")
    if device.type != "cuda":
        print(NO_GPU_NOTE)
    print(f"{len(shapes)} shapes × {len(providers)} providers × {len(config.modes)} modes ({args.preset} preset)")

    dtypes = {name: DTYPES[name] for name in sorted({s.dtype for s in shapes})}
    machine = machine_figures(device, dtypes, make_timer(device, args.rep_ms))

    def save(rows, targets=(), modules=()):
        add_derived(rows, machine)
        write_json(out / "results.json", metadata, machine, list(targets), rows, modules)
        write_csv(out / "results.csv", rows)

    metadata["complete"] = False  # until the last shape is done: a run cut short says so
    rows = run_sweep(config, metadata, checkpoint=save)
    add_derived(rows, machine)
    targets = (evaluate_targets(rows) if device.type == "cuda"
               else targets_not_evaluated("needs a GPU: this run is CPU-only"))
    save(rows, targets)
    modules = []
    if args.module_rows:
        modules = module_rows(module_shape(shapes), device, make_timer(device, args.rep_ms), seed=args.seed)
    metadata["complete"] = True
    save(rows, targets, modules)
    (out / "summary.md").write_text(summary_markdown(metadata, machine, targets, rows, modules) + "\n")
    plots = write_plots(out, rows)
    return report_to_stdout(rows, targets, providers, out, plots, device, modules)


def report_to_stdout(rows, targets, providers, out, plots, device, modules=()):
    """Print the headline figures and the verification outcome; return the exit status."""
    for mode, by_provider in provider_geomeans(rows).items():
        figures = ", ".join(f"{p} {v:.3g}×" for p, v in sorted(by_provider.items()))
        print(f"speedup over nn.RNN, geomean, {mode}: {figures}")
    for name in same_kernel_providers(rows):
        print(f"{name}: {SAME_KERNEL_NOTE}")
    if device.type == "cuda":
        for t in targets:
            print(f"[{t['result']}] {t['target']}: {t['measured']} (target {t['threshold']}) {t['detail']}")
    else:
        print(NO_GPU_NOTE)
    ours = {p.name for p in providers if p.ours}
    failed = [r for r in rows if r["status"] == "failed"]
    for r in failed + [r for r in rows if r["status"] == "error"]:
        print(f"{r['status'].upper()}: {r['provider']} {r['mode']} {r['dtype']} T={r['T']} B={r['B']} "
              f"H={r['H']} D={r['D']}: {r['reason']}")
    checked = sum(r["status"] in ("ok", "verified", "failed", "error") for r in rows)
    print(f"verification: {checked - len(failed)}/{checked} rows passed")
    failed_modules = [r for r in modules if r["status"] == "failed"]
    for line in module_lines(modules, device.type == "cuda"):
        print(line)
    for r in failed_modules + [r for r in modules if r["status"] == "error"]:
        print(f"{r['status'].upper()}: module {r['case']} {r['provider']} {r['mode']}: {r['reason']}")
    print(f"wrote {out}/results.json, results.csv, summary.md, "
          + (", ".join(p.name for p in plots) if plots is not None else "no plots (matplotlib is not installed)"))
    gating = [r for r in failed + failed_modules if r["provider"] in ours]
    if gating:
        print(f"FAILED: {len(gating)} rows of this project's providers failed verification", file=sys.stderr)
        return 1
    return 0
