"""What every example shares: its command line, a progress bar, the output folder, tables and figures.

tqdm and matplotlib are optional extras (`pip install elman-triton[bench]`): without tqdm (or when
stderr is not a terminal) the progress is printed every tenth of the run and every 5 minutes,
without matplotlib no PNG is written (the Markdown table still is).

--quick is a smoke run: small sizes on one CPU thread, under a minute on 2 cores. It shows the example
runs; its screen output, table and figure say so, and where the small run cannot show the example's
point they name the recorded full run under examples/results/.
"""
import argparse
import json
import os
import platform
import sys
import time

import torch
import triton


RESULTS = "examples/results"  # the recorded full runs, with their commands (README.md there)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except None ones: their help text says what happens instead."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parser(description):
    """The flags every example takes; each adds its own."""
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run, as CI runs it: small sizes on one CPU thread, under a minute on 2 cores; it "
                        f"shows the example runs, the recorded full runs are in {RESULTS}/")
    p.add_argument("--out", default=None, help="folder for the PNG and the Markdown table (default: examples/out/<name>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", help="elman_rnn backend: auto, stepwise, persistent or reference")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --quick, else torch's own): small models on many "
                        "threads mostly wait for each other")
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


def setup(args, name, recorded=None, shows_point=True):
    """Seed, set the CPU threads, create the output folder, and return it. A --quick run says it is a smoke
    run, now and in args.smoke (smoke_note, which recorded and shows_point go to; None for a full run)."""
    torch.manual_seed(args.seed)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    args.smoke = smoke_note(args, recorded, shows_point)
    remind(args)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", name)
    os.makedirs(out, exist_ok=True)
    return out


def smoke_note(args, recorded=None, shows_point=True):
    """What a --quick run is, None for a full run. recorded: the full run's file under examples/results/;
    shows_point=False where the small run cannot show the example's point, and the note says so."""
    if not args.quick:
        return None
    where = plural(torch.get_num_threads(), "CPU thread") if args.device == "cpu" else args.device
    note = f"smoke run (--quick): small sizes, {where}; it shows the example runs"
    if recorded and not shows_point:
        return note + f", not its result: see the recorded full run, {RESULTS}/{recorded}"
    return note + (f"; the recorded full run: {RESULTS}/{recorded}" if recorded else "")


def remind(args):
    """Print the smoke-run note (at the start of a run and after its results), if it is one."""
    if getattr(args, "smoke", None):
        print("SMOKE RUN" + args.smoke[len("smoke run"):], flush=True)


def plural(n, word):
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


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


def save_figure(fig, out, name, smoke=None):
    """Save fig as out/name; a smoke run's figure carries its note (smoke_note) across the top."""
    path = os.path.join(out, name)
    if smoke:
        fig.suptitle(smoke[0].upper() + smoke[1:], color="firebrick", fontsize=9, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 0.95) if smoke else None)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def write_results(out, name, title, sections, record, smoke=None):
    """<name>.md (see write_markdown) and <name>.json (record plus the machine); returns pyplot() for the
    figure, or None. smoke (args.smoke) marks a --quick run in the title, above the table and in the JSON."""
    if smoke:
        title, sections = f"{title}: SMOKE RUN", [f"**{smoke[0].upper() + smoke[1:]}.**", *sections]
    write_markdown(out, f"{name}.md", title, sections)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(dict(record, machine=machine(), smoke_run=smoke), f)
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
