"""The phases of one GPU session (benchmarks/gpu_session.sh), one process each so that each runs
under its own `timeout` and a stuck phase costs only itself.

    python -m benchmarks.gpu_phases PHASE --out DIR [--limit SECONDS] [--dry-run]

PHASE is one of environment, correctness, barrier, variants, standard, cudnn, summary. Each writes
DIR/PHASE.json as it goes (a phase cut short keeps what it measured); summary reads them all and
prints the closing table. --dry-run rehearses a phase on CPU at tiny sizes: every GPU-only call is
replaced by a row that says "skipped: no GPU", everything around it runs.
"""
import argparse
import contextlib
import json
import math
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SKIPPED = "skipped: no GPU"

# Correctness: the gpu-marked tests of the whole suite, then these CPU-suite files run on CUDA.
CORRECTNESS_SAMPLE = ["tests/test_ops.py", "tests/test_persistent.py", "tests/test_stepwise.py"]
DRY_CORRECTNESS = {"gpu": ["tests/test_persistent.py"],
                   "sample": ["tests/test_persistent.py::test_unsupported_size_fails_clearly",
                              "tests/test_persistent.py::test_small_kernel_at_256_needs_the_shared_memory"]}
PER_TEST_TIMEOUT_S = 120

BARRIER_PROGRAMS = (16, 32, 64, 96, 128, 132)  # the large-H kernel's group sizes and one per SM (H200)
BARRIER_SCHEMES = ("count", "flip")  # the v0.2 barrier (arrival count) and the v0.3 one (flip of the top bit)
BARRIER_ITERS = 10_000

# The variants only a GPU can decide (issue 9, item 8): the large-H kernel's column block and its
# warps / K split, bf16, T = 1024. {} is the launcher's own choice.
# Most telling first (the per-step latency target is at B=16, H=1024): a phase cut short loses the tail.
VARIANT_SHAPES = [(16, 1024), (16, 2048), (1, 1024), (1, 2048), (64, 1024), (64, 2048)]
VARIANTS = [{}, {"BN": 16}, {"BN": 32}, {"num_warps": 8}, {"num_warps": 16}, {"K_SPLIT": 4}]
VARIANT_T, VARIANT_CHECK_T = 1024, 64
VARIANT_MODES = ("forward", "fwd_bwd")

BENCH_PROVIDERS = ["torch_rnn", "eager", "stepwise", "stepwise_graph", "persistent", "auto"]
DRY_SHAPE = ["--dtype", "fp32", "--batch", "2", "--hidden", "16", "--seq", "8", "--rep-ms", "5"]
CUDNN_GRID = ["--dtype", "fp16", "--batch", "1", "8", "16", "64", "--hidden", "256", "512", "1024", "2048",
              "--seq", "1024"]


class PhaseLog:
    """A phase's JSON file, rewritten after every row so that a phase cut short keeps its rows."""

    def __init__(self, out, phase, **fields):
        self.path = Path(out) / f"{phase}.json"
        self.doc = {"phase": phase, "complete": False, **fields, "rows": []}
        self.save()

    def add(self, row):
        self.doc["rows"].append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def save(self, **fields):
        self.doc.update(fields)
        self.path.write_text(json.dumps(self.doc, indent=1, default=str) + "\n")

    def finish(self, **fields):
        self.save(complete=True, **fields)


def one_line(error):
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def gpu_device(dry_run):
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run (DRY_RUN=1) to rehearse on CPU")
    return torch.device("cuda")


# ---- environment ----------------------------------------------------------------------------------

def phase_environment(args):
    import triton
    device = gpu_device(args.dry_run)
    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
           "dry_run": args.dry_run, "device": "CPU (dry run)" if device.type != "cuda" else torch.cuda.get_device_name()}
    for module in ("numpy", "xdist", "pytest_timeout", "tqdm", "matplotlib"):
        try:
            env[module] = getattr(__import__(module), "__version__", "installed")
        except ImportError:
            env[module] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(sm=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2 ** 30, 1))
        env["triton_device_properties"] = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    env["nvidia_smi"] = _command(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"])
    env["commit"] = _command(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    log = PhaseLog(args.out, "environment", **env)
    log.finish()
    for key, value in env.items():
        print(f"{key}: {value}")


def _command(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({one_line(e)})"


# ---- correctness ----------------------------------------------------------------------------------

def pytest_options(out, name, dry_run):
    """Parallel with pytest-xdist and per-test timeouts with pytest-timeout where they are installed
    (a GPU image may lack them: then serial, and only the phase's own timeout bounds a hang). The
    dry run stays serial: its two tests would only pay for starting workers."""
    options = ["-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={Path(out) / f'junit-{name}.xml'}"]
    have = {"xdist": _importable("xdist") and not dry_run, "pytest_timeout": _importable("pytest_timeout")}
    if have["xdist"]:
        options += ["-n", "4"]  # most of the time is kernel compilation on the host's cores
    if have["pytest_timeout"]:
        options += [f"--timeout={PER_TEST_TIMEOUT_S}", "--timeout-method=thread"]
    return options, have


def _importable(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def junit_counts(path):
    """{passed, failed, errors, skipped} from a JUnit XML report, or None if pytest wrote none."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
            "failed_tests": failed[:50]}


def phase_correctness(args):
    """The gpu-marked tests, then a sample of the CPU suite on CUDA; each part gets its share of the
    phase's time so a slow first part cannot starve the second."""
    gpu_device(args.dry_run)
    parts = DRY_CORRECTNESS if args.dry_run else {"gpu": ["tests"], "sample": CORRECTNESS_SAMPLE}
    marks = {"gpu": "gpu", "sample": "not gpu and not sm90"}
    log = PhaseLog(args.out, "correctness")
    share = {"gpu": 0.55, "sample": 0.45}
    for name, targets in parts.items():
        options, have = pytest_options(args.out, name, args.dry_run)
        argv = [sys.executable, "-m", "pytest", *options, "-m", marks[name], *targets]
        start = time.monotonic()
        try:
            done = subprocess.run(argv, cwd=REPO, timeout=max(10, share[name] * args.limit - 5),
                                  capture_output=True, text=True)
            status, tail = f"exit {done.returncode}", (done.stdout + done.stderr)[-3000:]
        except subprocess.TimeoutExpired as e:
            status, tail = "timeout", ((e.stdout or b"").decode(errors="replace"))[-3000:]
        (Path(args.out) / f"pytest-{name}.log").write_text(tail)
        print(tail)
        log.add({"part": name, "command": " ".join(argv[1:]), "status": status, "xdist": have["xdist"],
                 "pytest_timeout": have["pytest_timeout"], "seconds": round(time.monotonic() - start, 1),
                 "counts": junit_counts(Path(args.out) / f"junit-{name}.xml")})
    log.finish()


# ---- barrier --------------------------------------------------------------------------------------

def phase_barrier(args):
    """µs per grid barrier, old (count) and new (flip) scheme, at 16..132 programs."""
    from elman_triton import persistent
    device = gpu_device(args.dry_run)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    log = PhaseLog(args.out, "barrier", iters=BARRIER_ITERS, sms=sms)
    for scheme in BARRIER_SCHEMES:
        for n in [n for n in BARRIER_PROGRAMS if n <= sms]:
            row = {"scheme": scheme, "programs": n}
            if args.dry_run:
                row["status"] = SKIPPED
            else:
                try:
                    row["us"] = persistent.barrier_latency_us(device, n_programs=n, iters=BARRIER_ITERS, scheme=scheme)
                    row["status"] = "ok"
                except Exception as e:
                    row["status"] = f"error: {one_line(e)}"
            log.add(row)
    log.finish()


# ---- variants -------------------------------------------------------------------------------------

def phase_variants(args):
    """The large-H kernel under each variant of persistent.large_config, checked at T=64 against
    float64, then timed forward and fwd+bwd at T=1024, B ∈ {1, 16, 64}, H ∈ {1024, 2048}, bf16."""
    from benchmarks.measure import make_timer
    from benchmarks.providers import PROVIDERS, Shape, make_problem
    from benchmarks.sweep import TOLERANCE, float64_reference, time_mode, verify
    from elman_triton import persistent
    device = gpu_device(args.dry_run)
    shapes = [(2, 16)] if args.dry_run else VARIANT_SHAPES
    T, check_T = (8, 4) if args.dry_run else (VARIANT_T, VARIANT_CHECK_T)
    log = PhaseLog(args.out, "variants", T=T, check_T=check_T, dtype="bf16",
                   large_config=hasattr(persistent, "large_config"))
    provider, timer = PROVIDERS["persistent"], make_timer(device, 50.0)
    generator = torch.Generator(device=device).manual_seed(0)
    for B, H in shapes:
        shape = Shape("bf16", T, B, H, H)
        check = make_problem(shape, check_T, device, generator, "tanh", with_dy=True)
        reference = float64_reference(check, with_grad=True)
        problems = [make_problem(shape, T, device, generator, "tanh", with_dy=True)]
        for variant in VARIANTS:
            row = {"B": B, "H": H, "variant": variant_name(variant)}
            if args.dry_run:
                log.add({**row, "status": SKIPPED})
                continue
            try:
                with persistent.large_config(**variant):
                    verdict = verify(provider, check, reference, training=True, tol=TOLERANCE["bf16"])
                    row.update({k: v for k, v in verdict.items() if k.startswith("err")})
                    if not verdict["passed"]:
                        row["status"] = f"failed: {verdict['reason']}"
                    else:
                        for mode in VARIANT_MODES:
                            row[f"{mode}_us_per_step"] = time_mode(provider, problems, mode, timer).median_ms * 1e3 / T
                        row["status"] = "ok"
            except Exception as e:
                row["status"] = f"error: {one_line(e)}"
            log.add(row)
        del check, reference, problems
    log.finish()


def variant_name(variant):
    return ", ".join(f"{k}={v}" for k, v in variant.items()) or "default"


# ---- standard grid and the cuDNN anchor ------------------------------------------------------------

def run_benchmarks(args, name, grid, providers, modes=None):
    """python -m benchmarks into DIR/name, within the phase's time; returns its JSON row."""
    argv = [sys.executable, "-m", "benchmarks", *grid, "--out", str(Path(args.out) / name),
            "--providers", *providers] + (["--modes", *modes] if modes else [])
    start = time.monotonic()
    try:
        done = subprocess.run(argv, cwd=REPO, timeout=max(10, args.limit - 10), capture_output=True, text=True)
        status, text = f"exit {done.returncode}", done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        status, text = "timeout", (e.stdout or b"").decode(errors="replace")
    (Path(args.out) / f"{name}.log").write_text(text)
    print(text[-4000:])
    return {"command": " ".join(argv[1:]), "status": status, "seconds": round(time.monotonic() - start, 1)}


def phase_standard(args):
    """The --standard target grid, every provider but torch.compile (which recompiles per shape)."""
    gpu_device(args.dry_run)
    grid = ["--quick", *DRY_SHAPE] if args.dry_run else ["--standard"]
    log = PhaseLog(args.out, "standard")
    log.add(run_benchmarks(args, "standard", grid, BENCH_PROVIDERS))
    log.finish()


def phase_cudnn(args):
    """cuDNN at its own best, nn.RNN in fp16 on the target grid (its PERSIST_STATIC path where
    eligible), and which backend nn.RNN really runs in bf16 and fp16."""
    device = gpu_device(args.dry_run)
    log = PhaseLog(args.out, "cudnn")
    for dtype in (torch.bfloat16, torch.float16):
        log.add(nn_rnn_backend(device, dtype))
    grid = ["--quick", *DRY_SHAPE] if args.dry_run else CUDNN_GRID
    log.add(run_benchmarks(args, "cudnn-fp16", [*grid, "--no-module-rows"], ["torch_rnn"],
                           modes=["forward", "fwd_bwd"]))
    log.finish()


def nn_rnn_backend(device, dtype, T=64, B=16, H=1024):
    """What nn.RNN ran: torch's own cuDNN test on the input, and the kernels a profiler saw in one
    forward+backward. cuDNN's RNN kernels carry 'RNN', 'rnn' or 'cudnn' in their names (persistent
    ones 'persist'); ATen's per-step loop shows only GEMMs and elementwise tanh kernels."""
    name = str(dtype).replace("torch.", "")
    if device.type != "cuda":  # the dry run: the same code on CPU's native kernel
        dtype, H, name = torch.float32, 16, f"{name} (float32 in the dry run)"
    rnn = torch.nn.RNN(H, H, device=device, dtype=dtype)
    x = torch.randn(T, B, H, device=device, dtype=dtype, requires_grad=True)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as profile:
        y, _ = rnn(x)
        y.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    device_kernels = sorted({e.key for e in profile.key_averages()
                             if device.type == "cuda" and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA})
    names = device_kernels or sorted({e.key for e in profile.key_averages() if "rnn" in e.key.lower()})
    cudnn_named = [n for n in names if re.search(r"rnn|cudnn|persist", n, re.IGNORECASE) and "aten::" not in n]
    row = {"dtype": name, "T": T, "B": B, "H": H,
           "cudnn_is_acceptable": bool(torch.backends.cudnn.is_acceptable(x)),
           "cudnn_flatten_weight": bool(torch._use_cudnn_rnn_flatten_weight()),
           "kernels": names[:40]}
    if device.type != "cuda":
        row["backend"] = f"{SKIPPED} (CPU native kernel seen: {', '.join(names) or 'none'})"
    else:
        row["backend"] = "cuDNN" if cudnn_named else "ATen per-step loop"
        row["persist_kernel"] = any("persist" in n.lower() for n in cudnn_named)
    return row


# ---- summary --------------------------------------------------------------------------------------

def phase_summary(args):
    out = Path(args.out)
    docs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem != "summary"}
    lines = summary_lines(out, docs)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def summary_lines(out, docs):
    env = docs.get("environment", {})
    lines = [f"# GPU session: {env.get('device', '?')}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
             f"commit {env.get('commit')}" + (" — DRY RUN on CPU: nothing below is a GPU figure" if env.get("dry_run") else ""),
             "", "| phase | exit | seconds | result |", "|---|---|---|---|"]
    for phase, code, seconds in _phase_table(out):
        lines.append(f"| {phase} | {code} | {seconds} | {_phase_result(phase, docs.get(phase))} |")
    lines += ["", "Targets (standard grid, `auto` against nn.RNN and the eager loop):", ""]
    targets = _targets(out / "standard" / "results.json")
    lines += [f"- [{t['result']}] {t['target']}: {t['measured']} (target {t['threshold']})" for t in targets] or \
        ["- none: the standard phase wrote no results.json"]
    lines += ["", "Variant winners (fastest verified variant per shape and mode):", ""]
    lines += variant_winners(docs.get("variants", {}).get("rows", [])) or ["- none measured"]
    lines += ["", "Barrier (µs per barrier):", ""] + barrier_table(docs.get("barrier", {}).get("rows", []))
    lines += ["", "nn.RNN's backend:", ""]
    lines += [f"- {r['dtype']}: {r['backend']} (cudnn.is_acceptable={r['cudnn_is_acceptable']})"
              for r in docs.get("cudnn", {}).get("rows", []) if "backend" in r] or ["- not recorded"]
    return lines


def _phase_table(out):
    path = out / "phases.tsv"
    if not path.exists():
        return []
    return [tuple(line.split("\t")) for line in path.read_text().splitlines() if line.count("\t") == 2]


def _phase_result(phase, doc):
    if doc is None:
        return "no output"
    incomplete = "" if doc.get("complete") else " (cut short)"
    rows = doc.get("rows", [])
    if phase == "environment":
        return f"{doc.get('device')}: torch {doc.get('torch')}, triton {doc.get('triton')}, numpy {doc.get('numpy')}, " \
               f"xdist {doc.get('xdist')}, pytest-timeout {doc.get('pytest_timeout')}"
    if phase == "correctness":
        parts = []
        for r in rows:
            c = r.get("counts") or {}
            parts.append(f"{r['part']}: {c.get('passed', '?')} passed, {c.get('failed', '?')} failed, "
                         f"{c.get('errors', '?')} errors, {c.get('skipped', '?')} skipped ({r['status']})")
        return "; ".join(parts) + incomplete
    if phase in ("standard", "cudnn"):
        runs = [r for r in rows if "command" in r]
        return ", ".join(r["status"] for r in runs) + incomplete
    statuses = [str(r.get("status", "")).split(":")[0] for r in rows]
    counts = {s: statuses.count(s) for s in dict.fromkeys(statuses)}
    return ", ".join(f"{n} {s}" for s, n in counts.items()) + incomplete


def _targets(path):
    try:
        return json.loads(path.read_text()).get("targets", [])
    except (OSError, ValueError):
        return []


def variant_winners(rows):
    lines = []
    for B, H in dict.fromkeys((r["B"], r["H"]) for r in rows):
        for mode in VARIANT_MODES:
            key = f"{mode}_us_per_step"
            timed = [r for r in rows if (r["B"], r["H"]) == (B, H) and r.get("status") == "ok" and key in r]
            if not timed:
                continue
            best = min(timed, key=lambda r: r[key])
            default = next((r[key] for r in timed if r["variant"] == "default"), math.nan)
            lines.append(f"- B={B}, H={H}, {mode}: {best['variant']} {best[key]:.3g} µs/step "
                         f"(default {default:.3g})")
    return lines


def barrier_table(rows):
    programs = list(dict.fromkeys(r["programs"] for r in rows))
    if not programs:
        return ["- not measured"]
    lines = ["| scheme | " + " | ".join(str(n) for n in programs) + " |", "|---" * (len(programs) + 1) + "|"]
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        cells = {r["programs"]: (f"{r['us']:.3g}" if "us" in r else r["status"].split(":")[0])
                 for r in rows if r["scheme"] == scheme}
        lines.append(f"| {scheme} | " + " | ".join(cells.get(n, "") for n in programs) + " |")
    return lines


PHASES = {"environment": phase_environment, "correctness": phase_correctness, "barrier": phase_barrier,
          "variants": phase_variants, "standard": phase_standard, "cudnn": phase_cudnn, "summary": phase_summary}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_phases", description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=list(PHASES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=float, default=300.0, help="the phase's time limit in seconds")
    parser.add_argument("--dry-run", action="store_true", help="rehearse on CPU at tiny sizes")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(BrokenPipeError):
        PHASES[args.phase](args)


if __name__ == "__main__":
    main()
