"""The benchmark suite: a tiny end-to-end run of the CLI, failure reporting, and the pure helpers.

On CPU about a minute, most of it the rehearsal of benchmarks/gpu_session.sh; on a GPU the same tests also
run the Triton providers.
"""
import csv
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("tqdm")  # matplotlib and tqdm are the bench extras, not core dependencies
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of the repository, not an installed package

import benchmarks  # noqa: E402
from benchmarks import cli, module_rows, report, sweep  # noqa: E402
from benchmarks.measure import ROW_METADATA, make_timer, rotation_count  # noqa: E402
from benchmarks.providers import (FAMILY_INTERPRETER_PROVIDERS, FAMILY_PROVIDERS, PROVIDERS, Provider,  # noqa: E402
                                  Shape, family_auto_backend)
from elman_triton import elman_rnn_reference, persistent  # noqa: E402
from elman_triton.config import padded  # noqa: E402
from elman_triton.family_ops import GATES as FAMILY_GATES  # noqa: E402

CUDA = torch.cuda.is_available()
TINY = ["--dtype", "fp32", "--batch", "2", "--hidden", "32", "--seq", "8", "--rep-ms", "20"]
OUTPUTS = ("results.json", "results.csv", "summary.md", "speedup_by_hidden.png", "step_latency_by_batch.png")


def test_cli_run_writes_every_output_with_metadata(tmp_path):
    """python -m benchmarks as a user runs it (no TRITON_INTERPRET set). Without a GPU: timings on one
    thread, no speedups or plots (CPU: not a performance result), and every Triton backend, both of
    persistent's kernels included, verified in the interpreter that the CLI turns on itself."""
    out = tmp_path / "bench"
    providers = ["torch_rnn", "eager", "stepwise", "stepwise_graph", "persistent", "auto"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), *TINY,
                           "--providers", *providers], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in OUTPUTS[:3] + (OUTPUTS[3:] if CUDA else ()):
        assert (out / name).stat().st_size > 0, name

    doc = json.loads((out / "results.json").read_text())
    all_rows = doc["rows"]
    rows = [r for r in all_rows if r["cell"] == "elman"]
    assert doc["metadata"]["complete"] is True
    assert len(rows) == len(providers) * 3
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(all_rows)
    check_family_rows([r for r in all_rows if r["cell"] != "elman"], doc["targets"], proc.stdout,
                      (out / "summary.md").read_text())
    for row in all_rows:
        assert all(key in row for key in ROW_METADATA)
        assert row["torch"] == torch.__version__ and row["device"] and row["git_commit"]
        assert row["floor_us"] > 0

    by = {(r["provider"], r["mode"]): r for r in rows}
    runs_here = ["torch_rnn", "eager", "auto"] + (["stepwise"] if CUDA else [])
    for (provider, mode), row in by.items():
        if provider not in runs_here:
            continue
        assert row["status"] == "ok", row
        assert 0 < row["q20_ms"] <= row["median_ms"] <= row["q80_ms"]
        assert row["per_step_us"] == pytest.approx(row["median_ms"] * 1e3 / row["T"])
        assert row["tflops"] > 0
        if CUDA:
            assert row["speedup_vs_torch_rnn"] > 0
        assert row["err_y"] <= row["tolerance"] and row["err_h_n"] <= row["tolerance"]
        if mode != "forward":
            assert row["err_grad"] <= row["tolerance"]
    assert by["persistent", "forward"]["status"] in (("ok", "unsupported") if CUDA else ("needs_gpu",))

    summary = (out / "summary.md").read_text()
    check_module_rows(doc["module_rows"], summary, proc.stdout)
    if not CUDA:
        assert all(by["stepwise", m]["status"] == "needs_gpu" for m in ("forward", "backward", "fwd_bwd"))
        assert by["auto", "fwd_bwd"]["peak_train_mem_mib"] is None and by["auto", "fwd_bwd"]["peak_mem_note"]
        assert "GPU figures need a GPU" in summary and "GPU figures need a GPU" in proc.stdout
        assert doc["metadata"]["cpu_threads"] == 1 and "one thread (torch.set_num_threads(1))" in proc.stdout
        # no speedup anywhere (auto on CPU is nn.RNN's own kernel; the rest is one CPU thread), no plots
        assert all(r["speedup_vs_torch_rnn"] is None and r["speedup_vs_eager"] is None for r in all_rows)
        assert not any(line.startswith("speedup") for line in proc.stdout.splitlines())
        assert "×)" not in proc.stdout and "÷" not in proc.stdout  # module speedups, packed ÷ padded
        assert "## Speedup" not in summary and not list(out.glob("*.png"))
        assert f"no plots ({report.CPU_NOTE})" in proc.stdout and report.CPU_NOTE in summary
        assert f"auto: {report.SAME_KERNEL_NOTE}" in proc.stdout and f"auto {report.SAME_KERNEL_NOTE}" in summary
        assert {t["result"] for t in doc["targets"]} == {"NOT MEASURED"}
        check_interpreter_rows(doc["interpreter_rows"], summary, proc.stdout)
    else:
        assert by["auto", "fwd_bwd"]["peak_train_mem_mib"] > 0
        assert doc["interpreter_rows"] == []


def check_family_rows(rows, targets, stdout, summary):
    """The LSTM and GRU rows (--family default: all): nn.LSTM / nn.GRU and ours (auto) in forward and fwd+bwd
    at the sweep's shape (on CPU only its largest), all verified against nn's module in float64 (the LSTM's
    c_n too) and timed; on CPU auto is nn's own kernel (no speedup), the anchor target is not evaluated."""
    expected = {(name, cell) for cell in ("lstm", "gru") for name in (f"torch_{cell}", f"{cell}_auto")}
    assert {(r["provider"], r["cell"]) for r in rows} == expected
    assert {r["mode"] for r in rows} == {"forward", "fwd_bwd"}
    for r in rows:
        if r["provider"].endswith("_auto"):  # what auto ran, in the JSON and the summary's table
            module = f"elman_triton.family.{r['cell'].upper()}(backend='auto')"
            ran = family_auto_backend(Shape(r["dtype"], r["T"], r["B"], r["H"], r["D"], r["cell"]),
                                      torch.device("cuda" if CUDA else "cpu"))
            assert r["backend"] == f"{module} -> " + (ran if CUDA else f"torch.{r['cell']}, native CPU kernel"), r
            assert f"| {r['backend']} |" in summary
        if CUDA and r["T"] != 8:  # the LSTM anchor shape, timed only if bf16 is in the run
            continue
        assert r["status"] == "ok", r
        assert r["err_y"] <= r["tolerance"] and r["err_h_n"] <= r["tolerance"] and r["median_ms"] > 0
        assert (r["err_c_n"] is not None) == (r["cell"] == "lstm")
        if r["cell"] == "lstm":
            assert r["err_c_n"] <= r["tolerance"]
        if r["mode"] == "fwd_bwd":
            assert r["err_grad"] <= r["tolerance"]
        # FLOPs count the cell's gates: 4 (LSTM) or 3 (GRU) times the Elman layer's
        gates = 4 if r["cell"] == "lstm" else 3
        flops = report.mode_flops(r["mode"], r["T"], r["B"], r["H"], r["D"], gates)
        assert r["tflops"] == pytest.approx(flops / (r["median_ms"] * 1e-3) / 1e12)
        assert r["speedup_vs_eager"] is None
    anchor = [t for t in targets if t["target"].startswith("LSTM")]
    assert [t["target"] for t in anchor] == [t.name for t in report.FAMILY_TARGETS]
    if not CUDA:
        assert {t["result"] for t in anchor} == {"NOT MEASURED"}
        assert "lstm_auto: " + report.SAME_KERNEL_NOTE in stdout
    for cell in ("LSTM", "GRU"):
        assert f"{cell}: 1 shapes × 2 providers" in stdout


def check_interpreter_rows(rows, summary, stdout):
    """Every Triton backend was checked in the interpreter (stepwise_graph, a CUDA-graph replay, says
    why not): persistent's small- and large-H kernels, the layer in inference and training, and the
    module (2 layers, bidirectional, packed); all passed, within the float64 tolerance. The LSTM's and
    GRU's kernels too (stepwise, persistent's small-H and large-H kernels), against nn.LSTM / nn.GRU (c_n
    included), in inference and training."""
    ran = [r for r in rows if r["status"] != "needs_gpu"]
    assert {r["provider"] for r in rows if r["status"] == "needs_gpu"} == {"stepwise_graph"}
    assert all(r["status"] == "passed" for r in ran), [r for r in ran if r["status"] != "passed"]
    assert all(r["err_y"] <= r["tolerance"] and r["err_h_n"] <= r["tolerance"] for r in ran)
    assert all(r["err_grad"] <= r["tolerance"] for r in ran if r["mode"] == "training")
    checked = {(r["provider"], r["kernel"], r["check"].split(":")[0], r["mode"]) for r in ran}
    for provider, kernel in (("stepwise", "one launch per step"), ("persistent", "small-H kernel"),
                             ("persistent", "large-H kernel")):
        assert {(provider, kernel, "layer", m) for m in ("inference", "training")} <= checked
    for provider in ("stepwise", "persistent"):
        assert any(c[0] == provider and c[2] == "module" and c[3] == "training" for c in checked)
    for cell in ("lstm", "gru"):
        family = [r for r in ran if r["cell"] == cell]
        # stepwise at both shapes; persistent's small-H kernel (H ≤ CELL_SMALL_H_MAX) and its large-H kernel
        # over several column programs (H above it, Hp > CELL_BN)
        G = FAMILY_GATES[cell]
        kernels = {(r["provider"], r["kernel"], r["mode"], r["H"] <= persistent.CELL_SMALL_H_MAX[G][torch.float32])
                   for r in family}
        assert kernels == {(f"{cell}_{provider}", kernel, m, small) for m in ("inference", "training")
                           for provider, kernel, small in (("stepwise", "one launch per step", True),
                                                           ("stepwise", "one launch per step", False),
                                                           ("persistent", "small-H kernel", True),
                                                           ("persistent", "large-H kernel", False))}
        assert any(padded(r["H"]) > persistent.CELL_BN for r in family if r["kernel"] == "large-H kernel")
        assert all((r["err_c_n"] is not None) == (cell == "lstm") for r in family)
        assert all(r["err_c_n"] <= r["tolerance"] for r in family if cell == "lstm")
    assert {r["dtype"] for r in ran} == {"fp32", "bf16"}
    assert f"Triton's interpreter (correctness, not timed): {len(ran)}/{len(ran)} checks passed" in stdout
    assert "## Triton kernels in Triton's interpreter" in summary


def check_module_rows(rows, summary, stdout):
    """Every case × provider × mode has a row; the providers that run here are within tolerance of
    nn.RNN in float64 and timed; on a GPU packed and bidirectional carry their ratio to one direction
    (on CPU no ratio or speedup: they would be no performance result)."""
    assert len(rows) == len(module_rows.CASES) * len(module_rows.MODULE_PROVIDERS) * 2
    runs_here = {"torch_rnn", "auto"} | ({"stepwise", "persistent"} if CUDA else set())
    for r in rows:
        if r["provider"] not in runs_here:
            assert r["status"] == "needs_gpu"
            continue
        if r["status"] == "unsupported":  # persistent where its grid or H does not fit
            continue
        assert r["status"] == "ok", r
        assert r["err_y"] <= 1e-4 and r["err_h_n"] <= 1e-4 and r["median_ms"] > 0
        if not CUDA:
            assert r["speedup_vs_torch_rnn"] is None and r["over_one_direction"] is None
            continue
        assert (r["over_one_direction"] is not None) == (r["case"] in ("packed", "bidirectional"))
        assert r["speedup_vs_torch_rnn"] > 0
    assert "## Module rows" in summary
    assert ("packed ÷ padded, fwd_bwd: torch_rnn" in stdout) == CUDA


def test_packed_module_input_has_mixed_lengths():
    case = next(c for c in module_rows.CASES if c.packed)
    generator = torch.Generator().manual_seed(0)
    packed, lengths = module_rows.make_input(case, 64, 32, 3, torch.device("cpu"), torch.float32, generator)
    assert lengths.max() == 64 and lengths.min() >= 8 and len(set(lengths.tolist())) > 8
    assert packed.data.shape == (int(lengths.sum()), 3) and packed.unsorted_indices is not None


def _fake(name, build, **kwargs):
    return Provider(name, build, lambda shape, device: "fake", **kwargs)


def _scaled_reference(problem):
    """A wrong provider: the reference, 10% too large."""
    def run():
        y, h_n = elman_rnn_reference(*problem.args, nonlinearity=problem.nonlinearity)
        return 1.1 * y, 1.1 * h_n
    return run


def _not_held(shape, device):
    raise NotImplementedError("B too large for this kernel")


def test_failures_are_reported_and_not_timed():
    providers = [
        PROVIDERS["eager"],
        _fake("wrong", _scaled_reference),
        _fake("limited", PROVIDERS["eager"].build, check_support=_not_held),
        _fake("crashing", lambda problem: lambda: 1 / 0),
    ]
    config = sweep.Config(shapes=[Shape("fp32", 6, 2, 16, 16)], providers=providers,
                          modes=("forward", "fwd_bwd"), device=torch.device("cpu"), check_seq=1024, rep_ms=5)
    rows = sweep.run_shape(config.shapes[0], config, make_timer(config.device, config.rep_ms))
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert len(rows) == 8
    assert by["eager", "fwd_bwd"]["status"] == "ok" and by["eager", "fwd_bwd"]["median_ms"] > 0
    for mode in config.modes:
        wrong = by["wrong", mode]
        assert wrong["status"] == "failed" and wrong["err_y"] > 0.05 and "tolerance" in wrong["reason"]
        assert "median_ms" not in wrong
        assert by["limited", mode]["status"] == "unsupported" and "B too large" in by["limited", mode]["reason"]
        assert by["crashing", mode]["status"] == "failed" and "ZeroDivisionError" in by["crashing", mode]["reason"]
    assert by["wrong", "fwd_bwd"]["err_grad"] > 0.05


def test_interpreter_checks_report_a_wrong_kernel(tmp_path, capsys):
    """A Triton provider that is wrong fails its interpreter rows (every shape, inference and training) and
    the run's exit status; one that cannot run in the interpreter says why; the others are not checked."""
    from elman_triton.config import INTERPRETED
    wrong = _fake("wrong", _scaled_reference, triton=True, ours=True)
    graph = _fake("graph", PROVIDERS["eager"].build, triton=True, no_interpreter="needs a CUDA graph")
    rows = sweep.interpreter_checks([PROVIDERS["eager"], wrong, graph])
    assert len(rows) == 2 * 2 * len(sweep.INTERPRETER_SHAPES)
    for r in rows:
        if r["provider"] == "graph":
            assert r["status"] == "needs_gpu" and r["reason"] == "needs a CUDA graph"
        elif INTERPRETED:
            assert r["status"] == "failed" and r["err_y"] > 0.05 and "tolerance" in r["reason"]
            assert (r["mode"] == "training") == (r.get("err_grad", 0) > 0.05)
        else:  # a GPU process: its kernels are compiled, not interpreted
            assert r["status"] == "not_run"
    status = cli.report_to_stdout([], [], [wrong], tmp_path, [], torch.device("cpu"), interpreted=rows)
    assert status == (1 if INTERPRETED else 0)
    assert ("FAILED: interpreter layer wrong" in capsys.readouterr().out) == INTERPRETED


class _ScaledGradient(torch.autograd.Function):
    """Identity forward, gradient 10% too large: a backward kernel that is wrong while the forward is right."""
    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return 1.1 * grad


def _wrong_family(output=None, gradient=False):
    """nn.LSTM / nn.GRU made wrong: one output (index: 0 y, 1 h_n, 2 c_n) 10% too large, or y's gradient."""
    def build(problem):
        run = FAMILY_PROVIDERS[problem.cell][0].build(problem)

        def wrong():
            outputs = list(run())
            if output is not None:
                outputs[output] = 1.1 * outputs[output]
            if gradient:
                outputs[0] = _ScaledGradient.apply(outputs[0])
            return tuple(outputs)
        return wrong
    return build


def test_family_interpreter_checks_report_a_wrong_kernel(tmp_path, capsys):
    """The LSTM / GRU interpreter rows judge every output and gradient against nn's module in float64: a
    kernel wrong in y, in the LSTM's c_n alone, or in its backward alone fails its rows and the exit status."""
    from elman_triton.config import INTERPRETED
    wrong = {"y": _fake("wrong_y", _wrong_family(output=0), triton=True, ours=True),
             "c_n": _fake("wrong_c_n", _wrong_family(output=2), triton=True, ours=True),
             "grad": _fake("wrong_grad", _wrong_family(gradient=True), triton=True, ours=True)}
    rows = sweep.interpreter_checks(list(wrong.values()), shapes=sweep.FAMILY_INTERPRETER_SHAPES["lstm"])
    assert len(rows) == 3 * 2 * len(sweep.FAMILY_INTERPRETER_SHAPES["lstm"]) and {r["cell"] for r in rows} == {"lstm"}
    by = {(r["provider"], r["mode"]): r for r in rows}
    if not INTERPRETED:  # a GPU process: its kernels are compiled, not interpreted
        assert {r["status"] for r in rows} == {"not_run"}
        return
    for mode in ("inference", "training"):
        assert by["wrong_y", mode]["status"] == "failed" and by["wrong_y", mode]["err_y"] > 0.05
        c_n = by["wrong_c_n", mode]
        assert c_n["status"] == "failed" and "err_c_n" in c_n["reason"] and c_n["err_y"] < 1e-6
    assert by["wrong_grad", "inference"]["status"] == "passed"
    assert by["wrong_grad", "training"]["status"] == "failed" and by["wrong_grad", "training"]["err_grad"] > 0.05
    gru = sweep.interpreter_checks([wrong["y"]], shapes=sweep.FAMILY_INTERPRETER_SHAPES["gru"])
    assert {r["status"] for r in gru} == {"failed"} and all(r.get("err_c_n") is None for r in gru)
    status = cli.report_to_stdout([], [], list(wrong.values()), tmp_path, [], torch.device("cpu"), interpreted=rows)
    assert status == 1 and "FAILED: interpreter layer wrong_c_n" in capsys.readouterr().out


def test_family_persistent_rows_say_where_the_kernels_do_not_hold_the_cell():
    """Beyond persistent's kernels (fp32 LSTM H = 200: next_pow2(H) above CELL_LARGE_H_MAX) the interpreter
    rows of lstm_persistent are 'unsupported' with the launcher's ValueError, not failed, and nothing runs."""
    from elman_triton.config import INTERPRETED
    (provider,) = [p for p in FAMILY_INTERPRETER_PROVIDERS["lstm"] if p.name == "lstm_persistent"]
    shape = Shape("fp32", 2, 2, 200, 3, "lstm")
    rows = sweep.interpreter_checks([provider], shapes=(shape,))
    assert [(r["mode"], r["kernel"]) for r in rows] == [("inference", "large-H kernel"), ("training", "large-H kernel")]
    if not INTERPRETED:  # a GPU process: its kernels are compiled, not interpreted
        assert {r["status"] for r in rows} == {"not_run"}
        return
    for r in rows:
        assert r["status"] == "unsupported" and "err_y" not in r, r
        assert r["reason"].startswith("ValueError: backend='persistent' does not hold the LSTM at H=200"), r


def test_family_rows_name_the_backend_auto_runs():
    """The LSTM / GRU rows' backend says what elman_triton.family's auto runs at the shape: on CUDA the persistent
    kernels where persistent.cell_supports holds the cell (the anchor LSTM H = 768 in bf16: the large-H kernel),
    stepwise beyond them (H = 2048), on CPU torch's own kernel; persistent's rows name its kernel."""
    auto, cuda = FAMILY_PROVIDERS["lstm"][1], torch.device("cuda")
    anchor, beyond = Shape("bf16", 1024, 16, 768, 768, "lstm"), Shape("bf16", 1024, 16, 2048, 2048, "lstm")
    held = persistent.cell_supports(4, 768, torch.bfloat16, cuda if CUDA else None)
    assert held or CUDA  # the interpreter holds every H within CELL_LARGE_H_MAX
    name = "elman_triton.family.LSTM(backend='auto')"
    assert auto.describe(anchor, cuda) == f"{name} -> {'persistent' if held else 'stepwise'}"
    assert auto.describe(beyond, cuda) == f"{name} -> stepwise"
    assert auto.describe(anchor, torch.device("cpu")) == f"{name} -> torch.lstm, native CPU kernel"
    gru = FAMILY_INTERPRETER_PROVIDERS["gru"][1]
    assert gru.describe(Shape("fp32", 5, 3, 17, 11, "gru"), cuda).endswith("one launch per sequence (small-H kernel)")
    assert gru.describe(Shape("fp32", 5, 3, 33, 11, "gru"), cuda).endswith("one launch per sequence (large-H kernel)")


def test_family_rows_and_their_exit_status(tmp_path, monkeypatch):
    """--family lstm runs the LSTM alone (no Elman rows, interpreter rows or module rows), forward and fwd+bwd
    of --modes; ours failing verification there fails the run, the baseline failing does not."""
    argv = ["--out", str(tmp_path), *TINY, "--family", "lstm", "--verify-only", "--modes", "forward", "backward"]
    monkeypatch.setitem(cli.FAMILY_INTERPRETER_PROVIDERS, "lstm", ())  # the interpreter's rows: the test above
    assert cli.main(argv) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert {(r["cell"], r["provider"], r["mode"], r["status"]) for r in doc["rows"]} == {
        ("lstm", "torch_lstm", "forward", "verified"), ("lstm", "lstm_auto", "forward", "verified")}
    assert doc["module_rows"] == [] and doc["metadata"]["cells"] == ["lstm"]
    assert [t["target"] for t in doc["targets"]] == [t.name for t in report.FAMILY_TARGETS]
    baseline, ours = FAMILY_PROVIDERS["lstm"]
    monkeypatch.setitem(cli.FAMILY_PROVIDERS, "lstm", (dataclasses.replace(baseline, build=_wrong_family(0)), ours))
    assert cli.main(argv) == 0
    monkeypatch.setitem(cli.FAMILY_PROVIDERS, "lstm", (baseline, dataclasses.replace(ours, build=_wrong_family(2))))
    assert cli.main(argv) == 1
    assert "**failed**: lstm_auto forward LSTM fp32 T=8 B=2 H=32" in (tmp_path / "summary.md").read_text()


def test_family_flag_and_shapes():
    """--family takes commas or words; the LSTM / GRU run the Elman grid (on CPU its largest shape only), the
    LSTM on a GPU with bf16 starting with the anchor H=768, B=16, T=1024."""
    def family(*argv, device="cuda"):
        args = cli.parse_args(list(argv))
        return args.family, cli.family_shapes(args, torch.device(device), cli.sweep_shapes(args, torch.device(device)))
    cells, shapes = family("--standard")
    assert cells == ["elman", "lstm", "gru"] and list(shapes) == ["lstm", "gru"]
    assert shapes["lstm"][0] == Shape("bf16", 1024, 16, 768, 768, "lstm") and len(shapes["lstm"]) == 17
    assert len(shapes["gru"]) == 16 and {s.cell for s in shapes["gru"]} == {"gru"}
    assert {(s.B, s.H) for s in shapes["gru"]} == set(report.TARGET_GRID)
    assert family("--standard", "--family", "lstm,gru", "--batch", "16", "--hidden", "768")[1]["lstm"] == [
        Shape("bf16", 1024, 16, 768, 768, "lstm")]  # the anchor once
    assert family("--family", "elman") == (["elman"], {})
    assert family("--family", "gru", "elman,gru")[0] == ["gru", "elman"]
    fp16 = family("--family", "lstm", "--dtype", "fp16")[1]["lstm"]  # no bf16 in the run: no anchor
    assert len(fp16) == 4 and {s.dtype for s in fp16} == {"fp16"}
    cells, shapes = family(device="cpu")
    assert {cell: [(s.T, s.B, s.H) for s in v] for cell, v in shapes.items()} == {"lstm": [(32, 8, 64)],
                                                                                 "gru": [(32, 8, 64)]}
    with pytest.raises(SystemExit):
        cli.parse_args(["--family", "lstm,rnn"])


def test_exit_status_is_1_when_our_provider_fails_verification(tmp_path, monkeypatch):
    monkeypatch.setitem(cli.PROVIDERS, "auto", dataclasses.replace(PROVIDERS["auto"], build=_scaled_reference))
    status = cli.main(["--out", str(tmp_path), *TINY, "--providers", "eager", "auto", "--modes", "forward",
                       "--family", "elman"])
    assert status == 1
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["provider"]: r["status"] for r in rows} == {"eager": "ok", "auto": "failed"}
    assert "**failed**: auto forward" in (tmp_path / "summary.md").read_text()


def test_presets_and_overrides():
    def shapes(*argv):
        return cli.sweep_shapes(cli.parse_args(list(argv)), torch.device("cuda"))
    standard = shapes("--standard")
    assert len(standard) == 16 and {(s.dtype, s.T) for s in standard} == {("bf16", 1024)}
    assert all(s.D == s.H for s in standard)
    assert len(shapes("--full")) == 3 * 5 * 4 * 3
    assert shapes("--standard", "--batch", "16", "--hidden", "1024", "--input-size", "64", "128") == [
        Shape("bf16", 1024, 16, 1024, 64), Shape("bf16", 1024, 16, 1024, 128)]
    quick_cpu = cli.sweep_shapes(cli.parse_args([]), torch.device("cpu"))
    assert {s.dtype for s in quick_cpu} == {"fp32"} and max(s.T for s in quick_cpu) <= 64


def test_family_targets_and_derived_figures():
    """The LSTM anchor (H=768, B=16, T=1024): PASS at cuDNN's speed or better, a MISS below it, NOT MEASURED
    naming the baseline when nn.LSTM failed; speedups are over the row's own torch module (nn.LSTM, not
    nn.RNN at the same shape) and never over the Elman eager loop; FLOPs and weights count the gates."""
    def rows(speedup, fwd_bwd_speedup=1.5, base_status="ok"):
        def row(cell, provider, mode, ms, status="ok"):
            return {"cell": cell, "provider": provider, "mode": mode, "dtype": "bf16", "T": 1024, "B": 16, "H": 768,
                    "D": 768, "status": status, "median_ms": ms, "reason": "cuDNN refused bf16"}
        return [row("lstm", "lstm_auto", "forward", 2.0),
                row("lstm", "torch_lstm", "forward", 2.0 * speedup, base_status),
                row("lstm", "lstm_auto", "fwd_bwd", 4.0), row("lstm", "torch_lstm", "fwd_bwd", 4.0 * fwd_bwd_speedup),
                row("elman", "torch_rnn", "forward", 1.0), row("elman", "eager", "forward", 100.0)]
    targets = report.targets_for(["lstm"])
    assert targets == report.FAMILY_TARGETS and report.targets_for(["elman", "gru"]) == report.TARGETS
    assert [t["result"] for t in report.evaluate_targets(rows(1.2), targets)] == ["PASS", "PASS"]
    results = report.evaluate_targets(rows(0.5), targets)
    assert [t["result"] for t in results] == ["MISS", "PASS"] and results[0]["value"] == pytest.approx(0.5)
    failed = report.evaluate_targets(rows(1.2, base_status="failed"), targets)
    assert failed[0]["result"] == "NOT MEASURED"
    assert "torch_lstm failed at B=16,H=768: cuDNN refused" in failed[0]["detail"]
    assert [t["result"] for t in report.evaluate_targets(rows(1.2))] == ["NOT MEASURED"] * 6  # the Elman targets

    machine = {"matmul_tflops": {"bf16": 1.0}, "copy_gbps": 1.0, "barrier_us": None}
    derived = rows(0.5)
    report.add_derived(derived, machine)
    ours = derived[0]
    assert ours["speedup_vs_torch_rnn"] == pytest.approx(0.5) and ours["speedup_vs_eager"] is None
    assert ours["tflops"] == pytest.approx(4 * report.forward_flops(1024, 16, 768, 768) / 2e-3 / 1e12)
    assert report.min_bytes("forward", "bf16", 8, 2, 4, 3, gates=4) - report.min_bytes("forward", "bf16", 8, 2, 4, 3) \
        == 2 * 3 * (4 * (3 + 4) + 2 * 4)


def test_flops_bytes_and_floor():
    assert report.forward_flops(1024, 16, 1024, 1024) == 2 * 1024 * 16 * 1024 * 2048
    assert report.mode_flops("backward", 8, 2, 4, 3) == 2 * report.forward_flops(8, 2, 4, 3)
    assert report.mode_flops("fwd_bwd", 8, 2, 4, 3) == 3 * report.forward_flops(8, 2, 4, 3)
    T, B, H, D = 8, 2, 4, 3
    forward = 2 * (T * B * D + T * B * H + H * (D + H) + 2 * H)
    assert report.min_bytes("forward", "bf16", T, B, H, D) == forward
    assert report.min_bytes("fwd_bwd", "bf16", T, B, H, D) == 3 * forward

    machine = {"matmul_tflops": {"bf16": 1.0}, "copy_gbps": 1.0, "barrier_us": None}
    f = report.floor("forward", "bf16", T, B, H, D, machine)
    assert f["floor_barrier_us"] is None
    assert f["floor_us"] == max(f["floor_compute_us"], f["floor_memory_us"])
    machine["barrier_us"] = 1.0
    assert report.floor("fwd_bwd", "bf16", 1024, 1, 1, 1, machine)["floor_us"] == pytest.approx(2048.0)


def test_geomean_and_rotation():
    assert report.geomean([1.0, 4.0]) == pytest.approx(2.0)
    assert report.geomean([]) is None
    assert rotation_count(set_bytes=10 << 20, cache_bytes=50 << 20, memory_budget=1 << 40) == 4
    assert rotation_count(set_bytes=100 << 20, cache_bytes=50 << 20, memory_budget=1 << 40) == 1
    assert rotation_count(set_bytes=40 << 20, cache_bytes=50 << 20, memory_budget=1 << 40) == 3
    assert rotation_count(set_bytes=10 << 20, cache_bytes=50 << 20, memory_budget=25 << 20) == 2


def _target_rows(speedup=3.0, fwd_bwd_speedup=2.0, step_us=1.0, eager_factor=100.0, memory_ratio=0.9,
                 grid=report.TARGET_GRID, override=None):
    """Synthetic rows for the target grid: auto against torch_rnn and eager, all ok."""
    rows = []
    for B, H in grid:
        def row(provider, mode, ms, mem=None):
            return {"provider": provider, "mode": mode, "dtype": "bf16", "T": 1024, "B": B, "H": H, "D": H,
                    "status": "ok", "median_ms": ms, "per_step_us": ms * 1e3 / 1024, "peak_train_mem_mib": mem}
        ours_ms = step_us * 1024 / 1e3
        rows += [row("auto", "forward", ours_ms), row("torch_rnn", "forward", ours_ms * speedup),
                 row("eager", "forward", ours_ms * eager_factor),
                 row("auto", "fwd_bwd", 1.0, mem=100 * memory_ratio),
                 row("torch_rnn", "fwd_bwd", fwd_bwd_speedup, mem=100)]
    for (provider, mode, B, H), fields in (override or {}).items():
        next(r for r in rows if (r["provider"], r["mode"], r["B"], r["H"]) == (provider, mode, B, H)).update(fields)
    return rows


def _results(rows):
    return [t["result"] for t in report.evaluate_targets(rows)]


def test_targets_pass_when_every_figure_meets_them():
    assert _results(_target_rows()) == ["PASS"] * 6


def test_targets_report_each_miss():
    # geomean still ≥ 2× but one shape slower than cuDNN: only "never slower" misses
    slow_one = _target_rows(override={("auto", "forward", 64, 2048): {"median_ms": 10.0, "per_step_us": 10e3 / 1024}})
    results = report.evaluate_targets(slow_one)
    assert [t["result"] for t in results][:2] == ["PASS", "MISS"]
    assert results[1]["value"] < 1.0
    assert _results(_target_rows(fwd_bwd_speedup=1.2))[2] == "MISS"
    assert _results(_target_rows(step_us=1.6))[3] == "MISS"
    assert _results(_target_rows(eager_factor=40))[4] == "MISS"
    assert _results(_target_rows(memory_ratio=1.1))[5] == "MISS"


def test_targets_missing_data_and_failures():
    partial = _target_rows(grid=report.TARGET_GRID[:4])
    assert _results(partial) == ["NOT MEASURED", "NOT MEASURED", "NOT MEASURED", "NOT MEASURED", "NOT MEASURED",
                                 "NOT MEASURED"]
    # a worst-case target is already missed on part of the grid
    partial_slow = _target_rows(grid=report.TARGET_GRID[:4], speedup=0.5)
    assert _results(partial_slow)[1] == "MISS"
    failed = _target_rows(override={("auto", "forward", 16, 1024): {"status": "failed"}})
    results = report.evaluate_targets(failed)
    assert [t["result"] for t in results] == ["MISS", "MISS", "PASS", "MISS", "MISS", "PASS"]
    assert "B=16,H=1024" in results[0]["detail"]
    assert _results([]) == ["NOT MEASURED"] * 6


def test_dispatch_check_finds_the_faster_backend_and_autos_choice():
    def row(provider, ms, B, backend=""):
        return {"provider": provider, "mode": "forward", "dtype": "bf16", "T": 1024, "B": B, "H": 1024, "D": 1024,
                "status": "ok", "median_ms": ms, "backend": backend}
    rows = [row("persistent", 1.0, 1), row("stepwise", 4.0, 1), row("auto", 1.1, 1, "elman_rnn auto -> persistent"),
            row("persistent", 3.0, 64), row("stepwise", 2.0, 64), row("auto", 3.0, 64, "elman_rnn auto -> persistent"),
            row("persistent", 1.0, 8), row("auto", 1.0, 8, "elman_rnn auto -> persistent")]  # no stepwise: skipped
    checks = report.dispatch_check(rows)
    assert [(c["B"], c["faster"], c["picked"]) for c in checks] == [(1, "persistent", "persistent"),
                                                                    (64, "stepwise", "persistent")]
    assert checks[0]["ratio"] == 4.0 and checks[1]["auto_over_best"] == 1.5
    text = "\n".join(report.dispatch_markdown(checks))
    assert "auto ran the faster Triton backend in 1 of 2" in text and "persistent ✗" in text
    assert "not checked" in report.dispatch_markdown([])[0]


def test_barrier_figures_in_the_summary():
    machine = {"barrier_us": 0.9, "barrier_note": "measured", "barrier_us_by_programs": {16: 0.5, 128: 0.85}}
    assert report._barrier_text(machine) == "0.9 µs (measured); 16 programs 0.5 µs, 128 programs 0.85 µs"
    assert report._barrier_text({"barrier_us": None, "barrier_note": "unavailable: no GPU"}) == "unavailable: no GPU"


def test_cpu_timer_warms_up_until_stable():
    """One-off slow calls at the start (first-call dispatch, lazy initialisation) stay out of the
    samples: a single warm-up call would leave two 40 ms calls among three or more 2 ms ones."""
    calls = []

    def fn():
        calls.append(None)
        time.sleep(0.04 if len(calls) <= 3 else 0.002)
    timing = make_timer(torch.device("cpu"), rep_ms=50)(fn, ())
    assert timing.median_ms < 15 and timing.q80_ms < 15
    assert timing.calls == len(calls) > 3


def test_host_overhead_script_times_the_launchers():
    """benchmarks/host_overhead.py keeps working as the launchers change: it binds their arguments by
    name and stubs every kernel they hold. (Its '+ Triton' level compiles for sm_90a: not run here.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/host_overhead.py", "--level", "launcher", "--repeats", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| stepwise")
            or line.startswith("| persistent")]
    assert len(rows) == 4 and all(math.isfinite(float(r[2])) for r in rows), proc.stdout  # per-step: a difference


def test_runs_without_the_bench_extras(monkeypatch, tmp_path, capsys):
    """A GPU image without network may lack tqdm and matplotlib: the sweep prints its progress
    instead, and the run writes everything but the plots."""
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    shapes = [Shape("fp32", 4, 2, 16, 16), Shape("fp32", 4, 2, 32, 32)]
    assert list(sweep.progress(shapes, lambda s: f"H={s.H}")) == shapes
    assert "sweep 2/2: H=32" in capsys.readouterr().out
    assert report.write_plots(tmp_path, []) is None
    threads = torch.get_num_threads()
    status = cli.main(["--out", str(tmp_path), *TINY, "--providers", "eager", "--modes", "forward",
                       "--no-module-rows", "--family", "elman"])
    assert status == 0 and (tmp_path / "summary.md").exists() and not list(tmp_path.glob("*.png"))
    # a GPU run has nothing to plot with; a CPU run plots nothing anyway
    expected = "no plots (matplotlib is not installed)" if CUDA else f"no plots ({report.CPU_NOTE})"
    assert expected in capsys.readouterr().out
    assert torch.get_num_threads() == threads  # the CPU run's one thread does not outlive it


def test_interpreter_is_turned_on_only_without_a_gpu(monkeypatch):
    """The CLI makes a CPU process run the Triton kernels in the interpreter, so it can verify them: it
    sets TRITON_INTERPRET=1 when elman_triton is not imported yet, says it is too late (changing
    nothing; python -m elman_triton.bench then starts again) when it is, and leaves a GPU process alone."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "elman_triton" in sys.modules
    assert benchmarks.interpret_without_gpu() is (not CUDA) and "TRITON_INTERPRET" not in os.environ
    monkeypatch.delitem(sys.modules, "elman_triton")
    assert benchmarks.interpret_without_gpu() is False
    assert os.environ.get("TRITON_INTERPRET") == (None if CUDA else "1")


def test_the_suite_ships_as_elman_triton_bench():
    """pyproject maps benchmarks/ to elman_triton.bench and names the elman-bench command, so an install
    (regular or editable) runs the suite from any folder."""
    text = (REPO / "pyproject.toml").read_text()
    assert '"elman_triton.bench" = "benchmarks"' in text and '"elman_triton.bench"]' in text
    assert 'elman-bench = "elman_triton.bench.__main__:main"' in text


@pytest.mark.skipif(importlib.util.find_spec("elman_triton.bench") is None,
                    reason="installed before benchmarks/ shipped as elman_triton.bench: pip install -e .")
def test_runs_from_any_folder(tmp_path):
    """Installed, the suite is elman_triton.bench: python -m elman_triton.bench runs outside the checkout,
    and on CPU still checks the Triton kernels in the interpreter (that import of the package comes
    before the CLI can set TRITON_INTERPRET, so the CLI starts the process again with it set)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "elman_triton.bench", "--out", "out", *TINY, "--verify-only",
                           "--providers", "eager", "stepwise", "--modes", "forward", "--no-module-rows",
                           "--family", "elman"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["metadata"]["command"].startswith("python -m elman_triton.bench ")
    if not CUDA:
        assert {r["status"] for r in doc["interpreter_rows"]} == {"passed"}
        assert "verification of the Triton kernels in Triton's interpreter" in proc.stdout
