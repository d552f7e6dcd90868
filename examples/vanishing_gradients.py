"""The vanishing-gradient study: ‖∂L/∂h_t‖ against T − 1 − t, from the kernels' own backward.

W_hh is set orthogonal at spectral radius ρ ∈ {0.5, 0.9, 1.0, 1.1, 1.5} (elman_triton.init.orthogonal_:
then every singular value is ρ too), for tanh and relu. The loss reads only the last state (the adding
problem's readout), so every ∂L/∂h_t for t < T-1 is gradient carried back through time, and
record_state_gradients gives its norm at every step.

Pascanu, Mikolov & Bengio 2013: ∂h_{t+1}/∂h_t = diag(act'(z_{t+1})) W_hh, so with |act'| ≤ γ (γ = 1 for
tanh and relu) and σ_max the largest singular value of W_hh,

    ‖∂L/∂h_{T-1-k}‖ ≤ (γ σ_max)^k ‖∂L/∂h_{T-1}‖,

and when σ_max < 1/γ the norm must decay at least geometrically at rate γ σ_max. The script fits the
decay rate (a least-squares slope of log ‖∂L/∂h‖ against k), takes the worst per-step rate
max_k (‖∂L/∂h_{T-1-k}‖ / ‖∂L/∂h_{T-1}‖)^(1/k), and checks it against the bound for every ρ, at init
and again after some training on the adding problem (σ_max is measured again then). It exits with
status 1 if the bound is broken where the condition holds.

Beside them, at the same H and with the same loss and training, the LSTM and GRU (elman_triton.family,
torch's default init; --cells): their ‖∂L/∂h_t‖, and the LSTM's ‖∂L/∂c_t‖, the cell state whose
gradient the forget gate carries (c_{t+1} = f ⊙ c_t + i ⊙ g, so ∂c_{t+1}/∂c_t = diag(f), no W_hh).
Every model's norms come from the package's research tool, elman_triton.record_state_gradients, out of
the backward the layer runs anyway: rec.norms for h, and for the LSTM rec.cell_norms for c
(state_gradients below). Pascanu's bound is not checked for the gated cells (their Jacobian is not
diag(act') W_hh). The right-hand column of the figure draws them beside tanh and relu Elman at ρ = 1.

    python examples/vanishing_gradients.py            # T = 100, H = 100; the init part takes seconds
    python examples/vanishing_gradients.py --quick    # a smoke run (T = 30, H = 32), under a minute on CPU
"""
import math
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from adding_problem import COLORS, GATED, Adder, make_batch  # noqa: E402

from elman_triton import init, record_state_gradients  # noqa: E402
from elman_triton.family import LSTM  # noqa: E402

RHOS = (0.5, 0.9, 1.0, 1.1, 1.5)
GAMMA = {"tanh": 1.0, "relu": 1.0}  # sup |act'|
SLACK = 1e-3  # fp32 rounding in the measured norms, relative to the rate
FLOOR = 1e-30  # ratios below this are fp32 underflow, not a measured decay (decay_rates ignores them too)
RECORDED = "vanishing_gradients_cells.md (T = 100, H = 100: tanh and relu Elman, LSTM, GRU)"


def state_gradients(model, x, target):
    """(test MSE, ‖∂L/∂h_t‖ for every t, the LSTM's ‖∂L/∂c_t‖ for every t or None) of an Adder's layer,
    norms over batch and hidden units, from record_state_gradients for every cell (the Elman ones, the
    GRU, and the LSTM with .cell_norms). The parameters' gradients it leaves are cleared."""
    with record_state_gradients(model.rnn) as rec:
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item(), rec.norms[0].tolist(), rec.cell_norms[0].tolist() if isinstance(model.rnn, LSTM) else None


def decay_rates(norms):
    """(fitted rate, worst per-step rate) of ‖∂L/∂h_{T-1-k}‖ / ‖∂L/∂h_{T-1}‖ over k ≥ 1 where it is
    above FLOOR (below, fp32 underflow says nothing about the rate)."""
    ratios = ratios_of(norms)
    k = torch.arange(len(ratios), dtype=torch.float64)
    keep = ratios > FLOOR
    k, log_ratio = k[keep], ratios[keep].log()
    if len(k) < 2:
        return float("nan"), float("nan")
    slope = (k * log_ratio).sum() / (k * k).sum()  # through the origin: ratio = 1 at k = 0
    worst = (log_ratio[1:] / k[1:]).max()
    return math.exp(slope), math.exp(worst)


def study(act, rho, args, test, generator):
    """Rows at init and after args.steps of training. act: an Elman nonlinearity with W_hh orthogonal at
    spectral radius rho, or a gated cell ("lstm", "gru"; rho None) with torch's default init."""
    torch.manual_seed(args.seed)
    model = Adder(act, args.hidden, args.backend, args.device)
    if act not in GATED:
        init.orthogonal_(model.rnn, spectral_radius=rho)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    rows = []
    for stage in ("init", "trained"):
        if stage == "trained":
            for _ in _common.progress(args.steps, f"train {act}" + ("" if rho is None else f" ρ={rho}")):
                x, target = make_batch(args.T, args.batch, generator, args.device)
                _common.optimize(optimizer, nn.functional.mse_loss(model(x), target), model, args.clip)
        mse, norms, c_norms = state_gradients(model, *test)
        fitted, worst = decay_rates(norms)
        row = dict(act=act, rho=rho, stage=stage, fitted_rate=fitted, worst_rate=worst, test_mse=mse, norms=norms,
                   c_norms=c_norms, c_fitted_rate=decay_rates(c_norms)[0] if c_norms else None)
        if act in GATED:  # W_hh is (G·H, H): Pascanu's bound is the Elman cell's
            row.update(sigma_max=None, bound=None, check="n/a (gated cell)")
            c_rate = "" if c_norms is None else f", ‖∂L/∂c‖ fitted rate {row['c_fitted_rate']:.3f}"
            print(f"{act:4s} {stage:7s}: fitted rate {fitted:.3f}, worst per-step rate {worst:.3f}{c_rate}; "
                  f"test MSE {mse:.4f}", flush=True)
        else:
            sigma = torch.linalg.svdvals(model.rnn.weight_hh_l0.detach().double()).max().item()
            bound = GAMMA[act] * sigma
            applies = bound < 1
            check = ("holds" if worst <= bound * (1 + SLACK) else "VIOLATED") if applies else "n/a (γσ ≥ 1)"
            row.update(sigma_max=sigma, bound=bound, check=check)
            print(f"{act:4s} ρ={rho:<4} {stage:7s}: σ_max {sigma:.3f}, bound γσ {bound:.3f}, fitted rate {fitted:.3f}, "
                  f"worst per-step rate {worst:.3f}: {check}; test MSE {mse:.4f}", flush=True)
        rows.append(row)
    return rows


def report(rows, args, out):
    header = ["cell", "ρ (init)", "stage", "σ_max(W_hh)", "bound γσ_max", "fitted rate", "worst per-step rate",
              "Pascanu check", "test MSE", "‖∂L/∂c‖ fitted rate"]

    def number(value):
        return "—" if value is None else f"{value:.3f}"

    table = [[r["act"], "default init" if r["rho"] is None else r["rho"], r["stage"], number(r["sigma_max"]),
              number(r["bound"]), number(r["fitted_rate"]), number(r["worst_rate"]), r["check"],
              f"{r['test_mse']:.4f}", number(r.get("c_fitted_rate"))] for r in rows]
    settings = (f"T = {args.T}, H = {args.hidden}, {args.test_size} test sequences of the adding problem (loss on "
                f"the last state only); training: {args.steps} Adam steps, lr {args.lr}, batch {args.batch}, "
                f"clip {args.clip}; backend {args.backend!r} on {args.device}; seed {args.seed}. Rates are of "
                "‖∂L/∂h_t‖ (and the LSTM's ‖∂L/∂c_t‖) per step back in time, every model's from "
                "elman_triton.record_state_gradients (.norms, the LSTM's .cell_norms).")
    plt = _common.write_results(out, "vanishing_gradients", "Vanishing gradients", [settings, (header, table)],
                                dict(args=vars(args), rows=rows), args.smoke)
    if plt is None:
        return
    acts = sorted({r["act"] for r in rows if r["act"] not in GATED}, reverse=True)  # tanh, relu
    gated = [r for r in rows if r["act"] in GATED]
    curves = {id(r): ratios_of(r["norms"]) for r in rows}
    curves.update({(id(r), "c"): ratios_of(r["c_norms"]) for r in gated if r["c_norms"]})
    shown = torch.cat([c[c > FLOOR] for c in curves.values()])
    ylim = (max(FLOOR, shown.min().item() / 10), shown.max().item() * 10)  # the measured range, above FLOOR
    columns = len(acts) + bool(gated)
    fig, axes = plt.subplots(2, columns, figsize=(6 * columns, 8), squeeze=False, sharey=True)
    if gated:
        compare(axes[:, -1], rows, curves, args.rhos)
        for ax in axes[:, -1]:
            ax.set(ylim=ylim)
    for col, act in enumerate(acts):
        for row, stage in enumerate(("init", "trained")):
            ax = axes[row, col]
            for r in (r for r in rows if r["act"] == act and r["stage"] == stage):
                color = rho_color(r["rho"], args.rhos)
                ratios = curves[id(r)]
                ax.semilogy(ratios, color=color, label=f"ρ = {r['rho']} (σ_max {r['sigma_max']:.2f})")
                if r["bound"] < 1:
                    k = torch.arange(len(ratios), dtype=torch.float64)
                    ax.semilogy(k, r["bound"] ** k, ":", color=color)
            ax.set(title=f"{act}, {stage} (dotted: bound (γσ_max)^k)", xlabel="k = T − 1 − t",
                   ylabel="‖∂L/∂h_t‖ / ‖∂L/∂h_T-1‖", ylim=ylim)
            ax.legend(fontsize=7)
    _common.save_figure(fig, out, "vanishing_gradients.png", args.smoke)


def compare(axes, rows, curves, rhos):
    """The right-hand column: the LSTM's and GRU's ‖∂L/∂h_t‖ (and the LSTM's ‖∂L/∂c_t‖, dashed) beside tanh
    and relu Elman at the ρ nearest 1, at init (top) and trained (bottom); each cell in its adding_problem
    colour, the Elman ones in black and grey."""
    rho = min(rhos, key=lambda r: abs(r - 1))
    elman = {"tanh": "black", "relu": "grey"}
    for ax, stage in zip(axes, ("init", "trained")):
        for r in (r for r in rows if r["stage"] == stage):
            if r["act"] in GATED:
                color = COLORS[r["act"]]
                ax.semilogy(curves[id(r)], color=color, label=f"{r['act']} ‖∂L/∂h_t‖")
                if (id(r), "c") in curves:
                    ax.semilogy(curves[id(r), "c"], "--", color=color, label=f"{r['act']} ‖∂L/∂c_t‖")
            elif r["rho"] == rho and r["act"] in elman:
                ax.semilogy(curves[id(r)], color=elman[r["act"]], lw=1, label=f"{r['act']} Elman, ρ = {rho}")
        ax.set(title=f"gated cells (torch's default init) beside Elman, {stage}", xlabel="k = T − 1 − t",
               ylabel="‖∂L/∂state_t‖ / ‖∂L/∂state_T-1‖")
        ax.legend(fontsize=7)


def ratios_of(norms):
    """‖∂L/∂h_{T-1-k}‖ / ‖∂L/∂h_{T-1}‖ for k = 0, 1, …, in float64."""
    ratios = torch.tensor(norms, dtype=torch.float64).flip(0)
    return ratios / ratios[0]


def rho_color(rho, rhos):
    """One colour per ρ, the same in every panel and run: RHOS' own, in order, then the next ones."""
    extra = [r for r in rhos if r not in RHOS]
    return f"C{RHOS.index(rho) if rho in RHOS else len(RHOS) + extra.index(rho)}"


def main(argv=None):
    p = _common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=100)
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--rhos", type=float, nargs="+", default=list(RHOS))
    p.add_argument("--acts", nargs="+", default=["tanh", "relu"], choices=sorted(GAMMA))
    p.add_argument("--cells", nargs="*", default=list(GATED), choices=list(GATED),
                   help="gated cells studied beside the Elman ones, at the same H (none: --cells with no name)")
    _common.training_flags(p, steps=500, batch=32, lr=1e-3)  # the steps before the second measurement
    p.add_argument("--test-size", type=int, default=256)
    args = _common.parse(p, argv, quick=dict(T=30, hidden=32, steps=60))
    out = _common.setup(args, "vanishing_gradients", RECORDED)
    test = make_batch(args.T, args.test_size, torch.Generator().manual_seed(12345), args.device)
    rows = []
    for act in args.acts:
        for rho in args.rhos:
            rows += study(act, rho, args, test, torch.Generator().manual_seed(args.seed))
    for cell in args.cells:
        rows += study(cell, None, args, test, torch.Generator().manual_seed(args.seed))
    report(rows, args, out)
    violated = [r for r in rows if r["check"] == "VIOLATED"]
    if violated:
        print(f"the bound is broken in {len(violated)} case(s)")
    _common.remind(args)
    return rows, not violated


if __name__ == "__main__":
    sys.exit(0 if main()[1] else 1)
