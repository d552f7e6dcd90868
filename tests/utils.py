"""Shared test helpers: fresh random problems, the relative norm error, tolerances per dtype."""
import torch

# ‖a − b‖ / ‖b‖ against the float64 reference.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(a, b):
    """Relative norm error ‖a − b‖ / ‖b‖, computed in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_problem(T, B, D, H, dtype=torch.float32, device="cpu", h0=True, bias=True, generator=None):
    """Random inputs for one layer, scaled like torch.nn.RNN's init (U(-1/√H, 1/√H) weights) so the
    recurrence neither explodes nor saturates. Returns a dict of leaf tensors that require grad."""
    g = generator
    scale = H ** -0.5

    def rand(*shape, s=1.0):
        t = (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * s
        return t.to(device=device, dtype=dtype).requires_grad_()

    return dict(
        x=rand(T, B, D),
        h0=rand(B, H) if h0 else None,
        weight_ih=rand(H, D, s=scale),
        weight_hh=rand(H, H, s=scale),
        bias_ih=rand(H, s=scale) if bias else None,
        bias_hh=rand(H, s=scale) if bias else None,
    )


def as_float64(problem):
    """A detached float64 copy of a problem (leaves requiring grad), for the reference."""
    return {k: None if v is None else v.detach().double().requires_grad_() for k, v in problem.items()}


def leaves(problem):
    return [v for v in problem.values() if v is not None]


class LaunchCounter:
    """Stands in for a @triton.jit kernel: kernel[grid](...) counts the launch, then runs it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.launches += 1
            return launch(*args, **kwargs)
        return counted

    def warmup(self, *args, **kwargs):
        return self.kernel.warmup(*args, **kwargs)


def count_launches(monkeypatch, module, *names):
    """Replace module's kernels `names` with LaunchCounters and return them, in order."""
    counters = [LaunchCounter(getattr(module, name)) for name in names]
    for name, counter in zip(names, counters):
        monkeypatch.setattr(module, name, counter)
    return counters
