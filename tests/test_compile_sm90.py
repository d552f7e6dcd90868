"""Every kernel compiles for sm_90a (H100/H200) in the configurations the dispatcher launches, without
register spills. Runs on CPU: Triton compiles to PTX and its bundled ptxas reports registers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
                     "barrier_loop_kernel"}


# Spills ptxas reports today, accepted with a reason; any other spill, or a larger one, fails.
# bf16 large-H backward at BH = 2048 when H is not a multiple of 16 (1030 ≤ H ≤ 2047, say): the loads
# of a dz row cannot vectorise, so each thread holds 64 element addresses against the 128-register cap
# of 16 warps. Accepted for K_SPLIT's 8× shorter mma chain; H a multiple of 16 does not spill.
KNOWN_SPILLS = {("elman_persistent_large_bwd_kernel", "bf16", 2048, False): 40}


def test_no_register_spills(reports):
    spilling = [r for r in reports
                if r["spills"] > KNOWN_SPILLS.get((r["kernel"], r["dtype"], r.get("BH"), r["aligned"]), 0)]
    assert not spilling, spilling


def test_both_alignments_compiled(reports):
    """Every configuration is compiled as Triton's runtime specialises it for H and B multiples of 16
    (vectorised loads) and for other sizes."""
    assert {r["aligned"] for r in reports} == {True, False}
    assert sum(r["aligned"] for r in reports) * 2 == len(reports)
