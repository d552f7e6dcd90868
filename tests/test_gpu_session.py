"""benchmarks/gpu_session.sh and benchmarks/gpu_phases.py: the one GPU call keeps everything it measured.

The rehearsal of the whole session on CPU (with pip made to fail, so the session goes on from the
PYTHONPATH layout), and the parts a cut phase depends on, each with a deliberately slow child under a
tiny limit: SIGINT first (pytest still writes its JUnit report), then the child's process group is
killed; the standard phase's targets are evaluated at every checkpoint.
"""
import argparse
import json
import os
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("tqdm")  # the bench extras, as in tests/test_benchmarks.py
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of the repository, not an installed package

from benchmarks import gpu_phases  # noqa: E402

PHASES = ["environment", "correctness", "barrier", "variants", "standard", "cudnn", "family", "summary"]


def alive(pid, settle_s=2.0):
    """Whether pid still runs settle_s after a kill was sent (SIGKILL is delivered asynchronously; a
    zombie left for init to reap counts as gone)."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            running = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            running = False
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.05)


def phase_args(out, limit, dry_run=True):
    return argparse.Namespace(out=Path(out), limit=limit, dry_run=dry_run)


@pytest.fixture
def quick_limits(monkeypatch):
    """Seconds, not minutes: a child gets SIGINT 4.5 s before the phase's end, and 4 s to exit
    (pytest takes about 1 s on an idle machine, 3 on a loaded one)."""
    monkeypatch.setattr(gpu_phases, "GRACE_S", 4.0)
    monkeypatch.setattr(gpu_phases, "PHASE_SLACK_S", 0.5)
    monkeypatch.setattr(gpu_phases, "POLL_S", 0.2)


def test_gpu_session_dry_run_rehearses_every_phase(tmp_path):
    """bash benchmarks/gpu_session.sh --dry-run with a pip that fails: the session goes on from the
    PYTHONPATH layout (the environment phase imports elman_triton and its kernels from there, not
    from the checkout), every phase's Python runs on CPU at tiny sizes, GPU-only calls become
    'skipped: no GPU' rows, the family phase runs every row (the Triton backends in the interpreter),
    every phase ends with persistent.check_errors, the summary comes last, and
    $OUT gets the whole results folder as one archive (the device tool returns at most 8 files)."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\n[ "$1 $2" = "-m pip" ] && {{ echo "pip: simulated failure" >&2; exit 1; }}\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    out, results = tmp_path / "out", tmp_path / "results"
    env = {**os.environ, "OUT": str(out), "GPU_SESSION_DIR": str(results), "PYTHON": str(python)}
    env.pop("TRITON_INTERPRET", None)  # the session sets up its own environment
    start = time.monotonic()
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env=env)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pip: simulated failure" in proc.stderr and "install: PYTHONPATH layout (pip install" in proc.stdout
    phases = [line.split("\t") for line in (results / "phases.tsv").read_text().splitlines()]
    assert [p[0] for p in phases] == PHASES
    assert all(rc == "0" for _, rc, _ in phases), phases
    docs = {p: json.loads((results / f"{p}.json").read_text()) for p in PHASES[:-1]}
    assert all(doc["complete"] and doc["check_errors"] == "none" for doc in docs.values()), docs
    env_doc = docs["environment"]
    assert "FAILED" in env_doc["install"]
    package, kernels = Path(env_doc["elman_triton"]), Path(env_doc["elman_triton.kernels"])
    assert package.parent.parent.name == "site" and not package.is_relative_to(REPO), env_doc
    assert kernels == package.parent / "kernels" / "__init__.py", env_doc
    assert Path(env_doc["kernels_source"]) == REPO / "kernels" / "__init__.py", env_doc
    assert {r["part"]: r["counts"]["passed"] for r in docs["correctness"]["rows"]} == {"gpu": 0, "sample": 2}
    for phase in ("barrier", "variants"):
        assert docs[phase]["rows"] and all(r["status"] == "skipped: no GPU" for r in docs[phase]["rows"])
    assert (results / "standard" / "results.json").exists() and (results / "cudnn-fp16" / "results.json").exists()
    (standard,) = docs["standard"]["rows"]
    assert standard["status"] == "exit 0" and standard["complete"] and len(standard["targets"]) == 6
    # the family's rows rehearsed: ours on auto (torch's native kernel here), stepwise and persistent (in the
    # interpreter) checked against float64 and timed beside nn's modules
    family = docs["family"]["rows"]
    assert [(r["cell"], r["backend"]) for r in family] == gpu_phases.FAMILY_ROWS
    assert all(r["status"] == "ok" and r["auto_ran"] == "native" and r["fwd_bwd_ms"] > 0 for r in family), family
    assert not (results / gpu_phases.PROCESS_GROUPS).exists()  # swept after every phase
    summary = (results / "summary.md").read_text()
    assert "DRY RUN" in summary and "| variants | 0 |" in summary and "NOT MEASURED" in summary
    assert "- standard: none" in summary and "- GRU persistent (small-H kernel) T=4 B=2 H=16 fp32: ok" in summary
    assert sorted(p.name for p in out.iterdir()) == ["gpu-session.tar.gz", "phases.tsv", "summary.md"]
    with tarfile.open(out / "gpu-session.tar.gz") as archive:
        packed = {Path(name).as_posix().removeprefix("./") for name in archive.getnames()}
    assert {"correctness.json", "junit-sample.xml", "standard/results.json", "summary.md"} <= packed
    assert proc.stdout.rstrip().splitlines()[-1].startswith("session:")
    print(f"dry run: {seconds:.0f} s")


def test_correctness_interrupts_pytest_then_kills_its_group(tmp_path, monkeypatch, quick_limits):
    """A pytest that is still running at the phase's limit gets SIGINT and still writes its JUnit
    report (the counts are kept, not None); a process it started that ignores SIGINT (as a stuck
    worker might) is killed with its group before the phase ends."""
    marker = tmp_path / "worker.pid"
    fake = tmp_path / "test_fake_slow.py"
    fake.write_text(textwrap.dedent(f"""
        import signal, subprocess, sys, time

        def test_fast():
            assert True

        def test_slow():
            worker = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                       "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)"])
            open({str(marker)!r}, "w").write(str(worker.pid))
            time.sleep(120)
    """))
    monkeypatch.setattr(gpu_phases, "DRY_CORRECTNESS", {"sample": [str(fake)]})
    out = tmp_path / "out"
    out.mkdir()
    start = time.monotonic()
    gpu_phases.phase_correctness(phase_args(out, limit=10))
    assert time.monotonic() - start < 10 + 5  # the phase ended within its limit (and the check's import)
    (row,) = json.loads((out / "correctness.json").read_text())["rows"]
    assert row["status"].startswith("timeout: interrupted"), row
    assert row["counts"] is not None and row["counts"]["passed"] == 1, row
    log = (out / "pytest-sample.log").read_text()
    assert "KeyboardInterrupt" in log and "PASSED" in log  # -rA: each outcome in the log
    assert not alive(int(marker.read_text()))


def test_a_child_that_ignores_sigint_is_killed_after_the_grace(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    start = time.monotonic()
    status, _ = gpu_phases.run_bounded(["sh", "-c", "trap '' INT; sleep 60"], out, out / "child.log", 1.0, grace=0.5)
    assert status == "timeout: killed" and time.monotonic() - start < 5
    (group,) = (out / gpu_phases.PROCESS_GROUPS).read_text().split()
    assert not alive(int(group))


FAKE_BENCH = """
import json, pathlib, sys, time
out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1])
out.mkdir(parents=True, exist_ok=True)
row = {"dtype": "bf16", "T": 1024, "B": 16, "H": 1024, "D": 1024, "mode": "forward", "status": "ok"}
rows = [{**row, "provider": "auto", "median_ms": 1.2, "per_step_us": 1.2 / 1.024},
        {**row, "provider": "torch_rnn", "median_ms": 3.0, "per_step_us": 3.0 / 1.024}]
doc = {"metadata": {"gpu": True, "complete": False}, "targets": [], "rows": rows}
(out / "results.json").write_text(json.dumps(doc))  # one checkpoint: no targets, as python -m benchmarks writes it
time.sleep(120)
"""


def test_standard_phase_evaluates_targets_at_every_checkpoint(tmp_path, monkeypatch, quick_limits):
    """A standard run cut at its limit after one shape (B=16, H=1024): the phase has evaluated the
    targets from the checkpointed rows (the per-step latency target is decided by that shape alone),
    and the summary reports them with the run marked cut short, not 'no results.json'."""
    monkeypatch.setattr(gpu_phases, "BENCH_ENTRY", FAKE_BENCH)
    out = tmp_path / "out"
    out.mkdir()
    gpu_phases.phase_standard(phase_args(out, limit=8))
    (row,) = json.loads((out / "standard.json").read_text())["rows"]
    assert row["status"].startswith("timeout: interrupted") and row["shapes"] == 1 and not row["complete"], row
    results = {t["target"].split(" (")[0]: t["result"] for t in row["targets"]}
    assert results["forward per-step latency at B=16, H=1024"] == "PASS", results
    assert results["forward never slower than cuDNN"] == "NOT MEASURED", results  # 1 of 16 shapes, and met there
    (out / "phases.tsv").write_text("standard\t0\t8\n")
    gpu_phases.phase_summary(phase_args(out, limit=10))
    summary = (out / "summary.md").read_text()
    assert "cut short: 1 shapes (2 rows)" in summary and "[PASS] forward per-step latency" in summary
    assert "no results.json" not in summary


def test_correctness_runs_the_persistent_barrier_and_capture_tests_first():
    parts = gpu_phases.correctness_parts(dry_run=False)
    files = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "tests").glob("test_*.py"))
    first = ["tests/test_persistent.py", "tests/test_barrier.py"]
    assert parts["gpu"][:2] == first and sorted(parts["gpu"]) == files  # each file once, named one by one
    assert parts["sample"][:2] == first
    assert [B for B, _ in gpu_phases.VARIANT_SHAPES] == [16, 16, 64, 64, 1, 1]  # the deciding shapes first
    assert gpu_phases.STANDARD_ORDER[:2] == ["--batch", "16"] and "1024" == gpu_phases.STANDARD_ORDER[6]


def test_family_phase_times_every_backend_and_says_what_auto_ran(tmp_path, monkeypatch):
    """The family phase (dry run: fp32, tiny, the Triton backends in the interpreter): one row per cell and
    backend in FAMILY_ROWS' order (auto and nn for both cells first), ours checked against float64 and timed
    beside nn.LSTM / nn.GRU, each row naming the backend auto ran (torch's native kernel on CPU); persistent
    on its small-H kernel, or 'unsupported' with the launcher's ValueError where its kernels do not hold the
    cell (here the LSTM, its limits made 0); the summary has a line per row with the ratio to nn."""
    from benchmarks.sweep import TOLERANCE
    from elman_triton import persistent
    from elman_triton.config import INTERPRETED
    monkeypatch.setitem(persistent.CELL_SMALL_H_MAX[4], torch.float32, 0)
    monkeypatch.setitem(persistent.CELL_LARGE_H_MAX[4], torch.float32, 0)
    gpu_phases.phase_family(phase_args(tmp_path, limit=120))
    doc = json.loads((tmp_path / "family.json").read_text())
    assert doc["complete"] and doc["check_errors"] == "none", doc
    rows = {(r["cell"], r["backend"]): r for r in doc["rows"]}
    assert list(rows) == gpu_phases.FAMILY_ROWS == [("LSTM", "auto"), ("LSTM", "nn"), ("GRU", "auto"), ("GRU", "nn"),
                                                    ("LSTM", "stepwise"), ("LSTM", "persistent"),
                                                    ("GRU", "stepwise"), ("GRU", "persistent")]
    assert all(r["auto_ran"] == "native" for r in rows.values()), rows
    lstm = rows["LSTM", "persistent"]
    assert lstm["status"].startswith("unsupported: ValueError: backend='persistent' does not hold the LSTM at H=16")
    assert "err" not in lstm and rows["GRU", "persistent"]["kernel"] == "small-H kernel"
    for key, r in rows.items():
        if key == ("LSTM", "persistent"):
            continue
        if key[1] in ("stepwise", "persistent") and not INTERPRETED:  # a GPU machine's test process
            assert r["status"].startswith(gpu_phases.SKIPPED), r
            continue
        assert r["status"] == "ok" and r["err"] <= TOLERANCE["fp32"], r
        assert r["forward_ms"] > 0 and r["fwd_bwd_ms"] > 0, r
    lines = gpu_phases.family_lines(doc)
    assert lines[0].startswith("- LSTM auto (ran native) T=4 B=2 H=16 fp32: ok, err ") and "× nn)" in lines[0]
    assert lines[5].startswith("- LSTM persistent (large-H kernel) T=4 B=2 H=16 fp32: unsupported: ValueError")


def test_family_phase_rows_past_the_limit_are_not_run(tmp_path, monkeypatch):
    """A family phase out of time runs no row: each says so, and the phase still ends with the barrier check."""
    monkeypatch.setattr(gpu_phases, "PHASE_SLACK_S", 0.0)
    gpu_phases.phase_family(phase_args(tmp_path, limit=1e-6))
    doc = json.loads((tmp_path / "family.json").read_text())
    assert doc["complete"] and [(r["cell"], r["backend"]) for r in doc["rows"]] == gpu_phases.FAMILY_ROWS
    assert {r["status"] for r in doc["rows"]} == {"not run: the phase's time is up"}


def test_barrier_phase_on_a_gpu_measures_up_to_its_sm_count(tmp_path, monkeypatch):
    """The barrier phase off the dry run (a GPU of 64 SMs, the measurement stood in for): one row per scheme and
    group size up to the SM count, each with its µs. (It once read the SM count through a torch it had not
    imported: a NameError on every GPU, which the dry run never reached.)"""
    from types import SimpleNamespace
    from elman_triton import persistent
    monkeypatch.setattr(gpu_phases, "gpu_device", lambda dry_run: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=64))
    monkeypatch.setattr(persistent, "barrier_latency_us", lambda device, n_programs, iters, scheme: n_programs / 64)
    gpu_phases.phase_barrier(phase_args(tmp_path, limit=10, dry_run=False))
    doc = json.loads((tmp_path / "barrier.json").read_text())
    assert doc["complete"] and doc["sms"] == 64, doc
    assert [(r["scheme"], r["programs"], r["status"], r["us"]) for r in doc["rows"]] == [
        (scheme, n, "ok", n / 64) for scheme in gpu_phases.BARRIER_SCHEMES for n in (16, 32, 64)]
