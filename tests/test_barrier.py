"""The grid barrier and the large-H launcher's GPU contact, tested on CPU: the barrier word's arithmetic
(both schemes, across wrap-around), the bounded wait (a group that can never meet raises in seconds),
and barrier buffers under CUDA-graph capture. The launcher's occupancy plan (and "auto" falling back to
stepwise on a device too small for the persistent grid) is tested in test_plan.py."""
import time
from types import SimpleNamespace

import pytest
import torch

from elman_triton import persistent
from elman_triton.config import INTERPRETED, on_device
from elman_triton.kernels import barrier

LINE = barrier.WORD_STRIDE.value


def barrier_buffer(device, word):
    words = torch.zeros(2 * LINE, dtype=torch.int32, device=device)
    words[LINE] = word
    return words


def as_int32(value):
    return value - (1 << 32) if value >= 1 << 31 else value


@pytest.mark.parametrize("start", [0, 0x80000000])
def test_flip_barrier_flips_the_top_bit_and_keeps_the_rest(start, device):
    """Each barrier adds 1 per program and 0x80000000 − (n − 1) once: the top bit flips and the low bits
    come back. What the kernels rely on: words start at 0 and every barrier leaves the low bits at 0,
    so each barrier starts from them (see the next test for any other word). Under the interpreter one
    program (the group's rank 0) runs; on GPU a cooperative grid of one program per SM."""
    n_programs = 1 if INTERPRETED else torch.cuda.get_device_properties(device).multi_processor_count
    words = barrier_buffer(device, as_int32(start))
    for n_iters in (5, 0, 2):
        persistent.run_barrier_loop(words, n_iters, n_programs, flip=True)
    assert words[LINE].item() & 0xFFFFFFFF == start ^ 0x80000000  # 7 flips
    assert words[0].item() == 0  # no error


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter runs a too-small grid without hanging the GPU")
@pytest.mark.parametrize("low_bits", [0, 1])
def test_flip_barrier_opens_early_on_a_word_with_low_bits_set(low_bits):
    """Why the low bits must be 0: one program (rank 0) of a group of two arrives alone. From a word
    with low bits 0 it waits and times out; from low bits 1 its own arrival carries into the top bit,
    the barrier opens with one program missing, and nothing reports it."""
    words = barrier_buffer("cpu", low_bits)
    if low_bits:
        persistent.run_barrier_loop(words, 1, n_programs=2, grid_programs=1, patience=50, flip=True)
        assert words[LINE].item() & 0xFFFFFFFF == 0x80000000 and words[0].item() == 0  # opened early
    else:
        with pytest.raises(RuntimeError, match="gave up after 50 polls"):
            persistent.run_barrier_loop(words, 1, n_programs=2, grid_programs=1, patience=50, flip=True)


def test_count_barrier_resets_count_and_moves_generation(device):
    """The older scheme: n barriers leave the count at 0 and the generation n further on, across its
    16-bit wrap."""
    shift, mask = barrier.GENERATION_SHIFT.value, barrier.FIELD_MASK.value
    start = 0xFFFE
    n_programs = 1 if INTERPRETED else torch.cuda.get_device_properties(device).multi_processor_count
    words = barrier_buffer(device, as_int32(start << shift))
    for n_iters in (5, 0, 3):
        persistent.run_barrier_loop(words, n_iters, n_programs, flip=False)
    value = words[LINE].item() & 0xFFFFFFFF
    assert value & mask == 0 and value >> shift == (start + 8) & mask


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter runs a too-small grid without hanging the GPU")
@pytest.mark.parametrize("flip", [True, False], ids=["flip", "count"])
def test_a_group_that_cannot_meet_raises_instead_of_hanging(flip):
    """One program launched for a group of two: every wait gives up after `patience` polls, the error
    word is set, later barriers do not wait again, and the launcher raises naming the kernel and grid."""
    words = barrier_buffer("cpu", 0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"barrier_loop_kernel \(grid=\(1,\), group of 2\).*gave up after 500 polls"):
        persistent.run_barrier_loop(words, 50, n_programs=2, grid_programs=1, patience=500, flip=flip)
    assert time.monotonic() - start < 30  # 50 barriers, but only the first one waits
    assert words[0].item() == barrier.ERROR_TIMEOUT.value


def test_barrier_words_sit_on_their_own_cache_lines():
    assert LINE * 4 == 128


# ------------------------------------------------------------------------ CUDA-graph capture, faked

class FakeStream(SimpleNamespace):
    pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's stream and capture state, faked on CPU: set .capturing and .stream to move it."""
    state = SimpleNamespace(capturing=False, stream=FakeStream(cuda_stream=1))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state.capturing)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state.stream)
    monkeypatch.setattr(persistent, "_BARRIER_WORDS", {})
    monkeypatch.setattr(persistent, "_CAPTURED_WORDS", [])
    monkeypatch.setattr(persistent, "_PENDING", [])
    return state


def test_capture_allocates_its_own_barrier_buffer(fake_cuda):
    """Inside a capture (torch.cuda.graph captures on a side stream that has no buffer yet) the launcher
    allocates a zeroed buffer of its own and keeps it alive; eager calls on any stream never get it,
    and two captured launches never share one."""
    cpu = torch.device("cpu")
    eager = persistent._barrier_words(cpu, 4)
    assert persistent._barrier_words(cpu, 4) is eager  # one buffer per stream, reused
    fake_cuda.capturing, fake_cuda.stream = True, FakeStream(cuda_stream=2)
    captured = [persistent._barrier_words(cpu, 4) for _ in range(2)]
    assert captured[0] is not captured[1] and all(not w.any() for w in captured)
    assert persistent._CAPTURED_WORDS == captured
    fake_cuda.capturing = False
    other_stream = persistent._barrier_words(cpu, 4)
    assert all(other_stream is not w for w in captured + [eager])
    fake_cuda.stream = FakeStream(cuda_stream=1)
    assert persistent._barrier_words(cpu, 4) is eager


def test_a_timed_out_launch_raises_at_the_next_check_and_drops_its_buffer(fake_cuda):
    """The deferred check: a finished launch whose error word is set raises RuntimeError naming what
    ran, and its buffer (left half-arrived) is replaced."""
    cpu = torch.device("cpu")
    words = persistent._barrier_words(cpu, 1)
    flag = torch.tensor([barrier.ERROR_TIMEOUT.value], dtype=torch.int32)
    done = SimpleNamespace(query=lambda: True, synchronize=lambda: None)
    persistent._PENDING.append((done, flag, words, ("elman_persistent_large_fwd_kernel", 1024, (64, 1, 1), 1)))
    with pytest.raises(RuntimeError, match=r"elman_persistent_large_fwd_kernel \(H=1024, grid=\(64, 1, 1\), 1 launch"
                                           r"\(es\)\): a grid-barrier wait gave up"):
        persistent._barrier_words(cpu, 1)
    assert persistent._PENDING == [] and persistent._barrier_words(cpu, 1) is not words


def test_unfinished_launches_are_not_waited_for(fake_cuda):
    running = SimpleNamespace(query=lambda: False)
    entry = (running, torch.tensor([1], dtype=torch.int32), torch.zeros(1), "k")
    persistent._PENDING.append(entry)
    persistent.check_errors()  # no synchronisation, nothing raised yet
    assert persistent._PENDING == [entry]


def test_launches_go_to_the_tensors_device():
    """on_device: a CUDA tensor's own device (not the current one) for every launch; nothing on CPU."""
    fake = SimpleNamespace(device=torch.device("cuda", 1))
    guard = on_device(fake)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(on_device(torch.empty(1)), torch.cuda.device)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_second_device_while_another_is_current():
    from elman_triton import elman_rnn
    x = torch.randn(4, 3, 5, device="cuda:1")
    w_ih, w_hh = torch.randn(6, 5, device="cuda:1") * 0.3, torch.randn(6, 6, device="cuda:1") * 0.3
    with torch.cuda.device(0):
        for backend in ("stepwise", "persistent"):
            y, _ = elman_rnn(x, None, w_ih, w_hh, backend=backend)
            y_ref, _ = elman_rnn(x, None, w_ih, w_hh, backend="reference")
            torch.testing.assert_close(y, y_ref)
