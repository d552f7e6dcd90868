"""Each example runs with --quick (a smoke run on one CPU thread, as CI runs it) and its loss falls by a
stated margin with the fixed seed; each writes its Markdown table, JSON record and (with matplotlib) PNG,
all marked as a smoke run."""
import importlib.util
import json
import math
import os
import re
import sys

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
BASELINE = 1 / 6  # the adding problem's MSE when always predicting 1
MODELS = ("tanh", "tanh-orth", "irnn", "lstm", "gru")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name, tmp_path, capsys=None, figures=None, recorded=None):
    """main(--quick) of the example; checks its outputs and that each says it is a smoke run (recorded: the
    file under examples/results/ it must point to). figures: a list that gets each saved matplotlib figure."""
    module = load(name)
    if figures is not None:
        save = module._common.save_figure
        module._common.save_figure = lambda fig, *args, **kwargs: (figures.append(fig), save(fig, *args, **kwargs))
    threads = torch.get_num_threads()
    try:
        result = module.main(["--quick", "--out", str(tmp_path)])
        assert torch.get_num_threads() == 1  # a smoke run takes one thread: quick on a shared 2-core machine
    finally:
        torch.set_num_threads(threads)
        if figures is not None:
            module._common.save_figure = save
    # matplotlib is an optional extra: without it the examples write no PNG (and say so)
    for suffix in (".md", ".json") + ((".png",) if importlib.util.find_spec("matplotlib") else ()):
        assert os.path.getsize(tmp_path / f"{name}{suffix}") > 0
    table = (tmp_path / f"{name}.md").read_text()
    assert "SMOKE RUN" in table.splitlines()[0] and "smoke run (--quick)" in table.lower()
    assert "None" not in table and not re.search(r"\b1 layers\b", table)
    assert json.loads((tmp_path / f"{name}.json").read_text())["smoke_run"].startswith("smoke run")
    if capsys is not None:
        assert "SMOKE RUN" in capsys.readouterr().out
    if recorded:
        assert f"examples/results/{recorded}" in table
        assert os.path.exists(os.path.join(EXAMPLES, "results", recorded))
    for fig in figures or ():
        assert fig._suptitle is not None and fig._suptitle.get_text().startswith("Smoke run")
    return result


def colors(ax):
    """{label: RGBA} of an axis' lines."""
    from matplotlib.colors import to_rgba
    return {line.get_label(): to_rgba(line.get_color()) for line in ax.get_lines()}


def test_adding_problem(tmp_path, capsys):
    """At T = 10 every model beats the 0.167 baseline by 20 %, the best by half. The smoke run cannot show the
    example's point (T = 10 needs no memory), so its table, screen and figure say so and name the recorded
    run; each model keeps its colour of the recorded figures (irnn C0, tanh C1, tanh-orth C2, lstm C3, gru C4).
    The LSTM and GRU (Le et al. compare the IRNN against an LSTM) are in the results, with finite norms."""
    figures = [] if importlib.util.find_spec("matplotlib") else None
    results = run("adding_problem", tmp_path, capsys, figures, recorded="adding_problem_T150.md")
    if figures:
        from matplotlib.colors import to_rgba
        assert {m: c for m, c in colors(figures[-1].axes[0]).items() if m in MODELS} == {
            m: to_rgba(c) for m, c in (("irnn", "C0"), ("tanh", "C1"), ("tanh-orth", "C2"), ("lstm", "C3"),
                                       ("gru", "C4"))}
    assert [r["model"] for r in results] == list(MODELS)
    for r in results:
        assert r["curve"][0][2] > BASELINE and r["final_mse"] < 0.8 * BASELINE, r["model"]
        steps, norms = zip(*r["grad_history"])  # recorded at every evaluation
        assert steps == tuple(c[0] for c in r["curve"]) and steps[0] == 0 and steps[-1] == 600
        assert all(len(n) == 10 and min(n) > 0 and all(map(math.isfinite, n)) for n in norms)
    table = (tmp_path / "adding_problem.md").read_text()
    assert "| lstm | 10 | 600 |" in table and "| gru | 10 | 600 |" in table
    assert min(r["final_mse"] for r in results) < 0.5 * BASELINE


# The examples' state_gradients: record_state_gradients in both (float32 norms of float64 gradients).
STATE_GRADIENTS = {"adding_problem": 1e-6, "vanishing_gradients": 1e-6}


@pytest.mark.parametrize("example", STATE_GRADIENTS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gated_state_gradients(cell, example):
    """The LSTM's and GRU's ‖∂L/∂h_t‖ (and ‖∂L/∂c_t‖) in the examples match an independent float64 step loop
    of the cell's own maths (torch's gate order) with a zero perturbation added to every state (its
    gradient is the total derivative), and the loss matches the layer's; H, B odd."""
    ap = load("adding_problem")
    torch.manual_seed(0)
    x, target = ap.make_batch(7, 5, torch.Generator().manual_seed(1), "cpu")
    x, target = x.double(), target.double()
    model = ap.Adder(cell, 11, "auto", "cpu").double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # away from the init, so that no gate sits near 0.5 everywhere
    loss, h_norms, c_norms = (ap if example == "adding_problem" else load(example)).state_gradients(model, x, target)
    assert all(p.grad is None for p in model.parameters())  # the example clears what it leaves

    rnn, H = model.rnn, 11
    w_ih, w_hh, b_ih, b_hh = (getattr(rnn, f"{name}_l0").detach()
                              for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    h = c = torch.zeros(5, H, dtype=torch.float64)
    dh, dc = [], []
    for x_t in x:
        gi, gh = x_t @ w_ih.T + b_ih, h @ w_hh.T + b_hh
        if cell == "lstm":
            i, f, g, o = (gi + gh).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            dc.append(torch.zeros_like(c, requires_grad=True))
            c = c + dc[-1]
            h = torch.sigmoid(o) * torch.tanh(c)
        else:
            (ri, zi, ni), (rh, zh, nh) = gi.chunk(3, dim=1), gh.chunk(3, dim=1)
            r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
            h = (1 - z) * torch.tanh(ni + r * nh) + z * h
        dh.append(torch.zeros_like(h, requires_grad=True))
        h = h + dh[-1]
    expected = torch.nn.functional.mse_loss(model.head(h).squeeze(1), target)
    expected.backward()
    assert math.isclose(loss, expected.item(), rel_tol=1e-12)
    assert math.isclose(loss, torch.nn.functional.mse_loss(model(x), target).item(), rel_tol=1e-12)

    def relative_error(norms, perturbations):
        want = torch.stack([torch.linalg.vector_norm(d.grad) for d in perturbations])
        return ((torch.tensor(norms, dtype=torch.float64) - want).norm() / want.norm()).item()

    assert relative_error(h_norms, dh) < STATE_GRADIENTS[example]
    if cell == "lstm":
        assert relative_error(c_norms, dc) < STATE_GRADIENTS[example]
    else:
        assert c_norms is None


def test_char_lm(tmp_path):
    """Validation loss falls by 1.5 nats/char; the cells built from the module reproduce its states."""
    result = run("char_lm", tmp_path)
    (_, start), (_, end) = result["curve"][0], result["curve"][-1]
    assert start - end > 1.5
    assert result["cell_mismatch"] < 1e-5
    assert result["sample"].startswith("def ") and len(result["sample"]) == 4 + 200


def test_classify_packed(tmp_path):
    """Bidirectional: loss falls by 1.5 nats and accuracy ends above 90 % (chance 1/16); one direction,
    which must carry the first symbol across the sequence, stays below it."""
    bidirectional, one_direction = run("classify_packed", tmp_path)
    (_, loss0, _), (_, loss1, accuracy) = bidirectional["curve"][0], bidirectional["curve"][-1]
    assert loss0 - loss1 > 1.5 and accuracy > 0.9
    assert one_direction["curve"][-1][2] < accuracy
    assert len(bidirectional["grad_norms"]) == 2  # one layer, two directions, recorded on packed input


def test_vanishing_gradients(tmp_path, monkeypatch):
    """Pascanu's bound holds wherever its condition does (σ_max < 1 at every ρ < 1 at init), and training
    lowers the test MSE of every model by 30 %. The LSTM and GRU rows are there beside them, with finite
    norms (the LSTM's ‖∂L/∂c_t‖ too), and the figure's right-hand column draws them. Every model's norms
    come from elman_triton.record_state_gradients (the example shows the tool), once per model and stage."""
    import elman_triton

    recorded = []

    def counting(module, *args, **kwargs):
        recorded.append(type(module).__name__)
        return record(module, *args, **kwargs)
    record = elman_triton.record_state_gradients
    monkeypatch.setattr(elman_triton, "record_state_gradients", counting)  # the example imports it by name
    figures = [] if importlib.util.find_spec("matplotlib") else None
    rows, ok = run("vanishing_gradients", tmp_path, figures=figures, recorded="vanishing_gradients_cells.md")
    assert ok
    assert sorted(recorded) == ["ElmanRNN"] * 20 + ["GRU"] * 2 + ["LSTM"] * 2
    assert "from elman_triton.record_state_gradients" in (tmp_path / "vanishing_gradients.md").read_text()
    ratios = [n / r["norms"][-1] for r in rows for n in r["norms"]]
    measured = [v for v in ratios if v > 1e-30]  # below: fp32 underflow, no measurement
    for ax in figures[-1].axes if figures else ():  # the measured range (not a fixed 1e-30..1e10)
        low, high = ax.get_ylim()
        assert max(1e-30, min(measured) / 100) <= low and high <= 100 * max(measured), (low, high)
    init = {(r["act"], r["rho"]): r for r in rows if r["stage"] == "init"}
    trained = {(r["act"], r["rho"]): r for r in rows if r["stage"] == "trained"}
    assert len(init) == len(trained) == 12
    for key in (("lstm", None), ("gru", None)):
        for r in (init[key], trained[key]):
            assert r["check"] == "n/a (gated cell)" and len(r["norms"]) == 30
            assert all(math.isfinite(n) and n > 0 for n in r["norms"] + (r["c_norms"] or []))
            assert (r["c_norms"] is not None) == (key[0] == "lstm")
            assert 0 < r["fitted_rate"] < 1.5 and math.isfinite(r["worst_rate"])
        assert trained[key]["test_mse"] < 0.7 * init[key]["test_mse"], key
    if figures:
        labels = [line.get_label() for ax in figures[-1].axes[-2:] for line in ax.get_lines()]
        assert {"lstm ‖∂L/∂h_t‖", "lstm ‖∂L/∂c_t‖", "gru ‖∂L/∂h_t‖", "tanh Elman, ρ = 1.0"} <= set(labels)
    for key, r in init.items():
        if key[0] in ("lstm", "gru"):
            continue
        if key[1] < 1:
            assert r["check"] == "holds" and r["fitted_rate"] <= r["bound"] * 1.001
        assert math.isclose(r["sigma_max"], key[1], rel_tol=1e-5)
        assert trained[key]["test_mse"] < 0.7 * r["test_mse"], key


def test_without_the_optional_extras(monkeypatch, capsys):
    """Without tqdm the progress is printed; without matplotlib no figure is drawn, and the run goes on."""
    common = load("_common")
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    bar = common.progress(20, "plain")
    bar.set_postfix_str("loss 1.0")
    assert list(bar) == list(range(20))
    assert common.pyplot() is None
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("plain: 2/20") and lines[-2].startswith("plain: 20/20") and "loss 1.0" in lines[-2]
    assert "matplotlib is not installed" in lines[-1]


@pytest.mark.parametrize("name", ["adding_problem", "char_lm", "classify_packed", "vanishing_gradients"])
def test_help_says_each_default_once(name, capsys):
    """--help: one default per flag (--out's 'examples/out/<name>', no '(default: None)' after it), and
    --quick called a smoke run."""
    with pytest.raises(SystemExit):
        load(name).main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "smoke run" in text
    options = text[text.index("--out OUT folder"):]
    out_help = options[:options.index("--device")]
    assert out_help.count("default") == 1, out_help
