"""The phases of one GPU session (benchmarks/gpu_session.sh), one process each so that each runs
under its own `timeout` and a stuck phase costs only itself.

    python -m benchmarks.gpu_phases PHASE --out DIR [--limit SECONDS] [--dry-run]

PHASE is one of environment, correctness, barrier, variants, standard, cudnn, family, summary. Each
writes DIR/PHASE.json as it goes (a phase cut short keeps what it measured) and ends with
persistent.check_errors(wait=True), so a barrier timeout of its last large-H call is reported too;
summary reads them all and prints the closing table. --dry-run rehearses a phase on CPU at tiny
sizes: every GPU-only call is replaced by a row that says "skipped: no GPU", everything around it runs.

The phases that run a child (pytest, python -m benchmarks) start it in a process group of its own and
stop it at the phase's limit with SIGINT first, so that pytest still writes its JUnit report and the
benchmark keeps its last checkpoint, then kill the group: no pytest-xdist worker outlives its phase.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

# torch is imported inside the phases that use it: the summary needs none and so stays within its
# few seconds even on a loaded machine.
REPO = Path(__file__).resolve().parents[1]
SKIPPED = "skipped: no GPU"

# Correctness: the gpu-marked tests of the whole suite, then a sample of the CPU suite run on CUDA.
# The persistent kernels, the barrier and CUDA-graph capture (test_persistent, test_barrier) come
# first in both: only a GPU can check them, and a part cut at its limit loses its tail.
CORRECTNESS_FIRST = ["tests/test_persistent.py", "tests/test_barrier.py"]
CORRECTNESS_SAMPLE = [*CORRECTNESS_FIRST, "tests/test_stepwise.py", "tests/test_ops.py"]
CORRECTNESS_MARKS = {"gpu": "gpu", "sample": "not gpu and not sm90"}
CORRECTNESS_GPU_SHARE = 0.55  # of the phase's time; the sample gets the rest, whatever the gpu part left
DRY_CORRECTNESS = {"gpu": ["tests/test_persistent.py"],
                   "sample": ["tests/test_persistent.py::test_unsupported_size_fails_clearly",
                              "tests/test_persistent.py::test_small_kernel_at_256_needs_the_shared_memory"]}
PER_TEST_TIMEOUT_S = 120

# A child at its phase's limit gets SIGINT and this long to exit (pytest-xdist stops its workers and
# pytest writes its JUnit report in about 3 s on CPU) before its group is killed; PHASE_SLACK_S of
# the limit is left for the phase's own exit, inside the shell's `timeout`.
GRACE_S = 8.0
PHASE_SLACK_S = 5.0
POLL_S = 2.0
PROCESS_GROUPS = "process-groups"  # DIR/process-groups: every child group, for gpu_session.sh to sweep

BARRIER_PROGRAMS = (16, 32, 64, 96, 128, 132)  # the large-H kernel's group sizes and one per SM (H200)
BARRIER_SCHEMES = ("count", "flip")  # the v0.2 barrier (arrival count) and the v0.3 one (flip of the top bit)
BARRIER_ITERS = 10_000

# The variants only a GPU can decide (issue 9, item 8): the large-H kernel's column block and its
# warps / K split, bf16, T = 1024. {} is the launcher's own choice.
# The shapes that decide the defaults first, a phase cut short loses the tail: B = 16 (the per-step
# latency target; one 16-row batch tile) at both H (warps and K split are chosen per H), then B = 64
# (four batch tiles: more work per program and step), then B = 1, which runs the same 16-row tile
# as B = 16 and so mostly repeats its answer.
VARIANT_SHAPES = [(16, 1024), (16, 2048), (64, 1024), (64, 2048), (1, 1024), (1, 2048)]
VARIANTS = [{}, {"BN": 16}, {"BN": 32}, {"num_warps": 8}, {"num_warps": 16}, {"K_SPLIT": 4}]
VARIANT_T, VARIANT_CHECK_T = 1024, 64
VARIANT_MODES = ("forward", "fwd_bwd")

BENCH_PROVIDERS = ["torch_rnn", "eager", "stepwise", "stepwise_graph", "persistent", "auto"]
# The standard grid, the target shapes in the order a phase cut short should keep them: B = 16,
# H = 1024 (the per-step latency target) first, the large-H kernel's sizes before the small one's.
STANDARD_ORDER = ["--batch", "16", "1", "8", "64", "--hidden", "1024", "2048", "256", "512"]
DRY_SHAPE = ["--dtype", "fp32", "--batch", "2", "--hidden", "16", "--seq", "8", "--rep-ms", "5"]
CUDNN_GRID = ["--dtype", "fp16", "--batch", "1", "8", "16", "64", "--hidden", "256", "512", "1024", "2048",
              "--seq", "1024"]

# The RNN family (issue 17): elman_triton.LSTM / GRU against nn.LSTM / nn.GRU at the anchor shape. The rows
# in the order a phase cut short should keep them: for both cells ours with backend "auto" (what users get)
# and nn's module, then ours on each Triton backend, "stepwise" and "persistent" (auto ran one of them; the
# other is the comparison its rule answers to).
FAMILY_CELLS = ("LSTM", "GRU")
FAMILY_ROWS = [(cell, who) for pair in (("auto", "nn"), ("stepwise", "persistent")) for cell in FAMILY_CELLS
               for who in pair]
FAMILY_SHAPE = {"T": 1024, "B": 16, "H": 768}  # FlashRNN's published LSTM shape (H100: 4.87 ms vs cuDNN 2.01)
DRY_FAMILY_SHAPE = {"T": 4, "B": 2, "H": 16}


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
        check = barrier_check()
        print(f"persistent.check_errors(wait=True): {check}", flush=True)
        self.save(complete=True, check_errors=check, **fields)


def barrier_check():
    """persistent.check_errors(wait=True) in this process: 'none', or the barrier timeout it raised.
    A timed-out large-H launch is otherwise reported only by the next large-H call, never for the
    last one; the phases that run a child (python -m benchmarks) check in the child too (bench_main)."""
    try:
        from elman_triton import persistent
        persistent.check_errors(wait=True)
    except RuntimeError as e:
        return f"error: {one_line(e)}"
    except (ImportError, AttributeError, TypeError) as e:
        return f"unavailable: {one_line(e)}"
    return "none"


def one_line(error):
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def gpu_device(dry_run):
    import torch
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run (DRY_RUN=1) to rehearse on CPU")
    return torch.device("cuda")


# ---- environment ----------------------------------------------------------------------------------

def phase_environment(args):
    import torch
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
    env["install"] = os.environ.get("ELMAN_TRITON_INSTALL", "not recorded (run outside gpu_session.sh)")
    env.update(package_paths())
    log = PhaseLog(args.out, "environment", **env)
    log.finish()
    for key, value in env.items():
        print(f"{key}: {value}")


def package_paths():
    """Where elman_triton and its kernels were imported from: the checkout through pip's editable
    install, or gpu_session.sh's PYTHONPATH layout when pip failed (and always in the dry run)."""
    try:
        import elman_triton
        import elman_triton.kernels
        return {"elman_triton": elman_triton.__file__, "elman_triton.kernels": elman_triton.kernels.__file__,
                "kernels_source": os.path.realpath(elman_triton.kernels.__file__)}
    except ImportError as e:
        return {"elman_triton": f"import failed: {one_line(e)}"}


def _command(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({one_line(e)})"


# ---- children within the phase's limit ----------------------------------------------------------

def _default_sigint():
    """In the child before exec: SIGINT back to its default action. A background job of a
    non-interactive shell (`cmd &` in a script, as CI and gpu_session.sh callers may run us) starts with
    SIGINT ignored, children inherit that, and Python then installs no KeyboardInterrupt handler: the
    SIGINT at the limit would do nothing and the child would only ever be killed (no JUnit report)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_bounded(argv, out, log_path, seconds, poll=None, grace=None):
    """Run argv (output to log_path) in a process group of its own for at most `seconds`, calling
    poll() every POLL_S and once at the end. At the limit the group gets SIGINT (pytest writes its
    JUnit report, python -m benchmarks keeps its last checkpoint) and `grace` seconds to exit; then,
    and after a clean exit too, the group is killed, so no worker it started outlives it. A SIGTERM
    to this process (the shell's `timeout`) kills the group on the way out as well, and the group's
    id is appended to DIR/process-groups for gpu_session.sh to sweep should this process be killed.
    Returns (status, seconds): "exit N", "timeout: interrupted, exit N" or "timeout: killed"."""
    grace = GRACE_S if grace is None else grace
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_default_sigint)
    with open(Path(out) / PROCESS_GROUPS, "a") as groups:
        groups.write(f"{proc.pid}\n")
    try:
        status = None
        while status is None and time.monotonic() - start < seconds:
            with contextlib.suppress(subprocess.TimeoutExpired):
                status = f"exit {proc.wait(timeout=max(0.05, min(POLL_S, seconds - (time.monotonic() - start))))}"
            if poll and status is None:
                poll()
        if status is None:
            _signal_group(proc.pid, signal.SIGINT)
            try:
                status = f"timeout: interrupted, exit {proc.wait(timeout=grace)}"
            except subprocess.TimeoutExpired:
                status = "timeout: killed"
    finally:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    if poll:
        poll()
    return status, round(time.monotonic() - start, 1)


def _signal_group(pgid, sig):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _log_tail(path, chars):
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# ---- correctness ----------------------------------------------------------------------------------

def pytest_options(out, name, dry_run):
    """Parallel with pytest-xdist and per-test timeouts with pytest-timeout where they are installed
    (a GPU image may lack them: then serial, and only the phase's own limit bounds a hang). The dry
    run stays serial: its two tests would only pay for starting workers. -rA: every test's outcome
    in the log, also of a run interrupted at its limit."""
    options = ["-q", "-rA", "-p", "no:cacheprovider", f"--junitxml={Path(out) / f'junit-{name}.xml'}"]
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


def correctness_parts(dry_run):
    """{part: pytest targets}: every test file, the persistent, barrier and graph-capture ones first
    (named one by one: pytest 9 collects a folder given beside its own files in folder order)."""
    if dry_run:
        return DRY_CORRECTNESS
    rest = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "tests").glob("test_*.py"))
    return {"gpu": CORRECTNESS_FIRST + [t for t in rest if t not in CORRECTNESS_FIRST], "sample": CORRECTNESS_SAMPLE}


def phase_correctness(args):
    """The gpu-marked tests, then a sample of the CPU suite on CUDA. The gpu part gets at most its
    share of the phase's time, the sample whatever is left, so a slow first part cannot starve the
    second; each run is stopped at its limit by SIGINT (counts kept) and then killed."""
    gpu_device(args.dry_run)
    parts = correctness_parts(args.dry_run)
    log = PhaseLog(args.out, "correctness")
    deadline = time.monotonic() + args.limit - PHASE_SLACK_S
    for i, (name, targets) in enumerate(parts.items()):
        options, have = pytest_options(args.out, name, args.dry_run)
        argv = [sys.executable, "-m", "pytest", *options, "-m", CORRECTNESS_MARKS[name], *targets]
        left = deadline - time.monotonic()
        budget = left * CORRECTNESS_GPU_SHARE if i < len(parts) - 1 else left
        log_path = Path(args.out) / f"pytest-{name}.log"
        status, seconds = run_bounded(argv, args.out, log_path, max(1.0, budget - GRACE_S))
        print(_log_tail(log_path, 3000))
        log.add({"part": name, "command": " ".join(argv[1:]), "status": status, "xdist": have["xdist"],
                 "pytest_timeout": have["pytest_timeout"], "seconds": seconds,
                 "counts": junit_counts(Path(args.out) / f"junit-{name}.xml")})
    log.finish()


# ---- barrier --------------------------------------------------------------------------------------

def phase_barrier(args):
    """µs per grid barrier, old (count) and new (flip) scheme, at 16..132 programs (as many as the GPU has SMs)."""
    import torch
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
    import torch
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
    deadline, longest = time.monotonic() + args.limit - PHASE_SLACK_S, 0.0
    for B, H in shapes:
        shape = Shape("bf16", T, B, H, H)
        check = make_problem(shape, check_T, device, generator, "tanh", with_dy=True)
        reference = float64_reference(check, with_grad=True)
        problems = [make_problem(shape, T, device, generator, "tanh", with_dy=True)]
        for variant in VARIANTS:
            row, started = {"B": B, "H": H, "variant": variant_name(variant)}, time.monotonic()
            if args.dry_run:
                log.add({**row, "status": SKIPPED})
                continue
            if started + longest > deadline:  # the row would not finish: say so, and end with the check
                log.add({**row, "status": "not run: the phase's time is up"})
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
            longest = max(longest, time.monotonic() - started)
            log.add(row)
        del check, reference, problems
    log.finish()


def variant_name(variant):
    return ", ".join(f"{k}={v}" for k, v in variant.items()) or "default"


# ---- standard grid and the cuDNN anchor ------------------------------------------------------------

def run_benchmarks(args, log, name, grid, providers, modes=None, deadline=None):
    """python -m benchmarks into DIR/name within the phase's time (through bench_main, which ends with
    persistent.check_errors); its JSON row is added to the phase's log. Every POLL_S the targets are
    evaluated from the rows the run has checkpointed so far and saved with the row, so a run cut at
    its limit still says what it measured against the targets."""
    argv = [sys.executable, "-c", BENCH_ENTRY, *grid, "--out", str(Path(args.out) / name),
            "--providers", *providers] + (["--modes", *modes] if modes else [])
    row = {"command": "python -m benchmarks " + " ".join(argv[3:]), "status": "running"}
    log.add(row)
    results, seen = Path(args.out) / name / "results.json", [None]

    def checkpoint():
        stamp = results.stat().st_mtime_ns if results.exists() else None
        progress = results_progress(results) if stamp not in (None, seen[0]) else None
        if progress:  # else none yet, or caught mid-write: the next poll reads it again
            seen[0] = stamp
            row.update(progress)
            log.save()

    deadline = deadline or time.monotonic() + args.limit - PHASE_SLACK_S
    status, seconds = run_bounded(argv, args.out, Path(args.out) / f"{name}.log",
                                  max(1.0, deadline - time.monotonic() - GRACE_S), poll=checkpoint)
    row.update(status=status, seconds=seconds)
    log.save()
    print(_log_tail(Path(args.out) / f"{name}.log", 4000))
    return row


BENCH_ENTRY = "import sys; from benchmarks.gpu_phases import bench_main; bench_main(sys.argv[1:])"


def bench_main(argv):
    """python -m benchmarks ARGV, then persistent.check_errors(wait=True) in the same process: a
    barrier timeout of the run's last large-H call is reported, not lost with the process."""
    from benchmarks import cli
    status = cli.main(argv)
    check = barrier_check()
    print(f"persistent.check_errors(wait=True): {check}", flush=True)
    sys.exit(1 if check.startswith("error") else status)


def results_progress(path):
    """What a (possibly checkpointed) results.json holds: rows, whether the run completed, and the
    targets: the run's own when it wrote them (at its end), else evaluated here from the rows
    checkpointed so far (on a GPU run; a CPU run's figures are no target figures), with the number
    of shapes they cover."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # none yet, or caught mid-write
        return {}
    rows, metadata = doc.get("rows", []), doc.get("metadata", {})
    progress = {"rows": len(rows), "complete": bool(metadata.get("complete")), "targets": doc.get("targets"),
                "targets_from": "the run's own evaluation"}
    if not progress["targets"]:
        from benchmarks.report import evaluate_targets, shape_of, targets_not_evaluated
        progress.update(shapes=len({shape_of(r) for r in rows}), targets_from=f"{len(rows)} checkpointed rows",
                        targets=evaluate_targets(rows) if metadata.get("gpu")
                        else targets_not_evaluated("needs a GPU: this run is CPU-only"))
    return progress


def phase_standard(args):
    """The --standard target grid, every provider but torch.compile (which recompiles per shape),
    B = 16, H = 1024 first; the targets are evaluated at every checkpoint."""
    gpu_device(args.dry_run)
    grid = ["--quick", *DRY_SHAPE] if args.dry_run else ["--standard", *STANDARD_ORDER]
    log = PhaseLog(args.out, "standard")
    # Elman only: the family has its own phase and limit after the Elman phases.
    run_benchmarks(args, log, "standard", [*grid, "--family", "elman"], BENCH_PROVIDERS)
    log.finish()


def phase_cudnn(args):
    """cuDNN at its own best, nn.RNN in fp16 on the target grid (its PERSIST_STATIC path where
    eligible), and which backend nn.RNN really runs in bf16 and fp16."""
    import torch
    device = gpu_device(args.dry_run)
    deadline = time.monotonic() + args.limit - PHASE_SLACK_S
    log = PhaseLog(args.out, "cudnn")
    for dtype in (torch.bfloat16, torch.float16):
        log.add(nn_rnn_backend(device, dtype))
    grid = ["--quick", *DRY_SHAPE] if args.dry_run else CUDNN_GRID
    run_benchmarks(args, log, "cudnn-fp16", [*grid, "--no-module-rows", "--family", "elman"], ["torch_rnn"],
                   modes=["forward", "fwd_bwd"], deadline=deadline)
    log.finish()


def nn_rnn_backend(device, dtype, T=64, B=16, H=1024):
    """What nn.RNN ran: torch's own cuDNN test on the input, and the kernels a profiler saw in one
    forward+backward. cuDNN's RNN kernels carry 'RNN', 'rnn' or 'cudnn' in their names (persistent
    ones 'persist'); ATen's per-step loop shows only GEMMs and elementwise tanh kernels."""
    import torch
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


# ---- the RNN family ------------------------------------------------------------------------------

def phase_family(args):
    """The RNN family (issue 17) after the Elman phases: elman_triton.LSTM and GRU against nn.LSTM and
    nn.GRU with the same weights at the anchor shape, one row per cell and backend (FAMILY_ROWS): ours
    with backend auto, stepwise and persistent (where persistent.cell_supports holds the shape; else the
    row says why not), each checked against float64 first, then timed forward and fwd+bwd beside nn's
    module. Every row of a cell records the backend auto runs there (auto_ran). A row that would not
    finish within the phase's limit says so. The dry run takes fp32 at a tiny shape on CPU, the Triton
    backends in Triton's interpreter (auto runs torch's native CPU kernel there). (The family's whole
    target grid is python -m benchmarks --standard --family lstm,gru, a follow-up call of its own.)"""
    if args.dry_run:
        from benchmarks import interpret_without_gpu
        interpret_without_gpu()  # before elman_triton's kernels are defined: the Triton rows run interpreted
    import torch
    from benchmarks.measure import make_timer
    from benchmarks.providers import Shape, family_auto_backend, family_persistent_kernel
    from benchmarks.sweep import TOLERANCE
    device = gpu_device(args.dry_run)
    size, dtype = (DRY_FAMILY_SHAPE, "fp32") if args.dry_run else (FAMILY_SHAPE, "bf16")
    log = PhaseLog(args.out, "family", cells=list(FAMILY_CELLS), dtype=dtype, **size)
    timer = make_timer(device, 5.0 if args.dry_run else 100.0)
    torch.manual_seed(0)
    deadline, longest, cells = time.monotonic() + args.limit - PHASE_SLACK_S, 0.0, {}
    for cell, who in FAMILY_ROWS:
        row, started = {"cell": cell, "backend": who}, time.monotonic()
        if started + longest > deadline:  # the row would not finish: say so, and end with the check
            log.add({**row, "status": "not run: the phase's time is up"})
            continue
        shape = Shape(dtype, size["T"], size["B"], size["H"], size["H"], cell.lower())
        try:
            if cell not in cells:
                cells[cell] = family_inputs(cell, shape, device)
            theirs, x, reference = cells[cell]
            row["auto_ran"] = family_auto_backend(shape, device)
            if who == "persistent":
                row["kernel"] = family_persistent_kernel(shape)
            blocked = family_blocked(who, shape, device)
            if blocked:
                row["status"] = blocked
            else:
                row.update(check_and_time(family_module(cell, who, theirs), x, reference, TOLERANCE[dtype], timer,
                                          gate=who != "nn"))
        except Exception as e:
            row["status"] = f"error: {one_line(e)}"
        longest = max(longest, time.monotonic() - started)
        log.add(row)
    log.finish()


def family_blocked(who, shape, device):
    """Why ours on backend `who` does not run at shape here, or None: persistent's kernels do not hold the
    shape (the launcher's ValueError), or a CPU process without Triton's interpreter (a dry run inside a
    process that imported elman_triton on a machine with a GPU)."""
    from benchmarks.providers import check_family_persistent
    from elman_triton.config import INTERPRETED
    if who in ("stepwise", "persistent") and device.type != "cuda" and not INTERPRETED:
        return f"{SKIPPED} (this process imported elman_triton without TRITON_INTERPRET=1)"
    if who == "persistent":
        try:
            check_family_persistent(shape, device)
        except ValueError as e:
            return f"unsupported: {one_line(e)}"
    return None


def family_inputs(cell, shape, device):
    """(nn's module, x, y of nn's module in float64 with the same weights) for one cell."""
    import torch
    theirs = getattr(torch.nn, cell)(shape.H, shape.H, device=device, dtype=shape.torch_dtype)
    x = torch.randn(shape.T, shape.B, shape.D, device=device, dtype=shape.torch_dtype, requires_grad=True)
    with torch.no_grad():
        reference = getattr(torch.nn, cell)(shape.H, shape.H, device=device, dtype=torch.float64)
        reference.load_state_dict(theirs.state_dict())  # load_state_dict copies into float64
        return theirs, x, reference(x.double())[0]


def family_module(cell, who, theirs):
    """nn's module itself (who "nn"), or elman_triton's drop-in with backend=who and nn's weights."""
    import elman_triton
    if who == "nn":
        return theirs
    ours = getattr(elman_triton, cell)(theirs.input_size, theirs.hidden_size, device=theirs.weight_hh_l0.device,
                                       dtype=theirs.weight_hh_l0.dtype, backend=who)
    ours.load_state_dict(theirs.state_dict())
    return ours


def check_and_time(module, x, reference, tolerance, timer, gate=True):
    """{err, status, forward_ms, fwd_bwd_ms}: y against the float64 reference, then (if within tolerance, or
    always when gate is False: nn's module, the baseline) timed."""
    import torch
    from benchmarks.sweep import rel_err
    with torch.no_grad():
        err = rel_err(module(x)[0], reference)
    if gate and not err <= tolerance:
        return {"err": err, "status": f"failed: relative error {err:.3g} > {tolerance:g}"}
    return {"err": err, **time_module(module, x, timer)}


def time_module(module, x, timer):
    """{status ok, forward_ms, fwd_bwd_ms} of an RNN module on x, or status error (nn.LSTM in bf16 may not run
    at all: pytorch #88136)."""
    import torch
    grads = [x, *module.parameters()]

    def forward():
        with torch.no_grad():
            module(x)
    try:
        return {"status": "ok", "forward_ms": timer(forward, []).median_ms,
                "fwd_bwd_ms": timer(lambda: module(x)[0].sum().backward(), grads).median_ms}
    except Exception as e:
        return {"status": f"error: {one_line(e)}"}


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
    progress = results_progress(out / "standard" / "results.json")
    if progress and not progress["complete"]:
        lines += [f"- the standard run was cut short: {progress.get('shapes', '?')} shapes ({progress['rows']} rows) "
                  f"measured; targets from its {progress['targets_from']}", ""]
    lines += [f"- [{t['result']}] {t['target']}: {t['measured']} (target {t['threshold']})"
              for t in progress.get("targets", [])] or ["- none: the standard phase wrote no results.json"]
    lines += ["", "Variant winners (fastest verified variant per shape and mode):", ""]
    lines += variant_winners(docs.get("variants", {}).get("rows", [])) or ["- none measured"]
    lines += ["", "Barrier (µs per barrier):", ""] + barrier_table(docs.get("barrier", {}).get("rows", []))
    lines += ["", "nn.RNN's backend:", ""]
    lines += [f"- {r['dtype']}: {r['backend']} (cudnn.is_acceptable={r['cudnn_is_acceptable']})"
              for r in docs.get("cudnn", {}).get("rows", []) if "backend" in r] or ["- not recorded"]
    lines += ["", "LSTM / GRU against nn.LSTM / nn.GRU (ms; × nn: nn's time ÷ ours):", ""]
    lines += family_lines(docs.get("family", {}))
    lines += ["", "Barrier timeouts reported by persistent.check_errors(wait=True) at each phase's end:", ""]
    lines += [f"- {phase}: {doc['check_errors']}" for phase, doc in docs.items() if "check_errors" in doc] or \
        ["- no phase finished"]
    return lines


def family_lines(doc):
    """One line per row of the family phase: the backend auto ran, the error against float64, the times
    and ours' speedup over nn's module (nn time ÷ ours) of the same cell."""
    rows = doc.get("rows", [])
    nn = {r["cell"]: r for r in rows if r.get("backend") == "nn" and r.get("status") == "ok"}
    lines = []
    for r in rows:
        shape = f"T={doc.get('T')} B={doc.get('B')} H={doc.get('H')} {doc.get('dtype')}"
        ran = f" (ran {r['auto_ran']})" if r["backend"] == "auto" and "auto_ran" in r else \
            f" ({r['kernel']})" if "kernel" in r else ""
        parts = [r["status"]] + ([f"err {r['err']:.3g}"] if "err" in r else [])
        for mode in ("forward", "fwd_bwd"):
            ms = r.get(f"{mode}_ms")
            if ms is None:
                continue
            base = nn.get(r["cell"], {}).get(f"{mode}_ms") if r["backend"] != "nn" else None
            parts.append(f"{mode.replace('_', '+')} {ms:.3g}" + (f" ({base / ms:.3g}× nn)" if base else ""))
        lines.append(f"- {r['cell']} {r['backend']}{ran} {shape}: " + ", ".join(parts))
    return lines or ["- not run"]


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
        return ", ".join(r["status"] + (f" ({r['shapes']} shapes)" if "shapes" in r else "") for r in runs) + incomplete
    statuses = [str(r.get("status", "")).split(":")[0] for r in rows]
    counts = {s: statuses.count(s) for s in dict.fromkeys(statuses)}
    return ", ".join(f"{n} {s}" for s, n in counts.items()) + incomplete


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
          "variants": phase_variants, "standard": phase_standard, "cudnn": phase_cudnn, "family": phase_family,
          "summary": phase_summary}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_phases", description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=list(PHASES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=float, default=300.0, help="the phase's time limit in seconds")
    parser.add_argument("--dry-run", action="store_true", help="rehearse on CPU at tiny sizes")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # The shell's `timeout` sends SIGTERM: exit through the finally blocks that kill child groups.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with contextlib.suppress(BrokenPipeError):
        PHASES[args.phase](args)


if __name__ == "__main__":
    main()
