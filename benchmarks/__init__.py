"""The benchmark suite: `python -m benchmarks --help`.

providers.py  what runs (nn.RNN/cuDNN, the eager loop, torch.compile, the Triton backends)
measure.py    timers, peak memory, machine figures (matmul peak, copy bandwidth, grid barrier), metadata
sweep.py      per shape: float64 verification of every provider, then timing of the ones that passed
report.py     derived figures, floors, targets, JSON/CSV/Markdown/PNG output
cli.py        the command line
"""
