"""A character language model: many-to-many training, then one-to-many sampling with ElmanRNNCell.

The text is Python's own standard library sources (the .py files beside the os module), so nothing is
downloaded. A 2-layer ElmanRNN reads characters (through an embedding) and predicts the next one at
every step. To sample, cells_from(rnn) builds one ElmanRNNCell per layer sharing the trained
weights; the prompt runs through the module (T = len(prompt)), and the cells carry h from there one
character at a time. The script checks that the cells reproduce the module's states on the prompt.

    python examples/char_lm.py            # H = 256, T = 100, 5000 steps (GPU scale)
    python examples/char_lm.py --quick    # a smoke run (H = 64, 200 steps), under a minute on CPU
"""
import glob
import math
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from elman_triton import ElmanRNN, ElmanRNNCell  # noqa: E402


def stdlib_text(chars):
    """The first `chars` characters of the standard library's .py files (sorted by name), ASCII only."""
    parts, total = [], 0
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().encode("ascii", errors="replace").decode("ascii")
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    return "".join(parts)[:chars]


def cells_from(rnn):
    """One ElmanRNNCell per layer of a one-directional ElmanRNN, sharing its parameters (not copies):
    running the cells step by step, carrying h, gives the module's states."""
    if rnn.bidirectional:
        raise ValueError("a bidirectional model cannot run one step at a time: its reverse direction reads the future")
    cells = nn.ModuleList()
    for layer in range(rnn.num_layers):
        cell = ElmanRNNCell(rnn.input_size if layer == 0 else rnn.hidden_size, rnn.hidden_size, bias=rnn.bias,
                            nonlinearity=rnn.nonlinearity, backend=rnn.backend,
                            device=rnn.weight_hh_l0.device, dtype=rnn.weight_hh_l0.dtype)
        for name in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if rnn.bias else ()):
            setattr(cell, name, getattr(rnn, f"{name}_l{layer}"))
        cells.append(cell)
    return cells


class CharModel(nn.Module):
    def __init__(self, vocab, embed, hidden, layers, backend, device):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed, device=device)
        self.rnn = ElmanRNN(embed, hidden, layers, backend=backend, device=device)
        self.head = nn.Linear(hidden, vocab, device=device)

    def forward(self, ids, h0=None):
        """ids (T, B) -> logits (T, B, vocab), h_n."""
        y, h_n = self.rnn(self.embed(ids), h0)
        return self.head(y), h_n


def sample(model, prompt_ids, length, temperature, generator):
    """Continue the prompt one character at a time with the cells, carrying h; returns the new ids and the
    largest difference between the cells' and the module's states on the prompt."""
    cells = cells_from(model.rnn)
    with torch.no_grad():
        y, h_n = model.rnn(model.embed(prompt_ids.unsqueeze(1)))
        h = [None] * len(cells)
        for t in range(len(prompt_ids)):  # the same prompt through the cells, to check them
            x = model.embed(prompt_ids[t:t + 1])
            for layer, cell in enumerate(cells):
                h[layer] = x = cell(x, h[layer])
        mismatch = max((torch.stack(h) - h_n[:, 0:1]).abs().max().item(), (x - y[-1]).abs().max().item())
        out, token = [], prompt_ids[-1:]
        h = list(h_n[:, 0:1])
        logits = model.head(h[-1])
        for _ in range(length):
            token = torch.multinomial(torch.softmax(logits / temperature, dim=1).cpu(), 1, generator=generator)[0]
            out.append(int(token))
            x = model.embed(token.to(prompt_ids.device))
            for layer, cell in enumerate(cells):
                h[layer] = x = cell(x, h[layer])
            logits = model.head(x)
    return out, mismatch


def batch(data, T, B, generator, device):
    """B random chunks of T+1 characters: inputs (T, B) and next-character targets (T, B)."""
    starts = torch.randint(0, len(data) - T - 1, (B,), generator=generator)
    chunks = torch.stack([data[s:s + T + 1] for s in starts.tolist()], dim=1).to(device)
    return chunks[:-1], chunks[1:]


def main(argv=None):
    p = _common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--chars", type=int, default=5_000_000, help="characters of standard-library source to use")
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--T", type=int, default=100, help="training sequence length (truncated BPTT)")
    _common.training_flags(p, steps=5000, batch=64, lr=2e-3, eval_every=250)
    p.add_argument("--sample-length", type=int, default=400)
    p.add_argument("--temperature", type=float, default=0.8)
    args = _common.parse(p, argv, quick=dict(chars=200_000, embed=16, hidden=64, T=32, batch=32, steps=200,
                                             eval_every=50, sample_length=200))
    out = _common.setup(args, "char_lm")
    text = stdlib_text(args.chars)
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([index[c] for c in text])
    split = int(0.9 * len(data))
    train_data, valid_data = data[:split], data[split:]
    generator = torch.Generator().manual_seed(args.seed)
    valid = batch(valid_data, args.T, 256, torch.Generator().manual_seed(12345), args.device)

    model = CharModel(len(vocab), args.embed, args.hidden, args.layers, args.backend, args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    def valid_loss():
        with torch.no_grad():
            logits, _ = model(valid[0])
        return nn.functional.cross_entropy(logits.flatten(0, 1), valid[1].flatten()).item()

    curve = [(0, valid_loss())]
    bar = _common.progress(args.steps, "char LM")
    for step in bar:
        inputs, targets = batch(train_data, args.T, args.batch, generator, args.device)
        logits, _ = model(inputs)
        _common.optimize(optimizer, nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()), model,
                         args.clip)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, valid_loss()))
            bar.set_postfix_str(f"valid loss {curve[-1][1]:.3f} nats/char")
    bar.close()

    prompt = "def "
    ids, mismatch = sample(model, torch.tensor([index[c] for c in prompt], device=args.device),
                           args.sample_length, args.temperature, generator)
    text_out = prompt + "".join(vocab[i] for i in ids)
    print(f"valid loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f} nats/char ({curve[-1][1] / math.log(2):.2f} bits); "
          f"cells vs module on the prompt: max |Δh| = {mismatch:.1e}")
    print(text_out)
    settings = (f"{len(text)} characters of standard-library source ({len(vocab)} symbols; last 10% held out), "
                f"embedding {args.embed}, H = {args.hidden}, {_common.plural(args.layers, 'layer')}, T = {args.T}, "
                f"batch {args.batch}, "
                f"{args.steps} Adam steps, lr {args.lr}, clip {args.clip}, seed {args.seed}, backend "
                f"{args.backend!r} on {args.device}. Uniform guess: {math.log(len(vocab)):.3f} nats/char.")
    rows = [["validation loss (nats/char)", f"{curve[0][1]:.3f}", f"{curve[-1][1]:.3f}"],
            ["bits/char", f"{curve[0][1] / math.log(2):.3f}", f"{curve[-1][1] / math.log(2):.3f}"]]
    result = dict(curve=curve, sample=text_out, cell_mismatch=mismatch)
    plt = _common.write_results(out, "char_lm", "Character language model", [
        settings, (["", "start", "end"], rows),
        f"Cells vs module on the prompt: max |Δh| = {mismatch:.1e}.",
        f"Sample (temperature {args.temperature}), from the prompt {prompt!r}:", "```\n" + text_out + "\n```"],
        dict(result, args=vars(args)), args.smoke)
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        steps, losses = zip(*curve)
        ax.plot(steps, losses)
        ax.axhline(math.log(len(vocab)), color="gray", ls="--", label="uniform")
        ax.set(title="character LM on stdlib sources", xlabel="training step", ylabel="validation loss (nats/char)")
        ax.legend()
        _common.save_figure(fig, out, "char_lm.png", args.smoke)
    _common.remind(args)  # small, but it shows the point: the loss falls, the cells reproduce the module
    return result


if __name__ == "__main__":
    main()
