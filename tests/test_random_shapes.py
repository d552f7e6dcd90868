"""Randomly drawn configurations through both Triton backends, against the float64 reference.

The hand-picked shapes elsewhere cover the known edges; these cover the combinations nobody picked:
sizes on either side of the kernels' tile and variant boundaries (BB = 16, BN, the small-H limit,
K_SPLIT chunks), with any mix of h0, biases, nonlinearity, direction and dtype. Each test id draws
its own configuration (conftest seeds torch from it), so a failure names a reproducible case.
"""
import pytest
import torch

from oracles import check_against_oracles, reference
from utils import make_problem

N_DRAWS = 25


def draw():
    def pick(*choices):
        return choices[torch.randint(len(choices), ()).item()]

    def size(low, high):
        return torch.randint(low, high + 1, ()).item()
    config = dict(T=size(1, 5), B=pick(1, size(2, 15), 16, 17, size(18, 40)), D=size(1, 40),
                  H=pick(size(8, 64), size(65, 160), size(161, 300)), dtype=pick(torch.float32, torch.float64),
                  h0=pick(True, False), bias=pick(True, False))
    options = dict(nonlinearity=pick("tanh", "relu"), reverse=pick(False, True))
    return config, options


@pytest.mark.parametrize("draw_index", range(N_DRAWS))
@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
def test_random_configuration(backend, draw_index, device):
    config, options = draw()
    problem = make_problem(config["T"], config["B"], config["D"], config["H"], config["dtype"], device,
                           h0=config["h0"], bias=config["bias"])
    check_against_oracles(problem, backend, oracles=(reference,), **options)
