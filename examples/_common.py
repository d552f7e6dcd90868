"""What every example shares: its command line, a progress bar, the output folder, tables and figures.

tqdm and matplotlib are optional extras (`pip install elman-triton[bench]`): without tqdm (or when
stderr is not a terminal) the progress is printed every tenth of the run and every 5 minutes,
without matplotlib no PNG is written (the Markdown table still is).
"""
import argparse
import json
import os
import platform
import sys
import time

import torch
import triton


def parser(description):
    """The flags every example takes; each adds its own."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small CPU run (under a minute), as CI runs it")
    p.add_argument("--out", default=None, help="folder for the PNG and the Markdown table (default: examples/out/<name>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", help="elman_rnn backend: auto, stepwise, persistent or reference")
    p.add_argument("--seed", type=int, default=0)
    return p


def training_flags(p, steps, batch, lr, eval_every=None):
    """The optimisation flags the training examples share (Adam, gradient norm clipping)."""
    p.add_argument("--steps", type=int, default=steps, help="training steps")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr, help="Adam learning rate")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    if eval_every is not None:
        p.add_argument("--eval-every", type=int, default=eval_every, help="steps between evaluations")


def optimize(optimizer, loss, model, clip):
    """One training step: backward, clip the gradient norm, update."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()


def parse(p, argv, quick):
    """Parse argv; with --quick, the values in quick replace the defaults (flags given still win)."""
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**quick)
        args = p.parse_args(argv)
    return args


def setup(args, name):
    """Seed, create the output folder, and return it."""
    torch.manual_seed(args.seed)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", name)
    os.makedirs(out, exist_ok=True)
    return out


def progress(total, desc):
    """A progress bar over range(total): tqdm where installed and writing to a terminal, else a line
    every tenth (a log file gets ten lines, not a stream of carriage returns)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, desc)
    if not sys.stderr.isatty():
        return _PlainProgress(total, desc)
    return tqdm(range(total), desc=desc, mininterval=1.0, leave=False)


class _PlainProgress:
    """A line every tenth of the run, and at least every 5 minutes (a run cut by a time budget)."""

    def __init__(self, total, desc):
        self.total, self.desc, self.postfix = total, desc, ""

    def __iter__(self):
        start = last = time.time()
        for i in range(self.total):
            yield i
            now = time.time()
            if (i + 1) % max(1, self.total // 10) == 0 or i + 1 == self.total or now - last > 300:
                print(f"{self.desc}: {i + 1}/{self.total} ({now - start:.0f} s) {self.postfix}", flush=True)
                last = now

    def set_postfix_str(self, text):
        self.postfix = text

    def close(self):
        pass


def pyplot():
    """matplotlib.pyplot with a file backend, or None if matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, out, name):
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def write_results(out, name, title, sections, record):
    """<name>.md (see write_markdown) and <name>.json (record plus the machine); returns pyplot() for the
    figure, or None."""
    write_markdown(out, f"{name}.md", title, sections)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(dict(record, machine=machine()), f)
    return pyplot()


def write_markdown(out, name, title, sections):
    """A Markdown file of a title, the machine, and sections: strings, or (header, rows) tables."""
    lines = [f"# {title}", "", f"Machine: {machine()}", ""]
    for section in sections:
        if isinstance(section, str):
            lines += [section, ""]
        else:
            header, rows = section
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
            lines.append("")
    path = os.path.join(out, name)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {path}")
    return path


def machine():
    """Where this ran: device, cores, versions."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        device = f"CPU ({platform.processor() or platform.machine()}, {cores} cores usable, {torch.get_num_threads()} torch threads)"
    return f"{device}; torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}"
