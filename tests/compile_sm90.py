"""Compile every kernel for sm_90a (H100/H200) without a GPU and report registers and spills.

The interpreter never compiles anything, so it cannot catch GPU-only failures: a kernel that does
not lower (type clashes between branches, the grid barrier's atomics, inline PTX), or a tile choice
that spills registers to local memory. Triton ships ptxas and cuobjdump, so this runs on any
machine. Registers and spill bytes come from the report of Triton's own ptxas run (its
TRITON_DUMP_PTXAS_LOG), so they describe the binary Triton builds, with the ptxas and flags Triton
picks for the arch (Triton 3.9: `ptxas-blackwell`, the only one that reads its PTX 9.x, with
--regAllocOptLevel=2); the SASS of that binary says whether any spill traffic is inside a loop (the
time loop: paid every step) or only in the prologue (paid once per launch). It must run without
TRITON_INTERPRET; tests/test_compile_sm90.py starts it in a subprocess.

    python tests/compile_sm90.py [REGEX]   # one JSON object per line: kernel, config, regs, spills, loop_spill_ops,
                                           # loop_loads, step_instructions, acquire_poll_loops
"""
import contextlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from elman_triton import persistent, stepwise
from elman_triton.config import FP_FUSION
from elman_triton.kernels import barrier, persistent_large, persistent_small
from elman_triton.kernels import stepwise as stepwise_kernels

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = knobs.nvidia.cuobjdump.path
TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
# fp32 (fp64) buffers: the bias, the state-gradient carries, and the LSTM/GRU cell's aux rows (LSTM's c_t,
# GRU's h W_hnᵀ + b_hn), c0 and the c-gradient carries (elman_triton/family_ops.py allocates them so).
ACCUMULATOR_POINTERS = {"p_bias", "p_dh", "p_dh0", "p_dh_next", "p_aux", "p_c0", "p_dc", "p_dc0", "p_dc_next"}
# Strides of the package's own buffers (sequence buffers, dy shaped like them, the dh carries, the h0
# and W_hh rows the launcher pads, the family's Xp / gates and dz rows): their
# rows are padded to a multiple of 16 elements (config.padded), so Triton's runtime specialises them
# as divisible by 16 whatever H is.
PADDED_STRIDES = ("stride_y_", "stride_dy_t", "stride_dy_b", "stride_dy_d", "stride_dh_", "stride_h0_", "stride_w_",
                  "stride_x_", "stride_z_")


def signature(kernel, dtype, constexprs, aligned):
    """Triton's signature for a launch with contiguous tensors, specialised as Triton's runtime does:
    unit strides along H become the constant 1, other ints are i32, pointers are typed. aligned: H
    and B are multiples of 16, so (as at run time) every pointer and int argument except the
    do_not_specialize ones carries tt.divisibility=16, which lets loads vectorise. Unaligned (H=1000,
    say): H, B and the user tensors' strides lose it, the padded buffers' strides keep it."""
    storage, acc = TRITON_DTYPE[dtype], "fp64" if dtype == torch.float64 else "fp32"
    sig, consts, attrs = {}, dict(constexprs), {}
    for index, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name in ("p_barrier", "p_words"):
            sig[name] = "*i32"
        elif name == "p_len":
            sig[name] = "*i64"
        elif name.startswith("p_"):
            sig[name] = "*" + (acc if name in ACCUMULATOR_POINTERS else storage)
        elif name.startswith("stride_") and name.endswith(("_h", "_k")):
            sig[name], consts[name] = "constexpr", 1
            continue
        else:
            sig[name] = "i32"
        padded = name.startswith(("p_",) + PADDED_STRIDES)  # pointers: the allocator aligns them
        if (aligned or padded) and name not in kernel.do_not_specialize:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_and_count(kernel, dtype, num_warps, aligned, **constexprs):
    """(registers, spill bytes, local-memory instructions inside loops) of one configuration."""
    sig, consts, attrs = signature(kernel, dtype, constexprs, aligned)
    # fp fusion as every launch chooses it (config.with_fp_fusion), not left to Triton's default
    options = dict(num_warps=num_warps, launch_cooperative_grid="USE_BARRIER" in constexprs, enable_fp_fusion=FP_FUSION)
    report = io.StringIO()
    with contextlib.redirect_stdout(report):  # Triton prints its ptxas -v log (dump_ptxas_log, set in main)
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs), target=TARGET,
                                  options=options)
    report = report.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([CUOBJDUMP, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return dict(regs=regs, spills=spills, loop_spill_ops=local_memory_ops_in_loops(sass),
                loop_loads=global_loads_in_loops(sass), step_instructions=instructions_per_step(sass),
                acquire_poll_loops=acquire_poll_loops(compiled.asm["ptx"]))


def sass_instructions(sass):
    """[(address, text)] of every SASS instruction."""
    return [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]


def sass_loops(instructions):
    """[(first, last address)] of every loop: the span from a backward branch's target to the branch
    (`BRA 0x..`, `BRA P3, 0x..` with a second predicate, `BRA `(.L_x_1) 0x..`)."""
    loops = []
    for address, text in instructions:
        branch = re.search(r"\bBRA\s+(?:`\(\S+\)\s*|!?U?P\d+\s*,\s*)?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            loops.append((int(branch.group(1), 16), address))
    return loops


def instructions_in_loops(sass):
    """The SASS instructions inside a loop. Outside every loop they run once per launch; inside the
    time loop, every step."""
    instructions = sass_instructions(sass)
    loops = sass_loops(instructions)
    return [text for address, text in instructions if any(lo <= address <= hi for lo, hi in loops)]


def instructions_per_step(sass):
    """SASS instructions (per warp) between the head of the outermost loop and its backward branch: for
    the persistent kernels the time loop, so one step's code with every branch of it (the batch-tile
    loop and the barrier's poll loop once). 0 without a loop."""
    instructions = sass_instructions(sass)
    spans = sass_loops(instructions)
    if not spans:
        return 0
    lo, hi = max(spans, key=lambda span: span[1] - span[0])
    return sum(1 for address, _ in instructions if lo <= address <= hi)


def acquire_poll_loops(ptx):
    """How many innermost PTX loops (a label up to a later `bra` back to it, holding no other loop)
    read with acquire semantics (ld...acquire / atom...acquire): a grid barrier's poll loop whose
    polls are acquires. An acquire whose result is unused is erased, so this reads the PTX."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\$\w+):", line))}
    loops = []
    for i, line in enumerate(lines):
        branch = re.search(r"\bbra(?:\.uni)?\s+(\$\w+);", line)
        if branch and labels.get(branch.group(1), i) < i:
            loops.append((labels[branch.group(1)], i))
    innermost = [(lo, hi) for lo, hi in loops if not any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in loops)]
    return sum(1 for lo, hi in innermost
               if any(re.search(r"\b(ld|atom)\.[\w.]*\bacquire\b", line) for line in lines[lo:hi + 1]))


def local_memory_ops_in_loops(sass):
    """How many local-memory instructions (STL/LDL: spills and their reloads) sit inside a loop."""
    return sum(1 for text in instructions_in_loops(sass) if re.search(r"\b(STL|LDL)\b", text))


def global_loads_in_loops(sass):
    """{width: count} of the global loads inside loops, width in bits ("LDG.E.128" → 128, "LDG.E.U16"
    → 16, "LDG.E" → 32): whether the loads of each step vectorise."""
    widths = {}
    for text in instructions_in_loops(sass):
        load = re.search(r"\bLDG\.E((?:\.\w+)*)", text)
        if load:
            sizes = [int(n) for n in re.findall(r"\.(?:U|S)?(\d+)", load.group(1))]
            width = str(sizes[0] if sizes else 32)
            widths[width] = widths.get(width, 0) + 1
    return widths


def configurations():
    """The launch configurations the dispatcher uses, at the sizes that stress registers most."""
    half = (torch.bfloat16, torch.float16)
    for dtype, precision in ((torch.bfloat16, "ieee"), (torch.float16, "ieee"), (torch.float32, "ieee"),
                             (torch.float32, "tf32"), (torch.float64, "ieee")):
        math = dict(ACT=0, PRECISION=precision, UPCAST=False)
        fast = dict(math, FAST_TANH=dtype in half)
        BB, BN, BK = stepwise.block_sizes(64, 1024)
        math = dict(math, HAS_LENGTHS=False, REVERSE=False)
        fast = dict(fast, HAS_LENGTHS=False, REVERSE=False)
        yield stepwise_kernels.elman_step_fwd_kernel, dtype, stepwise.NUM_WARPS, dict(fast, HAS_BIAS=True, BB=BB, BN=BN, BK=BK)
        yield stepwise_kernels.elman_step_bwd_kernel, dtype, stepwise.NUM_WARPS, dict(math, BB=BB, BN=BN, BK=BK)
        small = dict(BB=persistent.BB, BH=persistent.SMALL_H_MAX[dtype])
        yield (persistent_small.elman_persistent_small_fwd_kernel, dtype, persistent._num_warps_small(dtype),
               dict(fast, **small, HAS_BIAS=True))
        yield persistent_small.elman_persistent_small_bwd_kernel, dtype, persistent._num_warps_small(dtype), dict(math, **small)
        largest = {torch.bfloat16: 2048, torch.float16: 2048, torch.float32: 1024, torch.float64: 512}[dtype]
        for BH in sorted({256, min(1024, largest), largest}):
            warps = persistent._num_warps_large(BH, dtype)
            large = dict(USE_BARRIER=True, FLIP=True, BB=persistent.BB, BN=persistent.BN, BH=BH,
                         K_SPLIT=persistent._k_split(BH, warps))
            yield (persistent_large.elman_persistent_large_fwd_kernel, dtype, warps,
                   dict(fast, **large, HAS_BIAS=True))
            yield persistent_large.elman_persistent_large_bwd_kernel, dtype, warps, dict(math, **large)
            if BH == largest and dtype == torch.bfloat16:  # variable lengths: the per-row state select
                yield (persistent_large.elman_persistent_large_fwd_kernel, dtype, warps,
                       dict(fast, **large, HAS_BIAS=True, HAS_LENGTHS=True))
    for flip in (True, False):
        yield barrier.barrier_loop_kernel, torch.float32, 4, dict(FLIP=flip)
    yield from family_configurations()


# The largest persistent-small BH per (dtype, CELL) whose compile has no spill traffic in the time loop
# (benchmarks/NOTES.md, LSTM/GRU section): the W_hh block is [BH, G·BH], G times Elman's.
FAMILY_SMALL_H_MAX = {(torch.bfloat16, 3): 128, (torch.bfloat16, 4): 128, (torch.float32, 3): 32,
                      (torch.float32, 4): 32, (torch.float64, 3): 32, (torch.float64, 4): 16}


# The cells' persistent-large limits (persistent.CELL_LARGE_H_MAX) compiled here: (dtype, CELL, BH, with lengths).
FAMILY_LARGE = ((torch.bfloat16, 4, 1024, False), (torch.bfloat16, 3, 1024, False), (torch.bfloat16, 4, 1024, True),
                (torch.float32, 4, 128, False), (torch.float32, 3, 128, False),
                (torch.float64, 4, 64, False), (torch.float64, 3, 128, False))


def family_configurations():
    """The GRU (CELL = 3) and LSTM (CELL = 4) specialisations of the cell-generic kernels (the Elman ones
    above are their CELL = 1 entries). A representative few, to keep the compile within a minute: bf16
    stands for both 16-bit types (fp16 differs only in the element type) and fp32 (ieee) for tf32.
    Stepwise: both cells in bf16, the bf16 LSTM with lengths too (the per-row select of h and c), the GRU
    in fp32 (the fp32 LSTM compiles twice as long; it spilled nothing when compiled, 170–200 registers).
    Persistent-small at FAMILY_SMALL_H_MAX: both cells in bf16 and fp64, the LSTM in fp32 (the fp32 GRU
    takes the same registers or fewer). Persistent-large at FAMILY_LARGE, the launcher's BB, BN, warps and
    K_SPLIT: both cells at the 16-bit limit (the anchor LSTM H = 768 is BH = 1024), the bf16 LSTM with
    lengths, both cells at the fp32 limit,
    both cells at their fp64 limits."""
    BB, BN, BK = stepwise.block_sizes(64, 1024)
    for dtype, cell, lengths in ((torch.bfloat16, 3, False), (torch.bfloat16, 4, False), (torch.bfloat16, 4, True),
                                 (torch.float32, 3, False)):
        math = dict(ACT=0, PRECISION="ieee", UPCAST=False, REVERSE=False, CELL=cell, HAS_LENGTHS=lengths,
                    BB=BB, BN=BN, BK=BK)
        fast = dict(math, FAST_TANH=dtype == torch.bfloat16, HAS_BIAS=True)
        yield stepwise_kernels.rnn_step_fwd_kernel, dtype, stepwise.NUM_WARPS, fast
        yield stepwise_kernels.rnn_step_bwd_kernel, dtype, stepwise.NUM_WARPS, math
    for dtype, cell in ((torch.bfloat16, 3), (torch.bfloat16, 4), (torch.float32, 4), (torch.float64, 3),
                        (torch.float64, 4)):
        math = dict(ACT=0, PRECISION="ieee", UPCAST=False, HAS_LENGTHS=False, REVERSE=False, CELL=cell,
                    BB=persistent.BB, BH=FAMILY_SMALL_H_MAX[dtype, cell])
        fast = dict(math, FAST_TANH=dtype == torch.bfloat16, HAS_BIAS=True)
        warps = persistent._num_warps_small(dtype)
        yield persistent_small.rnn_persistent_small_fwd_kernel, dtype, warps, fast
        yield persistent_small.rnn_persistent_small_bwd_kernel, dtype, warps, math
    for dtype, cell, BH, lengths in FAMILY_LARGE:
        math = dict(ACT=0, PRECISION="ieee", UPCAST=False, HAS_LENGTHS=lengths, REVERSE=False, CELL=cell,
                    USE_BARRIER=True, BH=BH)
        for kernel, backward in ((persistent_large.rnn_persistent_large_fwd_kernel, False),
                                 (persistent_large.rnn_persistent_large_bwd_kernel, True)):
            meta = persistent._cell_large_meta(BH, dtype, backward)
            warps = meta.pop("num_warps")
            extra = {} if backward else dict(FAST_TANH=dtype == torch.bfloat16, HAS_BIAS=True)
            if not (backward and lengths):  # the backward's lengths are a [BB] mask per phase: not worth a compile
                yield kernel, dtype, warps, dict(math, **meta, **extra)


def main(argv):
    """argv: an optional regular expression; only configurations whose "kernel dtype BH CELL" it matches
    are compiled (`large.*bf16 1024`: the large-H kernels at BH = 1024 in bf16; `rnn_.* 4$`: the LSTM's)."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET: this compiles for a GPU"
    # Compile afresh (a cached kernel runs no ptxas, so leaves no report) and print ptxas's report.
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    for kernel, dtype, num_warps, constexprs in configurations():
        if argv and not re.search(argv[0], f"{kernel.fn.__name__} {TRITON_DTYPE[dtype]} {constexprs.get('BH')} {constexprs.get('CELL', 1)}"):
            continue
        for aligned in (True, False):
            counts = compile_and_count(kernel, dtype, num_warps, aligned, **constexprs)
            shown = {k: v for k, v in constexprs.items()
                     if k in ("CELL", "PRECISION", "BB", "BN", "BK", "BH", "K_SPLIT", "HAS_LENGTHS", "FLIP")}
            print(json.dumps(dict(kernel=kernel.fn.__name__, dtype=TRITON_DTYPE[dtype], num_warps=num_warps,
                                  aligned=aligned, **shown, **counts)), flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
