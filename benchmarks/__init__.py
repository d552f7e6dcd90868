"""The benchmark suite: `python -m benchmarks --help` from the repository root, or from anywhere
`python -m elman_triton.bench --help` / `elman-bench --help` (the same package, installed).

providers.py    what runs (nn.RNN/cuDNN, eager loop, torch.compile, the Triton backends)
measure.py      timers, peak memory, machine figures (matmul peak, copy bandwidth, grid barrier), metadata
sweep.py        per shape: float64 verification of every provider, then timing of the ones that passed;
                without a GPU, the Triton kernels' check in Triton's interpreter
module_rows.py  ElmanRNN against nn.RNN in the configurations a model uses
report.py       derived figures, floors, targets, JSON/CSV/Markdown/PNG output
cli.py          the command line
"""
import os
import sys


def interpret_without_gpu():
    """Without a CUDA GPU, make this process's Triton kernels run in Triton's interpreter, so that a CPU
    run checks them (for correctness; they are not timed there). Triton chooses the interpreter when a
    kernel is defined, i.e. when elman_triton is first imported, so this must run before that import.
    Returns True, changing nothing, when it comes too late (elman_triton was imported already): the
    caller must start a new process with TRITON_INTERPRET=1 for the CPU run to check the kernels. With
    a GPU it changes nothing and returns False."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    import torch
    if torch.cuda.is_available():
        return False
    if "elman_triton" in sys.modules:
        return True
    os.environ["TRITON_INTERPRET"] = "1"
    return False
