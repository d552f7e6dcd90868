"""Sequence classification (many-to-one) over variable lengths: bidirectional, packed, batch_first.

Each sequence is a run of random symbols of random length; its label is the pair (first symbol, last
symbol), one of vocab² classes. The classifier reads the final state of each direction of the top layer (h_n):
the forward direction ends on the last valid symbol and the reverse direction ends on the first, so a
bidirectional model sees both ends fresh, while a one-directional model must carry the first symbol
across the whole sequence. Rows of different lengths go in as one PackedSequence (batch_first), so
padding never reaches the states.

    python examples/classify_packed.py            # lengths 20..200, H = 128, 2 layers (GPU scale)
    python examples/classify_packed.py --quick    # a smoke run (lengths 4..16), under a minute on CPU
"""
import math
import os
import sys

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from elman_triton import ElmanRNN, record_state_gradients  # noqa: E402

COLORS = {"bidirectional": "C0", "one direction": "C1"}  # one colour per model in every figure


def make_batch(B, vocab, min_len, max_len, generator, device):
    """Padded one-hot symbols (B, max length, vocab), lengths (B,), labels (B,) = first·vocab + last."""
    lengths = torch.randint(min_len, max_len + 1, (B,), generator=generator)
    symbols = torch.randint(0, vocab, (B, int(lengths.max())), generator=generator)
    labels = symbols[:, 0] * vocab + symbols[torch.arange(B), lengths - 1]
    x = nn.functional.one_hot(symbols, vocab).float()
    return x.to(device), lengths, labels.to(device)


class Classifier(nn.Module):
    def __init__(self, vocab, hidden, layers, bidirectional, backend, device):
        super().__init__()
        self.rnn = ElmanRNN(vocab, hidden, layers, batch_first=True, bidirectional=bidirectional, backend=backend,
                            device=device)
        self.directions = 2 if bidirectional else 1
        self.head = nn.Linear(self.directions * hidden, vocab * vocab, device=device)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, h_n = self.rnn(packed)
        top = h_n[-self.directions:]  # the last layer's final state per direction, in the caller's row order
        return self.head(torch.cat(list(top), dim=1))


def evaluate(model, test):
    x, lengths, labels = test
    with torch.no_grad():
        logits = model(x, lengths)
    return nn.functional.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def train(bidirectional, args, test):
    torch.manual_seed(args.seed)
    model = Classifier(args.vocab, args.hidden, args.layers, bidirectional, args.backend, args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    name = "bidirectional" if bidirectional else "one direction"
    curve = [(0, *evaluate(model, test))]
    bar = _common.progress(args.steps, name)
    for step in bar:
        x, lengths, labels = make_batch(args.batch, args.vocab, args.min_len, args.max_len, generator, args.device)
        _common.optimize(optimizer, nn.functional.cross_entropy(model(x, lengths), labels), model, args.clip)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, *evaluate(model, test)))
            bar.set_postfix_str(f"test loss {curve[-1][1]:.3f}, accuracy {curve[-1][2]:.3f}")
    bar.close()
    # The gradient through time on packed input: per step, per layer and direction (steps past a row's
    # length are zero, so late steps are shared by fewer rows).
    with record_state_gradients(model.rnn) as rec:
        x, lengths, labels = test
        nn.functional.cross_entropy(model(x, lengths), labels).backward()
    return dict(model=name, curve=curve, grad_norms=rec.norms.tolist())


def report(results, args, out):
    header = ["model", "steps", "test loss (start)", "test loss (end)", "test accuracy (end)"]
    rows = [[r["model"], r["curve"][-1][0], f"{r['curve'][0][1]:.3f}", f"{r['curve'][-1][1]:.3f}",
             f"{r['curve'][-1][2]:.3f}"] for r in results]
    settings = (f"{args.vocab} symbols, lengths {args.min_len}..{args.max_len}, H = {args.hidden}, "
                f"{_common.plural(args.layers, 'layer')}, "
                f"batch {args.batch} (packed, batch_first), Adam lr {args.lr}, clip {args.clip}, "
                f"{args.test_size} test sequences, seed {args.seed}, backend {args.backend!r} on {args.device}. "
                f"Chance: loss ln {args.vocab ** 2} = {math.log(args.vocab ** 2):.3f}, accuracy {args.vocab ** -2:.3f}.")
    plt = _common.write_results(out, "classify_packed", "Packed bidirectional classification",
                                [settings, (header, rows)], dict(args=vars(args), results=results), args.smoke)
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        steps, _, accuracy = zip(*r["curve"])
        left.plot(steps, accuracy, color=COLORS[r["model"]], label=r["model"])
        directions = 2 if r["model"] == "bidirectional" else 1
        for k, norms in enumerate(r["grad_norms"]):  # k = layer · directions + direction
            layer, reverse = divmod(k, directions)
            right.semilogy(norms, color=COLORS[r["model"]], ls="--" if reverse else "-", alpha=0.5 ** layer,
                           label=f"{r['model']}, layer {layer}{' reverse' if reverse else ''}")
    left.axhline(args.vocab ** -2, color="gray", ls="--", label="chance")
    left.set(title="(first symbol, last symbol)", xlabel="training step", ylabel="test accuracy", ylim=(0, 1.02))
    right.set(title="‖∂L/∂h_t‖ on the test set (packed)", xlabel="t", ylabel="norm")
    left.legend()
    right.legend(fontsize=7)
    _common.save_figure(fig, out, "classify_packed.png", args.smoke)


def main(argv=None):
    p = _common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=8)
    p.add_argument("--min-len", type=int, default=20)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    _common.training_flags(p, steps=3000, batch=64, lr=1e-3, eval_every=100)
    p.add_argument("--test-size", type=int, default=1000)
    args = _common.parse(p, argv, quick=dict(vocab=4, min_len=4, max_len=16, hidden=32, layers=1, steps=200,
                                             eval_every=25, test_size=256))
    out = _common.setup(args, "classify_packed")
    test = make_batch(args.test_size, args.vocab, args.min_len, args.max_len, torch.Generator().manual_seed(12345),
                      args.device)
    results = [train(bidirectional, args, test) for bidirectional in (True, False)]
    for r in results:
        print(f"{r['model']}: test accuracy {r['curve'][0][2]:.3f} -> {r['curve'][-1][2]:.3f}, "
              f"loss {r['curve'][0][1]:.3f} -> {r['curve'][-1][1]:.3f}")
    report(results, args, out)
    _common.remind(args)  # small, but it shows the point: both directions beat one
    return results


if __name__ == "__main__":
    main()
