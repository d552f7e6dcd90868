"""Differentially private training (DP-SGD) of an ElmanRNN: per-sample gradients by torch.func.

DP-SGD (Abadi et al., 2016) needs each sample's own gradient: it clips every one to norm C, sums them,
adds Gaussian noise of standard deviation σ·C and takes the mean, so that no single sample moves the
model by more than the noise hides. torch.nn.RNN cannot give per-sample gradients under torch.func.vmap
(its native kernel has no batching rule), which is why Opacus ships its own DPRNN; ElmanRNN can, on
every backend. vmap(grad(loss of one sample)) gives all B gradients in one call.

The task: read a sequence of ±1 symbols and say whether their sum is positive (many-to-one, the
final state into a linear head). Before training, the per-sample gradients by vmap are checked against
a loop of one backward per sample (in float64), and both are timed.

    python examples/per_sample_gradients.py            # B = 64, T = 100, H = 128, 300 steps
    python examples/per_sample_gradients.py --quick    # a smoke run, under a minute on CPU
"""
import argparse
import copy
import json
import os
import time

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from elman_triton import ElmanRNN


class Classifier(nn.Module):
    def __init__(self, hidden, backend, device):
        super().__init__()
        self.rnn = ElmanRNN(1, hidden, batch_first=True, backend=backend, device=device)
        self.head = nn.Linear(hidden, 2, device=device)

    def forward(self, x):
        _, h_n = self.rnn(x)
        return self.head(h_n[-1])


def make_batch(B, T, generator, device):
    """±1 symbols (B, T, 1) and labels (B,): 1 where their sum is positive."""
    x = torch.randint(0, 2, (B, T, 1), generator=generator).float() * 2 - 1
    return x.to(device), (x.sum(dim=(1, 2)) > 0).long().to(device)


def per_sample_grads(model, x, labels):
    """{name: (B, *shape)}: each sample's gradient, by vmap over the batch of grad of one sample's loss."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of_one(params, x, label):
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, label.unsqueeze(0))

    return vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, x, labels)


def loop_grads(model, x, labels):
    """The same by one backward per sample."""
    names = [k for k, _ in model.named_parameters()]
    rows = [torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), labels[i:i + 1]),
                                list(model.parameters())) for i in range(x.shape[0])]
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(names)}


def check(model, x, labels):
    """Max relative error ‖vmap − loop‖/‖loop‖ over the parameters, in float64."""
    model64, x64 = copy.deepcopy(model).double(), x.double()
    got, expected = per_sample_grads(model64, x64, labels), loop_grads(model64, x64, labels)
    return max(((got[k] - expected[k]).norm() / expected[k].norm()).item() for k in expected)


def timed(fn, repeats):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def dp_sgd_step(model, x, labels, clip, noise, lr, generator):
    """Clip each sample's gradient to norm clip, sum, add N(0, (noise·clip)²) noise, average, step."""
    grads = per_sample_grads(model, x, labels)
    B = x.shape[0]
    norms = torch.sqrt(sum(g.reshape(B, -1).square().sum(1) for g in grads.values()))  # (B,)
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = (grads[name] * scale.view(-1, *[1] * p.dim())).sum(0)
            g += torch.randn(p.shape, generator=generator).to(p.device) * noise * clip
            p -= lr * g / B
    return norms


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small CPU run (under a minute), as CI runs it")
    p.add_argument("--out", default=None, help="folder for the JSON and Markdown record "
                                              "(default: examples/out/per_sample_gradients)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", help="auto, stepwise, persistent or reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 with --quick, else torch's)")
    p.add_argument("--batch", type=int, default=None, help="B (default 64; 16 with --quick)")
    p.add_argument("--steps-per-seq", dest="T", type=int, default=None, help="T (default 100; 10 with --quick)")
    p.add_argument("--hidden", type=int, default=None, help="H (default 128; 16 with --quick)")
    p.add_argument("--train-steps", type=int, default=None, help="DP-SGD steps (default 300; 60 with --quick)")
    p.add_argument("--clip", type=float, default=1.0, help="per-sample gradient norm bound C")
    p.add_argument("--noise", type=float, default=0.5, help="noise multiplier σ")
    p.add_argument("--lr", type=float, default=0.5)
    args = p.parse_args(argv)
    defaults = (16, 10, 16, 60) if args.quick else (64, 100, 128, 300)
    B, T, H, steps = (v if v is not None else d for v, d in zip((args.batch, args.T, args.hidden, args.train_steps),
                                                                 defaults))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "per_sample_gradients")
    os.makedirs(out, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.quick else threads))
    try:
        return run(args, B, T, H, steps, out)
    finally:
        torch.set_num_threads(threads)


def run(args, B, T, H, steps, out):
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = Classifier(H, args.backend, args.device)

    x, labels = make_batch(B, T, generator, args.device)
    max_rel_err = check(model, x, labels)
    repeats = 3 if args.quick else 5
    vmap_s = timed(lambda: per_sample_grads(model, x, labels), repeats)
    loop_s = timed(lambda: loop_grads(model, x, labels), repeats)
    print(f"per-sample gradients, B = {B}, T = {T}, H = {H}, {args.backend} on {args.device}: "
          f"vmap {vmap_s * 1e3:.1f} ms, loop {loop_s * 1e3:.1f} ms ({loop_s / vmap_s:.1f}x); "
          f"max relative difference {max_rel_err:.1e}")

    test = make_batch(512, T, generator, args.device)
    losses = []
    for step in range(steps):
        x, labels = make_batch(B, T, generator, args.device)
        dp_sgd_step(model, x, labels, args.clip, args.noise, args.lr, generator)
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            with torch.no_grad():
                logits = model(test[0])
                loss = nn.functional.cross_entropy(logits, test[1]).item()
                accuracy = (logits.argmax(1) == test[1]).float().mean().item()
            losses.append((step, loss, accuracy))
            print(f"step {step:4d}: test loss {loss:.3f}, accuracy {accuracy:.3f}")

    record = dict(B=B, T=T, H=H, backend=args.backend, device=args.device, quick=args.quick, clip=args.clip,
                  noise=args.noise, max_rel_err=max_rel_err, vmap_s=vmap_s, loop_s=loop_s,
                  speedup=loop_s / vmap_s, first_loss=losses[0][1], final_loss=losses[-1][1],
                  final_accuracy=losses[-1][2], curve=losses)
    with open(os.path.join(out, "per_sample_gradients.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(out, "per_sample_gradients.md"), "w") as f:
        f.write(f"# DP-SGD on ElmanRNN ({args.backend}, {args.device}{', --quick' if args.quick else ''})\n\n"
                f"Per-sample gradients at B = {B}, T = {T}, H = {H}: vmap {vmap_s * 1e3:.1f} ms, a loop over "
                f"the batch {loop_s * 1e3:.1f} ms ({loop_s / vmap_s:.1f}x); max relative difference "
                f"{max_rel_err:.1e}.\n\n| step | test loss | accuracy |\n|---:|---:|---:|\n"
                + "".join(f"| {s} | {l:.3f} | {a:.3f} |\n" for s, l, a in losses))
    return record


if __name__ == "__main__":
    main()
