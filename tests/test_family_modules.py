"""LSTM, GRU, LSTMCell and GRUCell as modules, beyond their values (tests/test_family.py): nn's errors
through the forward they share with ElmanRNN (modules.RecurrentBase), determinism, autocast, eval-mode
backward and CUDA-graph capture. DDP: tests/test_ddp.py."""
import re

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from elman_triton.family import GRU, LSTM, GRUCell, LSTMCell

F64 = torch.float64
T, B, D, H = 3, 3, 4, 5
OURS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell}


def rand(*shape, dtype=F64):
    return torch.randn(*shape, dtype=dtype)


def raised(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - any exception torch raises is the expectation
        return error
    return None


def assert_raises_like(ours_fn, torch_fn, match):
    """ours_fn raises what torch_fn raises: the same type, and the same message where match is None,
    else a message matching `match` (where torch's comes from its kernel)."""
    expected = raised(torch_fn)
    assert expected is not None, "torch accepted this input; the case is wrong"
    with pytest.raises(type(expected), match=re.escape(str(expected)) + r"\Z" if match is None else match):
        ours_fn()


def hx(lstm, h_shape, c_shape=None, dtype=F64):
    """The GRU's h0, or the LSTM's (h0, c0) (c0 of h0's shape unless given)."""
    return (rand(*h_shape, dtype=dtype), rand(*(c_shape or h_shape))) if lstm else rand(*h_shape, dtype=dtype)


def packed(lengths, features=D, enforce_sorted=True):
    return pack_padded_sequence(rand(max(lengths), len(lengths), features), lengths, enforce_sorted=enforce_sorted)


# name: (inputs factory taking `lstm`, None: torch's message exactly, or what ours must name instead)
MODULE_ERRORS = {
    "1-D input": (lambda lstm: (rand(D),), None),
    "4-D input": (lambda lstm: (rand(2, T, B, D),), None),
    "feature size": (lambda lstm: (rand(T, B, D + 1),), None),
    "hx batch": (lambda lstm: (rand(T, B, D), hx(lstm, (1, B - 1, H))), None),
    "hx width": (lambda lstm: (rand(T, B, D), hx(lstm, (1, B, H + 1), (1, B, H))), None),
    "hx 2-D for batched input": (lambda lstm: (rand(T, B, D), hx(lstm, (B, H))), None),
    "hx 3-D for unbatched input": (lambda lstm: (rand(T, D), hx(lstm, (1, 1, H))), None),
    "hx width, unbatched": (lambda lstm: (rand(T, D), hx(lstm, (1, H + 1), (1, H))), None),
    "empty sequence": (lambda lstm: (rand(0, B, D),), None),
    "input dtype": (lambda lstm: (rand(T, B, D, dtype=torch.float32),), None),
    "hx dtype": (lambda lstm: (rand(T, B, D), hx(lstm, (1, B, H), dtype=torch.float32)), "hx"),
    "packed unsorted hx batch": (lambda lstm: (packed([2, 3, 1], enforce_sorted=False), hx(lstm, (1, 2, H))), None),
}
# nn.GRU checks packed input and its hx like nn.RNN; nn.LSTM leaves them to its kernel (a shape error from
# a matmul, or "got an incorrect number of RNN parameters"), where ours checks them with nn.LSTM's messages.
PACKED_ERRORS = {
    "packed feature size": (lambda lstm: (packed([3, 2, 1], D + 1),), "input.size\\(-1\\) must be equal to input_size"),
    "packed hx batch": (lambda lstm: (packed([3, 2, 1]), hx(lstm, (1, 2, H))),
                        re.escape("Expected hidden[0] size (1, 3, 5), got [1, 2, 5]")),
    "packed hx width": (lambda lstm: (packed([3, 2, 1]), hx(lstm, (1, 3, H - 1), (1, 3, H))),
                        re.escape("Expected hidden[0] size (1, 3, 5), got [1, 3, 4]")),
}


@pytest.mark.parametrize("case", [*MODULE_ERRORS, *PACKED_ERRORS])
@pytest.mark.parametrize("nn_cls", [nn.LSTM, nn.GRU], ids=["LSTM", "GRU"])
def test_module_errors_match_torch(nn_cls, case):
    make_inputs, match = MODULE_ERRORS[case] if case in MODULE_ERRORS else PACKED_ERRORS[case]
    lstm = nn_cls is nn.LSTM
    if case in PACKED_ERRORS and not lstm:
        match = None
    ref, ours = nn_cls(D, H, dtype=F64), OURS[nn_cls](D, H, dtype=F64, backend="stepwise")
    inputs = make_inputs(lstm)
    assert_raises_like(lambda: ours(*inputs), lambda: ref(*inputs), match)


# The LSTM's cell state and proj_size: name: (proj_size, inputs, None: torch's message exactly, or ours)
LSTM_ERRORS = {
    "cx width": (0, lambda: (rand(T, B, D), hx(True, (1, B, H), (1, B, H + 1))), None),
    "cx 2-D for batched input": (0, lambda: (rand(T, B, D), hx(True, (1, B, H), (B, H))), None),
    "packed cx width": (0, lambda: (packed([3, 2, 1]), hx(True, (1, 3, H), (1, 3, H + 1))),
                        re.escape("Expected hidden[1] size (1, 3, 5), got [1, 3, 6]")),
    "proj_size hx width": (2, lambda: (rand(T, B, D), hx(True, (1, B, H))), None),
    "packed proj_size hx width": (2, lambda: (packed([3, 2, 1]), hx(True, (1, 3, H))),
                                  re.escape("Expected hidden[0] size (1, 3, 2), got [1, 3, 5]")),
}


@pytest.mark.parametrize("case", LSTM_ERRORS)
def test_lstm_state_errors_match_torch(case):
    proj_size, make_inputs, match = LSTM_ERRORS[case]
    ref = nn.LSTM(D, H, proj_size=proj_size, dtype=F64)
    ours = LSTM(D, H, proj_size=proj_size, dtype=F64, backend="stepwise")
    inputs = make_inputs()
    assert_raises_like(lambda: ours(*inputs), lambda: ref(*inputs), match)


CELL_ERRORS = {
    "3-D input": (lambda lstm: (rand(2, B, D),), None),
    "3-D hx": (lambda lstm: (rand(B, D), hx(lstm, (1, B, H))), None),
    "feature size": (lambda lstm: (rand(B, D + 1),), "input_size"),
    "hx batch": (lambda lstm: (rand(B, D), hx(lstm, (B - 1, H))), "batch size"),
    "hx width": (lambda lstm: (rand(B, D), hx(lstm, (B, H + 1))), "hidden0"),
    "hx dtype": (lambda lstm: (rand(B, D), hx(lstm, (B, H), dtype=torch.float32)), "hx"),
}


@pytest.mark.parametrize("case", CELL_ERRORS)
@pytest.mark.parametrize("nn_cls", [nn.LSTMCell, nn.GRUCell], ids=["LSTMCell", "GRUCell"])
def test_cell_errors_match_torch(nn_cls, case):
    make_inputs, match = CELL_ERRORS[case]
    ref, ours = nn_cls(D, H, dtype=F64), OURS[nn_cls](D, H, dtype=F64, backend="stepwise")
    inputs = make_inputs(nn_cls is nn.LSTMCell)
    assert_raises_like(lambda: ours(*inputs), lambda: ref(*inputs), match)
