"""The persistent launcher's GPU contact, tested on CPU with the compiled kernels faked: the co-residency
plan comes from the kernel that is launched (its own specialisation: lengths or not, alignment), the
shared memory the hardware reserves per block counts, "auto" follows the plan, a plan is built once per
call shape, the barrier's error word is read back lazily, and every launch chooses fp fusion. A GPU test
runs the case that broke."""
import random
from types import SimpleNamespace

import pytest
import torch

from elman_triton import config, elman_rnn, ops, persistent, stepwise
from elman_triton.config import FP_FUSION, INTERPRETED, Layout, kernel_options
from elman_triton.kernels import barrier

LINE = barrier.WORD_STRIDE.value
SMS = 132  # an H200
OPTS = kernel_options(torch.bfloat16, "tanh", fast_tanh=False)


class FakeCompiled(SimpleNamespace):
    """A compiled kernel: its registers and shared memory, and launches recorded by its kernel, through
    Triton's launcher (`run`, as config.bound_launch calls it) or its runner (compiled[grid])."""
    function, packed_metadata = "function handle", "packed metadata"

    def _init_handles(self):
        pass

    def run(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter, leave, *args):
        self.kernel.launches.append(((grid_x, grid_y, grid_z), args, self))

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel.launches.append((grid, args, self))


class FakeKernel:
    """A large-H kernel whose compiles take registers from regs(meta) (the real bf16 forward at BH = 1024
    takes 127 without lengths, 206 with), and whose launches, direct or through kernel[grid], are recorded."""

    def __init__(self, kernel, regs, shared=65536):
        self.arg_names, self.__name__ = kernel.arg_names, kernel.__name__
        self.regs, self.shared = regs, shared
        self.compiles, self.launches = [], []

    def warmup(self, *args, grid, **meta):
        self.compiles.append(meta)
        return FakeCompiled(n_regs=self.regs(meta), metadata=SimpleNamespace(shared=self.shared), meta=meta,
                            args=args, kernel=self)

    def __getitem__(self, grid):  # Triton's dispatch (the launcher before cached plans used it)
        return lambda *args, **meta: self.launches.append((grid, args, SimpleNamespace(meta=meta)))


def regs_by_lengths(meta):
    return 208 if meta["HAS_LENGTHS"] else 128


@pytest.fixture
def fake_gpu(monkeypatch):
    """The launcher as on a GPU with `sms` SMs: no interpreter, torch.cuda's stream, capture and events and
    Triton's device properties faked, the large-H kernels replaced by FakeKernels."""
    state = SimpleNamespace(sms=SMS, capturing=False, events=[], done=True)
    monkeypatch.setattr(persistent, "INTERPRETED", False)
    monkeypatch.setattr(persistent, "_device_properties", lambda device: {
        "max_num_regs": 65536, "max_shared_mem": 232448, "multiprocessor_count": state.sms})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state.capturing)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=7))
    monkeypatch.setattr(persistent, "_current_stream", lambda device: 7, raising=False)

    def event():
        e = SimpleNamespace(record=lambda: None, query=lambda: state.done, synchronize=lambda: None)
        state.events.append(e)
        return e
    monkeypatch.setattr(torch.cuda, "Event", event)
    monkeypatch.setattr(persistent, "_pinned_flag", lambda: torch.zeros(1, dtype=torch.int32))
    for name in ("_PLANS", "_BARRIER_WORDS"):
        monkeypatch.setattr(persistent, name, {}, raising=False)
    for name in ("_PENDING", "_CAPTURED_WORDS"):
        monkeypatch.setattr(persistent, name, [])
    monkeypatch.setattr(persistent, "_reads", SimpleNamespace(due=0.0), raising=False)
    for name in ("elman_persistent_large_fwd_kernel", "elman_persistent_large_bwd_kernel"):
        monkeypatch.setattr(persistent, name, FakeKernel(getattr(persistent, name), regs_by_lengths))
    if hasattr(persistent, "_stand_in_plan"):  # fits' stand-in tensors on the CPU, whatever the device
        stand_in_args = persistent._stand_in_args
        monkeypatch.setattr(persistent, "_stand_in_args", lambda kernel, lay, dtype, device, has_lengths:
                            stand_in_args(kernel, lay, dtype, torch.device("cpu"), has_lengths))
    forget_the_device()
    yield state
    forget_the_device()


def forget_the_device():
    """Empty the launcher's caches of what the device holds (before and after cached plans)."""
    for name in ("_plan_cached", "_stand_in_plan", "_large_fits"):
        if hasattr(persistent, name):
            getattr(persistent, name).cache_clear()
    getattr(persistent, "_PLANS", {}).clear()


def forward(B, H, dirs=2, lengths=False, T=8, h0=None):
    """One large-H forward call of the persistent launcher on CPU tensors (the kernels are fakes)."""
    Hp = -(-H // 16) * 16
    y = torch.zeros(T, B, dirs * Hp, dtype=torch.bfloat16)
    lay = Layout.of(y, H, dirs, False, False)
    h0 = torch.zeros(dirs, B, Hp, dtype=torch.bfloat16) if h0 is None else h0
    persistent.forward_recurrence(y, y, h0, torch.zeros(dirs, H, Hp, dtype=torch.bfloat16),
                                  torch.zeros(dirs, H), torch.zeros(dirs, B, H, dtype=torch.bfloat16),
                                  torch.full((B,), T) if lengths else None, OPTS, lay)
    return lay


def launched(kernel):
    """(grid, the compiled kernel's meta) of each launch since the last call."""
    out = [(grid, compiled.meta) for grid, _, compiled in kernel.launches]
    kernel.launches.clear()
    return out


def test_plan_follows_the_launched_kernels_lengths(fake_gpu):
    """Bidirectional, B = 64 (4 batch tiles), H = 1024: 64 column programs of 256 threads. Without lengths
    (128 registers) an H200 holds 2 × 132 programs: both directions, 2 barrier groups each. With lengths
    the kernel needs 208 registers, 1 program per SM: both directions in 1 group, or the cooperative
    launch of 256 programs fails. The launch is the compile the plan read."""
    fwd = persistent.elman_persistent_large_fwd_kernel
    forward(64, 1024)
    [(grid, meta)] = launched(fwd)
    assert grid == (64, 2, 2) and not meta["HAS_LENGTHS"]
    forward(64, 1024, lengths=True)
    [(grid, meta)] = launched(fwd)
    assert grid == (64, 1, 2) and meta["HAS_LENGTHS"]
    assert meta["launch_cooperative_grid"] and meta["USE_BARRIER"] and meta["enable_fp_fusion"]


def test_auto_follows_the_plan_with_lengths(fake_gpu):
    """H = 2048: 128 column programs of 512 threads. 128 registers: 1 per SM, 132 ≥ 128, persistent fits;
    136 with lengths: none fits, so "auto" must take stepwise for calls with lengths, and for calls it
    does not know about."""
    for name in ("elman_persistent_large_fwd_kernel", "elman_persistent_large_bwd_kernel"):
        getattr(persistent, name).regs = lambda meta: 136 if meta["HAS_LENGTHS"] else 128
    lay, cuda = Layout(T=8, B=16, H=2048, dirs=1, stride_t=16 * 2048, stride_b=2048, batch_first=False,
                       reverse=False), torch.device("cuda", 0)
    assert persistent.fits(lay, torch.bfloat16, cuda, OPTS, has_lengths=False)
    assert not persistent.fits(lay, torch.bfloat16, cuda, OPTS, has_lengths=True)
    assert not persistent.fits(lay, torch.bfloat16, cuda, OPTS)
    assert ops._recurrence("auto", lay, torch.bfloat16, cuda, OPTS, has_lengths=True) is ops.stepwise
    assert ops._recurrence("auto", lay, torch.bfloat16, cuda, OPTS, has_lengths=False) is ops.persistent
    fwd = persistent.elman_persistent_large_fwd_kernel
    compiles = len(fwd.compiles)
    persistent.fits(lay, torch.bfloat16, cuda, OPTS)
    assert len(fwd.compiles) == compiles  # cached: no warmup per call
    fake_gpu.sms = 40  # a MIG slice: nothing fits, with or without lengths
    forget_the_device()
    assert not persistent.fits(lay, torch.bfloat16, cuda, OPTS, has_lengths=False)


def test_shared_memory_reserved_per_block_counts(fake_gpu):
    """113.5 KiB per program: two fit in 227 KiB by Triton's figure, but each block also takes the 1 KiB
    the hardware reserves, and 2 × 114.5 KiB > 228 KiB."""
    compiled = FakeCompiled(n_regs=32, metadata=SimpleNamespace(shared=116224))
    assert persistent._coresident_programs(compiled, torch.device("cuda", 0), num_warps=4) == SMS


def test_grid_shrinks_with_the_device(fake_gpu):
    """64 column programs, 4 batch tiles, both directions, 128 registers: 264 co-resident programs hold
    both directions' 128 in 2 groups; 200 hold them once; 100 run the directions one launch after the
    other; 40 cannot hold 64 and the call says so."""
    fwd = persistent.elman_persistent_large_fwd_kernel
    for sms, grids in ((132, [(64, 2, 2)]), (100, [(64, 1, 2)]), (50, [(64, 1, 1)] * 2)):
        fake_gpu.sms = sms
        forget_the_device()
        forward(64, 1024)
        assert [grid for grid, _ in launched(fwd)] == grids
        lay = Layout(T=8, B=64, H=1024, dirs=2, stride_t=64 * 2048, stride_b=2048, batch_first=False, reverse=False)
        assert persistent.sequential_directions(lay, torch.bfloat16, torch.device("cuda", 0), OPTS) == (sms == 50)
    fake_gpu.sms = 20
    forget_the_device()
    with pytest.raises(RuntimeError, match="needs 64 co-resident programs but this GPU holds 40"):
        forward(64, 1024)


def test_a_plan_is_built_once_per_call_shape_and_alignment(fake_gpu):
    """Later calls with new tensors reuse the compile and grid; a pointer that is not 16-byte aligned is
    another specialisation for Triton, so it gets a compile of its own (the alignment guard)."""
    fwd = persistent.elman_persistent_large_fwd_kernel
    forward(16, 1024, dirs=1)
    forward(16, 1024, dirs=1)
    assert len(fwd.compiles) == 1 and len(fwd.launches) == 2
    h0 = torch.zeros(16 * 1024 + 1, dtype=torch.bfloat16)[1:].view(1, 16, 1024)  # 2 bytes off
    forward(16, 1024, dirs=1, h0=h0)
    assert len(fwd.compiles) == 2
    forward(16, 1024, dirs=1)
    assert len(fwd.compiles) == 2


def test_error_word_is_read_lazily(fake_gpu, monkeypatch):
    """No copy or event per launch: one read in flight at most, at most one per ERROR_READ_INTERVAL_S;
    a read that finds the word set raises at a later call, naming what ran, and drops the buffer."""
    monkeypatch.setattr(persistent, "ERROR_READ_INTERVAL_S", 3600.0, raising=False)
    for _ in range(20):
        forward(16, 1024, dirs=1)
    assert len(fake_gpu.events) == 1 and len(persistent._PENDING) == 1
    [(_, flag, words, _)] = persistent._PENDING
    flag[0] = barrier.ERROR_TIMEOUT.value
    persistent._reads.due = 0.0
    with pytest.raises(RuntimeError, match=r"elman_persistent_large_fwd_kernel \(H=1024, grid=\(64, 1, 1\), "
                                           r"1 launch\(es\)\): a grid-barrier wait gave up"):
        forward(16, 1024, dirs=1)
    assert persistent._PENDING == [] and not persistent._BARRIER_WORDS
    forward(16, 1024, dirs=1)
    assert persistent._PLANS and all(plan.words is not words for plan in persistent._PLANS.values())


def test_check_errors_stops_at_the_first_read_not_complete(fake_gpu):
    """Reads complete in order: behind one still running, none is looked at (so the check costs the same
    however far the CPU runs ahead); wait=True takes them all."""
    running = SimpleNamespace(query=lambda: False, synchronize=lambda: None)
    behind = SimpleNamespace(query=lambda: pytest.fail("looked behind a running read"), synchronize=lambda: None)
    words = torch.zeros(2 * LINE, dtype=torch.int32)
    what = ("elman_persistent_large_bwd_kernel", 512, (32, 1, 1), 1)
    persistent._PENDING.extend([(running, torch.zeros(1, dtype=torch.int32), words, what),
                                (behind, torch.ones(1, dtype=torch.int32), words, what)])
    persistent.check_errors()
    assert len(persistent._PENDING) == 2
    with pytest.raises(RuntimeError, match="elman_persistent_large_bwd_kernel"):
        persistent.check_errors(wait=True)
    assert persistent._PENDING == []


def test_wait_reads_every_buffer_now(fake_gpu):
    """check_errors(wait=True) needs no read in flight: it reads each buffer's sticky word itself."""
    forward(16, 1024, dirs=1)
    persistent._PENDING.clear()
    [words] = persistent._BARRIER_WORDS.values()
    persistent.check_errors(wait=True)
    words[0] = barrier.ERROR_TIMEOUT.value
    with pytest.raises(RuntimeError, match="a grid-barrier wait gave up"):
        persistent.check_errors(wait=True)
    assert not persistent._BARRIER_WORDS


def test_captured_launches_own_their_buffers(fake_gpu):
    """Inside a CUDA-graph capture each launch gets a zeroed buffer of its own, never the eager one, and
    queues no read; eager calls after it keep theirs."""
    fwd = persistent.elman_persistent_large_fwd_kernel
    forward(16, 1024, dirs=1)
    [plan] = persistent._PLANS.values()
    eager = plan.words
    fwd.launches.clear()
    fake_gpu.capturing = True
    forward(16, 1024, dirs=1)
    forward(16, 1024, dirs=1)
    n_tensors = 7  # the forward's tensor arguments; the barrier buffer follows them
    captured = [args[n_tensors] for _, args, _ in fwd.launches]
    assert len(captured) == 2 and captured[0] is not captured[1] and all(w is not eager for w in captured)
    assert persistent._CAPTURED_WORDS == captured and all(not w.any() for w in captured)
    assert len(fake_gpu.events) == 1  # the eager call's read only
    fake_gpu.capturing = False
    fwd.launches.clear()
    forward(16, 1024, dirs=1)
    assert fwd.launches[0][1][n_tensors] is eager


@pytest.mark.parametrize("small", [True, False], ids=["small", "large"])
def test_every_launch_chooses_fp_fusion(monkeypatch, device, small):
    """Triton 3.9 warns that fp fusion's default turns off in 3.10: every launch and compile of every kernel
    passes enable_fp_fusion = config.FP_FUSION rather than leaving it to the default."""
    seen = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **meta):
                seen.append((self.kernel.__name__, meta.get("enable_fp_fusion")))
                return self.kernel[grid](*args, **meta)
            return launch

        def warmup(self, *args, **meta):
            seen.append((self.kernel.__name__, meta.get("enable_fp_fusion")))
            return self.kernel.warmup(*args, **meta)

        def __getattr__(self, name):
            return getattr(self.kernel, name)
    for module in (stepwise, persistent):
        for name, value in list(vars(module).items()):
            if name.endswith("_kernel") and hasattr(value, "warmup"):
                monkeypatch.setattr(module, name, Spy(value))
    monkeypatch.setattr(persistent, "_PLANS", {}, raising=False)
    if not small:
        monkeypatch.setattr(persistent, "SMALL_H_MAX", {dt: 0 for dt in persistent.SMALL_H_MAX})
    x, w_ih, w_hh = (torch.randn(*shape, device=device, requires_grad=True) for shape in ((2, 3, 4), (20, 4), (20, 20)))
    for backend in ("stepwise", "persistent"):
        y, h_n = elman_rnn(x, None, w_ih, w_hh * 0.2, backend=backend)
        (y.sum() + h_n.sum()).backward()
    if INTERPRETED:
        persistent.run_barrier_loop(torch.zeros(2 * LINE, dtype=torch.int32), 1, 1)
    kernels = {name for name, _ in seen}
    assert len(kernels) == 4 + INTERPRETED  # stepwise fwd, bwd; persistent fwd, bwd (+ the barrier loop)
    assert all(fusion is FP_FUSION for _, fusion in seen), seen


# ---------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_gpu_bidirectional_lengths_at_large_H():
    """The case the plan got wrong (issue 14): bf16, H = 1024, B = 64, both directions, a packed batch. Its
    kernel needs more registers than the one without lengths; the cooperative launch must fit."""
    from test_layer import check_layer
    T = 24
    lengths = [random.Random(b).randint(1, T) for b in range(63)] + [T]
    check_layer(T, 64, 64, 1024, 2, False, lengths, "persistent", torch.device("cuda"), dtype=torch.bfloat16,
                tol=2e-2)
    persistent.check_errors(wait=True)


def test_bound_launch_passes_what_tritons_runner_passes():
    """config.bound_launch (every persistent launch) calls Triton's launcher with the arguments that
    Triton's own runner (CompiledKernel.__getitem__, run here on a stub) gives it: grid, stream,
    function, packed metadata and the kernel's arguments, in the same places; while no launch hook is
    installed, no launch metadata and no hooks (the launcher skips None ones). With a hook installed
    it goes through the runner, which hands the launcher the hook chain."""
    from triton import knobs
    from triton.compiler.compiler import CompiledKernel

    received = []

    class Stub:  # what CompiledKernel's runner reads of a compiled kernel
        name, function, packed_metadata, src = "kernel", "function handle", "packed metadata", None
        __getitem__ = CompiledKernel.__getitem__
        launch_metadata = CompiledKernel.launch_metadata

        def _init_handles(self):
            pass

        def run(self, *args):
            received.append(args)

    grid, stream = (5, 3, 2), 9
    Stub()[grid](1.5, "x", stream=stream)
    by_runner = received.pop()
    launch = config.bound_launch(Stub(), grid, stream)
    launch(1.5, "x")
    direct = received.pop()
    assert len(direct) == len(by_runner)
    assert direct[:6] == by_runner[:6] == (*grid, stream, "function handle", "packed metadata")
    assert direct[9:] == by_runner[9:] == (1.5, "x")
    assert direct[6:9] == (None, None, None)
    assert by_runner[7] is knobs.runtime.launch_enter_hook and not by_runner[7].calls

    def hook(metadata):
        pass
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch(2.5, "y")
        hooked = received.pop()
        assert hooked[7] is knobs.runtime.launch_enter_hook and hooked[7].calls == [hook]
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert hooked[6] is not None and hooked[9:] == (2.5, "y")
