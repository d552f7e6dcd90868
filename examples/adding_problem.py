"""The adding problem (many-to-one): Hochreiter & Schmidhuber 1997; Le, Jaitly & Hinton 2015.

Each input step carries a value drawn from U(0, 1) and a marker; exactly two steps are marked, one in
each half of the sequence, and the target is the sum of their two values. Always predicting 1 gives
MSE = Var(U + U') = 1/6 ≈ 0.167, the baseline a model must beat by carrying the first value across
about T/2 steps.

Five models with H = 100 units, read out linearly from the last state (h, not c, for the LSTM), as in Le et
al. 2015, who compare the IRNN against an LSTM:
  tanh        Elman, torch's default init (U(-1/√H, 1/√H))
  tanh-orth   tanh with W_hh orthogonal at spectral radius 1 (elman_triton.init.orthogonal_)
  irnn        relu with W_hh = I, zero biases, W_ih ~ N(0, 1e-3²) (elman_triton.init.irnn_)
  lstm        elman_triton.family.LSTM, torch's default init (no forget-gate bias added)
  gru         elman_triton.family.GRU, torch's default init
The expectation from the paper: the IRNN drives the MSE far under 0.167, tanh with default init
stays near it; the LSTM solves the task too. At every evaluation the script records ‖∂L/∂h_t‖ of the
test loss for every step t: how much of the loss's gradient reaches the step that holds the first
marked value, as training runs. For every model the layer's own backward gives it
(record_state_gradients), and for the LSTM also ‖∂L/∂c_t‖ of its memory cell.

    python examples/adding_problem.py                 # T = 150 (on a GPU; the published scale)
    python examples/adding_problem.py --full          # T ∈ {150, 200, 300, 400}
    python examples/adding_problem.py --quick         # smoke run (T = 10), under a minute on CPU
    python examples/adding_problem.py --T 100 --budget-minutes 45   # stop each run at its share of 45 min
"""
import math
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from elman_triton import ElmanRNN, init, record_state_gradients  # noqa: E402
from elman_triton.family import GRU, LSTM  # noqa: E402

BASELINE = 1 / 6  # MSE of always predicting 1
MODELS = ("tanh", "tanh-orth", "irnn", "lstm", "gru")
# one colour per model, as in the recorded figures (the Elman ones kept theirs when the LSTM and GRU came)
COLORS = {"irnn": "C0", "tanh": "C1", "tanh-orth": "C2", "lstm": "C3", "gru": "C4"}
GATED = {"lstm": LSTM, "gru": GRU}
# T = 10 is too short to need memory across time: the smoke run cannot show the example's point.
RECORDED = ("adding_problem_T150.md (T = 150, the paper's shortest; T = 100 beside it, and the LSTM and GRU at "
            "T = 100 in adding_problem_T100_gated.md)")


def make_batch(T, B, generator, device):
    """x (T, B, 2): value and marker per step; target (B,): the sum of the two marked values."""
    values = torch.rand(B, T, generator=generator)
    first = torch.randint(0, T // 2, (B,), generator=generator)
    second = torch.randint(T // 2, T, (B,), generator=generator)
    rows = torch.arange(B)
    markers = torch.zeros(B, T)
    markers[rows, first] = markers[rows, second] = 1.0
    x = torch.stack([values, markers], dim=2).transpose(0, 1)
    target = values[rows, first] + values[rows, second]
    return x.contiguous().to(device), target.to(device)


class Adder(nn.Module):
    """One recurrent layer read out linearly from its last state. cell: "tanh" or "relu" (Elman), "lstm", "gru"."""

    def __init__(self, cell, hidden, backend, device):
        super().__init__()
        if cell in GATED:
            self.rnn = GATED[cell](2, hidden, backend=backend, device=device)
        else:
            self.rnn = ElmanRNN(2, hidden, nonlinearity=cell, backend=backend, device=device)
        self.head = nn.Linear(hidden, 1, device=device)

    def forward(self, x):
        _, h_n = self.rnn(x)
        if isinstance(h_n, tuple):  # the LSTM's (h_n, c_n)
            h_n = h_n[0]
        return self.head(h_n[-1]).squeeze(1)


def evaluate(model, x, target):
    """The test MSE and ‖∂L/∂h_t‖ of the test loss for every step t (a list), from one forward and
    backward (the parameters' gradients it leaves are cleared)."""
    return state_gradients(model, x, target)[:2]


def state_gradients(model, x, target):
    """(test MSE, ‖∂L/∂h_t‖ for every t, ‖∂L/∂c_t‖ for every t or None): norms over batch and hidden
    units, from the layer's own backward (record_state_gradients; the LSTM's c_t from .cell_norms). The
    parameters' gradients it leaves are cleared."""
    with record_state_gradients(model.rnn) as rec:
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item(), rec.norms[0].tolist(), rec.cell_norms[0].tolist() if isinstance(model.rnn, LSTM) else None


def train(name, T, args, test, deadline):
    torch.manual_seed(args.seed)
    model = Adder({"irnn": "relu", "tanh-orth": "tanh"}.get(name, name), args.hidden, args.backend, args.device)
    if name == "irnn":
        init.irnn_(model.rnn)
    elif name == "tanh-orth":
        init.orthogonal_(model.rnn, spectral_radius=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    curve, grad_history = [], []  # (step, seconds, test MSE), (step, ‖∂L/∂h_t‖ for every t)

    def record(step):
        test_mse, norms = evaluate(model, *test)
        curve.append((step, time.time() - start, test_mse))
        grad_history.append((step, norms))
        return test_mse

    start, bar = time.time(), _common.progress(args.steps, f"{name} T={T}")
    record(0)
    generator = torch.Generator().manual_seed(args.seed + T)
    for step in bar:
        x, target = make_batch(T, args.batch, generator, args.device)
        _common.optimize(optimizer, nn.functional.mse_loss(model(x), target), model, args.clip)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps or time.time() > deadline:
            test_mse = record(step + 1)
            bar.set_postfix_str(f"test MSE {test_mse:.4f}")
            if time.time() > deadline or not math.isfinite(test_mse):
                break
    bar.close()
    return dict(model=name, T=T, steps=curve[-1][0], seconds=curve[-1][1], curve=curve, grad_history=grad_history,
                final_mse=curve[-1][2], best_mse=min(c[2] for c in curve))


def gradient_ratio(norms):
    """‖∂L/∂h_0‖ / ‖∂L/∂h_{T-1}‖: how much of the gradient at the last step reaches the first."""
    return norms[0] / norms[-1] if norms[-1] > 0 else float("nan")


def report(results, args, out):
    rows = []
    for r in results:
        rows.append([r["model"], r["T"], r["steps"], f"{r['seconds']:.0f}", f"{r['final_mse']:.4f}",
                     f"{r['best_mse']:.4f}", f"{r['final_mse'] / BASELINE:.3f}",
                     f"{gradient_ratio(r['grad_history'][0][1]):.2e}", f"{gradient_ratio(r['grad_history'][-1][1]):.2e}"])
    header = ["model", "T", "steps", "seconds", "test MSE (final)", "test MSE (best)", "final / 0.167",
              "‖∂L/∂h_0‖ / ‖∂L/∂h_T-1‖ at init", "… after training"]
    length = (f"{args.steps} steps each, or its share of a {args.budget_minutes:g}-minute budget for all runs "
              "together" if args.budget_minutes is not None else f"{args.steps} steps each, no time budget")
    settings = (f"H = {args.hidden}, batch {args.batch}, Adam lr {args.lr}, gradient norm clipped at {args.clip}, "
                f"{args.test_size} test sequences, seed {args.seed}, backend {args.backend!r} on {args.device}; "
                f"{length}. Baseline (always predict 1): MSE {BASELINE:.3f}.")
    plt = _common.write_results(out, "adding_problem", "Adding problem", [settings, (header, rows)],
                                dict(args=vars(args), results=results), args.smoke)
    if plt is None:
        return
    Ts = sorted({r["T"] for r in results})
    fig, axes = plt.subplots(3, len(Ts), figsize=(6 * len(Ts), 12), squeeze=False)
    for col, T in enumerate(Ts):
        top, middle, bottom = axes[:, col]
        for r in (r for r in results if r["T"] == T):
            steps, _, mse = zip(*r["curve"])
            color = COLORS[r["model"]]
            top.plot(steps, mse, color=color, label=r["model"])
            middle.semilogy(steps, [gradient_ratio(norms) for _, norms in r["grad_history"]], color=color,
                            label=r["model"])
            for (step, norms), style in ((r["grad_history"][0], ":"), (r["grad_history"][-1], "-")):
                bottom.semilogy(range(T), norms, style, color=color, label=f"{r['model']}, step {step}")
        top.axhline(BASELINE, color="gray", ls="--", label="predict 1 (0.167)")
        top.set(title=f"adding problem, T = {T}, H = {args.hidden}", xlabel="training step", ylabel="test MSE",
                ylim=(0, 0.5))
        middle.set(title="gradient reaching the first step, while training", xlabel="training step",
                   ylabel="‖∂L/∂h_0‖ / ‖∂L/∂h_T-1‖")
        bottom.set(title="‖∂L/∂h_t‖ of the test loss, at init and at the end", xlabel="t", ylabel="norm")
        for ax in axes[:, col]:
            ax.legend(fontsize=7)
    _common.save_figure(fig, out, "adding_problem.png", args.smoke)


def main(argv=None):
    p = _common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[150], help="sequence lengths")
    p.add_argument("--full", action="store_true", help="T ∈ {150, 200, 300, 400}, as in Le et al. 2015")
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    _common.training_flags(p, steps=100_000, batch=16, lr=1e-3, eval_every=250)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="wall-clock budget for all runs together, split evenly; each run stops at its share")
    args = _common.parse(p, argv, quick=dict(T=[10], hidden=32, steps=600, batch=32, lr=3e-3, eval_every=50,
                                             test_size=500))
    if args.full:
        args.T = [150, 200, 300, 400]
    out = _common.setup(args, "adding_problem", RECORDED, shows_point=False)
    runs = [(T, m) for T in args.T for m in args.models]
    share = math.inf if args.budget_minutes is None else args.budget_minutes * 60 / len(runs)
    results = []
    for T, name in runs:
        test = make_batch(T, args.test_size, torch.Generator().manual_seed(12345 + T), args.device)
        results.append(train(name, T, args, test, time.time() + share))
        r = results[-1]
        print(f"{name:10s} T={T}: {r['steps']} steps in {r['seconds']:.0f} s, test MSE {r['final_mse']:.4f} "
              f"(best {r['best_mse']:.4f}; baseline {BASELINE:.3f})", flush=True)
        report(results, args, out)  # after every run, so a stopped long run keeps what it did
    _common.remind(args)
    return results


if __name__ == "__main__":
    main()
