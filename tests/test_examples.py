"""Each example runs with --quick (a small CPU run, as CI runs it) and its loss falls by a stated margin
with the fixed seed; each writes its Markdown table, JSON record and (with matplotlib) PNG."""
import importlib.util
import math
import os
import sys

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
BASELINE = 1 / 6  # the adding problem's MSE when always predicting 1


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name, tmp_path):
    result = load(name).main(["--quick", "--out", str(tmp_path)])
    # matplotlib is an optional extra: without it the examples write no PNG (and say so)
    for suffix in (".md", ".json") + ((".png",) if importlib.util.find_spec("matplotlib") else ()):
        assert os.path.getsize(tmp_path / f"{name}{suffix}") > 0
    return result


def test_adding_problem(tmp_path):
    """At T = 10 every model beats the 0.167 baseline by 20 %, the best by half."""
    results = run("adding_problem", tmp_path)
    assert [r["model"] for r in results] == ["tanh", "tanh-orth", "irnn"]
    for r in results:
        assert r["curve"][0][2] > BASELINE and r["final_mse"] < 0.8 * BASELINE, r["model"]
        steps, norms = zip(*r["grad_history"])  # recorded at every evaluation
        assert steps == tuple(c[0] for c in r["curve"]) and steps[0] == 0 and steps[-1] == 600
        assert all(len(n) == 10 and min(n) > 0 for n in norms)
    assert min(r["final_mse"] for r in results) < 0.5 * BASELINE


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


def test_vanishing_gradients(tmp_path):
    """Pascanu's bound holds wherever its condition does (σ_max < 1 at every ρ < 1 at init), and training
    lowers the test MSE of every model by 30 %."""
    rows, ok = run("vanishing_gradients", tmp_path)
    assert ok
    init = {(r["act"], r["rho"]): r for r in rows if r["stage"] == "init"}
    trained = {(r["act"], r["rho"]): r for r in rows if r["stage"] == "trained"}
    assert len(init) == len(trained) == 10
    for key, r in init.items():
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
