"""Every kernel compiles for sm_90a (H100/H200) in the configurations the dispatcher launches, without
register spills. Runs on CPU: Triton compiles to PTX and its bundled ptxas reports registers. One to
three minutes of one core; marked sm90, so `python -m pytest -m "not sm90"` skips it (CI runs it)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.sm90

SCRIPT = Path(__file__).with_name("compile_sm90.py")


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_every_kernel_compiles(reports):
    names = {r["kernel"] for r in reports}
    assert names == {"elman_step_fwd_kernel", "elman_step_bwd_kernel",
                     "elman_persistent_small_fwd_kernel", "elman_persistent_small_bwd_kernel",
                     "elman_persistent_large_fwd_kernel", "elman_persistent_large_bwd_kernel",
                     "barrier_loop_kernel", "rnn_step_fwd_kernel", "rnn_step_bwd_kernel",
                     "rnn_persistent_small_fwd_kernel", "rnn_persistent_small_bwd_kernel",
                     "rnn_persistent_large_fwd_kernel", "rnn_persistent_large_bwd_kernel"}


def test_every_cell_compiles(reports):
    """The cell-generic kernels are compiled as GRU (CELL = 3) and LSTM (4), forward and backward."""
    cells = {(r["kernel"], r["CELL"]) for r in reports if r["kernel"].startswith("rnn_")}
    assert cells == {(kernel, cell) for kernel in ("rnn_step_fwd_kernel", "rnn_step_bwd_kernel",
                                                   "rnn_persistent_small_fwd_kernel", "rnn_persistent_small_bwd_kernel",
                                                   "rnn_persistent_large_fwd_kernel", "rnn_persistent_large_bwd_kernel")
                     for cell in (3, 4)}


def test_report_registers_of_the_cells(reports):
    """Prints the GRU / LSTM rows (pytest -s shows them): kernel, CELL, dtype, BH, aligned, registers,
    spill bytes, local-memory instructions in loops."""
    rows = [(r["kernel"], r["CELL"], r["dtype"], r.get("BH"), r.get("HAS_LENGTHS"), r["aligned"], r["regs"],
             r["spills"], r["loop_spill_ops"]) for r in reports if r["kernel"].startswith("rnn_")]
    for row in rows:
        print(*row)
    assert all(0 < row[6] <= 255 for row in rows), rows


# Spills that the SASS shows today, accepted with a reason: {key: (spill bytes, local-memory
# instructions inside loops)}; any other, or more, fails. The fp32 (ieee) large-H forward at BH = 1024
# on Triton 3.6 (either alignment): ptxas holds it to 64 registers (of the 128 that 16 warps
# allow), spills 16 bytes and reloads three loop-invariant scalars (the h0 base and row strides) once
# per step, beside ≈ 1000 FMA-path instructions; Triton 3.9's build spills nothing. (The 16-bit
# forward with lengths at BH = 2048, H and B not multiples of 16, had 55 spill instructions per step
# until issue 14's rewrite of the state load.)
# The bf16 GRU persistent-small forward at its limit BH = 128 (aligned) on Triton 3.6: 4 bytes spilled,
# touched in the prologue only (benchmarks/NOTES.md, LSTM/GRU section); Triton 3.9's build spills nothing.
KNOWN_SPILLS = {**{("elman_persistent_large_fwd_kernel", "fp32", 1024, 1, aligned, False): (16, 3)
                   for aligned in (True, False)},
                ("rnn_persistent_small_fwd_kernel", "bf16", 128, 3, True, False): (4, 0)}


def key(report):
    return (report["kernel"], report["dtype"], report.get("BH"), report.get("CELL", 1), report["aligned"],
            report.get("HAS_LENGTHS", False))


def test_no_spill_traffic_in_loops(reports):
    """Spills that only the prologue touches (the one-time load of a 256×256 W_hh block when H is not
    a multiple of 16, say) cost once per launch; spill loads or stores inside the time loop cost every
    step, and must not be there."""
    spilling = [r for r in reports if r["loop_spill_ops"] > KNOWN_SPILLS.get(key(r), (0, 0))[1]]
    assert not spilling, spilling


def test_no_spills_where_loads_vectorise(reports):
    """With H and B multiples of 16 nothing spills at all, prologue included (but KNOWN_SPILLS)."""
    spilling = [r for r in reports if r["aligned"] and r["spills"] > KNOWN_SPILLS.get(key(r), (0, 0))[0]]
    assert not spilling, spilling


def test_both_alignments_compiled(reports):
    """Every configuration is compiled as Triton's runtime specialises it for H and B multiples of 16
    (vectorised loads) and for other sizes."""
    assert {r["aligned"] for r in reports} == {True, False}
    assert sum(r["aligned"] for r in reports) * 2 == len(reports)


def test_unaligned_H_keeps_the_aligned_load_width(reports):
    """H (and B) not a multiple of 16, H = 1000 say: the package pads its buffers' rows and the h0 and
    W_hh rows to a multiple of 16, so every kernel's per-step loads have the widths of the aligned
    compile (16-byte vectors, not one element at a time)."""
    by_config = {}
    for r in reports:
        config = tuple((k, v) for k, v in r.items() if k not in ("aligned", "regs", "spills", "loop_spill_ops",
                                                                 "loop_loads", "step_instructions",
                                                                 "acquire_poll_loops"))
        by_config.setdefault(config, {})[r["aligned"]] = r
    differing = {config: (pair[True]["loop_loads"], pair[False]["loop_loads"]) for config, pair in by_config.items()
                 if pair[False]["loop_loads"] not in (pair[True]["loop_loads"],
                                                      KNOWN_NARROW_LOADS.get(key(pair[False])))}
    assert not differing, differing


# Per-step loads narrower with H unaligned than aligned, accepted with a reason: {key of the unaligned
# report: its loop_loads}. The GRU persistent-small backward (kernels/persistent_small.py) loads h0 at a
# row's first step under the mask o_h < H (m_bh), not the padded row's o_h < Hp (m_store) that its other
# per-step loads use, so with H unaligned that load goes one bf16 at a time (8 LDG.U16 per step, both
# Triton versions) and is not pipelined (the LSTM's c0 load, under the same mask but fp32, shows no
# narrowing). Masking that load at Hp (the launcher pads h0's rows) removes the narrow load but makes the
# fp64 backward spill inside its loop on Triton 3.9 (unaligned, at the register cap): kept as it is.
KNOWN_NARROW_LOADS = {("rnn_persistent_small_bwd_kernel", "bf16", 128, 3, False, False): {"16": 8}}


BARRIER_KERNELS = ("elman_persistent_large_fwd_kernel", "elman_persistent_large_bwd_kernel", "barrier_loop_kernel",
                   "rnn_persistent_large_fwd_kernel", "rnn_persistent_large_bwd_kernel")


def test_every_grid_barrier_polls_with_acquire(reports):
    """In every specialisation compiled of a kernel with a grid barrier, the barrier's poll loop reads
    with acquire semantics in the PTX (`ld.global.gpu.acquire`), so the step's reads of other
    programs' data are ordered after the barrier. Triton erases an acquire whose result is unused
    (barrier.py once had such a "one acquire after the loop": it was in no binary)."""
    barriers = [r for r in reports if r["kernel"] in BARRIER_KERNELS]
    assert {r["kernel"] for r in barriers} == set(BARRIER_KERNELS)
    missing = [key(r) + (r.get("FLIP"),) for r in barriers if r["acquire_poll_loops"] < 1]
    assert not missing, missing


# SASS instructions per warp per step of the 16-bit large-H kernels without lengths (compile_sm90's
# step_instructions: the time loop from its head to its backward branch, each branch and the
# barrier's poll loop counted once), both alignments: the larger of Triton 3.6's and 3.9's counts
# when recorded, rounded up, as a ceiling that catches per-step work creeping back in (issue 14: the
# forward at H = 1024 had 630, 64-bit row addresses recomputed every step). See benchmarks/NOTES.md,
# "SASS instructions per step (large-H kernels)". The forward at 1024 also meets its goal, ≤ 350.
STEP_INSTRUCTIONS = {("elman_persistent_large_fwd_kernel", 1024): 350,
                     ("elman_persistent_large_bwd_kernel", 1024): 340,
                     ("elman_persistent_large_fwd_kernel", 2048): 410,
                     ("elman_persistent_large_bwd_kernel", 2048): 400}


def test_large_h_steps_stay_within_their_instruction_counts(reports):
    counted = {(r["kernel"], r["BH"], r["dtype"], r["aligned"]): r["step_instructions"] for r in reports
               if (r["kernel"], r.get("BH")) in STEP_INSTRUCTIONS and r["dtype"] in ("bf16", "fp16")
               and not r.get("HAS_LENGTHS")}
    print("SASS instructions per step:", counted)
    assert len(counted) == 16
    over = {k: (n, STEP_INSTRUCTIONS[k[:2]]) for k, n in counted.items() if n > STEP_INSTRUCTIONS[k[:2]]}
    assert not over, over


def programs_per_sm(report):
    threads = 32 * report["num_warps"]
    return 65536 // (-(-report["regs"] // 8) * 8 * threads)


@pytest.mark.parametrize("BH", [1024, 2048])
def test_unaligned_H_keeps_the_occupancy_of_1024_and_2048(reports, BH):
    """The 16-bit large-H kernels at H = 1000 and 2000 hold as many programs per SM as at 1024 and 2048
    (before the padding, H = 1000 took 193 registers against 96: half the programs)."""
    for kernel in ("elman_persistent_large_fwd_kernel", "elman_persistent_large_bwd_kernel"):
        for dtype in ("bf16", "fp16"):
            pair = {r["aligned"]: r for r in reports if (r["kernel"], r["dtype"], r.get("BH")) == (kernel, dtype, BH)
                    and not r.get("HAS_LENGTHS")}
            assert programs_per_sm(pair[False]) == programs_per_sm(pair[True]), (kernel, dtype, pair)


# SASS instructions per warp per step of the cells' large-H kernels at the 16-bit limit BH = 1024 (the anchor
# LSTM H = 768), bf16, no lengths, both alignments: the larger of Triton 3.6's and 3.9's counts, rounded up, as
# a ceiling (benchmarks/NOTES.md, "LSTM and GRU on the persistent large-H kernel"). A forward step is one
# batch tile of 16 rows; a backward step both phases of one tile of 8.
CELL_STEP_INSTRUCTIONS = {("rnn_persistent_large_fwd_kernel", 4): 560, ("rnn_persistent_large_bwd_kernel", 4): 720,
                          ("rnn_persistent_large_fwd_kernel", 3): 540, ("rnn_persistent_large_bwd_kernel", 3): 590}


def test_cell_large_h_steps_stay_within_their_instruction_counts(reports):
    counted = {(r["kernel"], r["CELL"], r["aligned"]): r["step_instructions"] for r in reports
               if (r["kernel"], r.get("CELL")) in CELL_STEP_INSTRUCTIONS and r.get("BH") == 1024
               and r["dtype"] == "bf16" and not r.get("HAS_LENGTHS")}
    print("SASS instructions per step (cells):", counted)
    assert len(counted) == 8
    over = {k: (n, CELL_STEP_INSTRUCTIONS[k[:2]]) for k, n in counted.items() if n > CELL_STEP_INSTRUCTIONS[k[:2]]}
    assert not over, over
