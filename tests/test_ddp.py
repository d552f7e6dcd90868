"""ElmanRNN, LSTM and GRU under torch.nn.parallel.DistributedDataParallel: two processes (gloo, CPU), each
training on half of every batch, end with the parameters of one process trained on the whole batch.

DDP averages the ranks' gradients, so with a loss that is a mean over each rank's half the averaged
gradient is the whole batch's. The two runs differ only in the order of float64 sums.
"""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from elman_triton import GRU, LSTM, ElmanRNN
from elman_triton.config import INTERPRETED
from utils import TOLERANCE, rel_err

WORLD_SIZE, STEPS, T, B, D, H = 2, 3, 4, 6, 5, 7  # B splits evenly over the ranks
F64 = torch.float64
# The Triton backends run on CPU tensors only in the interpreter (a machine with CUDA runs "auto" here).
# (module, backend) pairs. The LSTM and GRU run one Triton path each (on CPU, "auto" is torch's own kernel),
# one layer: the persistent kernel, one launch per layer and pass where stepwise takes T (CI time).
RUNS = ([("ElmanRNN", "auto"), ("ElmanRNN", "stepwise"), ("LSTM", "persistent"), ("GRU", "persistent")] if INTERPRETED
        else [("ElmanRNN", "auto"), ("LSTM", "auto"), ("GRU", "auto")])
MODULES = {"ElmanRNN": ElmanRNN, "LSTM": LSTM, "GRU": GRU}


class Tagger(nn.Module):
    def __init__(self, name, backend):
        super().__init__()
        layers = 2 if name == "ElmanRNN" else 1
        self.rnn = MODULES[name](D, H, num_layers=layers, bidirectional=True, backend=backend, dtype=F64)
        self.head = nn.Linear(2 * H, 3, dtype=F64)

    def forward(self, x):
        y, h_n = self.rnn(x)
        return self.head(y), h_n if isinstance(h_n, torch.Tensor) else torch.cat(h_n)  # the LSTM's (h_n, c_n)


def train(run, model_wrapper=lambda model: model, rows=slice(None), steps=STEPS):
    """steps of SGD on the batch rows `rows` of fixed data, from fixed initial parameters; returns the
    parameters. The loss is a mean over the rows, so averaging it over equal halves gives the whole."""
    torch.manual_seed(0)
    model = Tagger(*run)
    trained = model_wrapper(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
    for _ in range(steps):
        x, target = torch.randn(T, B, D, dtype=F64), torch.randn(T, B, 3, dtype=F64)
        out, h_n = trained(x[:, rows])
        loss = (out - target[:, rows]).square().mean() + h_n.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [p.detach() for p in model.parameters()]


def ddp_worker(rank, port, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        share = B // WORLD_SIZE
        rows = slice(rank * share, (rank + 1) * share)
        results = {run: train(run, DistributedDataParallel, rows) for run in RUNS}
        if rank == 0:
            torch.save(results, result_path)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_matches_single_process(tmp_path):
    result_path = tmp_path / "ddp.pt"
    mp.spawn(ddp_worker, args=(free_port(), result_path), nprocs=WORLD_SIZE)
    results = torch.load(result_path)
    assert results.keys() == set(RUNS)
    for run in RUNS:
        single = train(run)
        assert all(not torch.equal(a, b) for a, b in zip(single, train(run, steps=0))), "training changed nothing"
        assert len(results[run]) == len(single)
        for i, (got, want) in enumerate(zip(results[run], single)):
            assert rel_err(got, want) < TOLERANCE[F64], f"{run}: parameter {i}"
