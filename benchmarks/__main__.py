"""The command line: python -m benchmarks (repository root), python -m elman_triton.bench or elman-bench."""
import os
import sys

from . import interpret_without_gpu


def main():
    as_module = __name__ == "__main__"  # python -m ..., else the elman-bench script
    if interpret_without_gpu() and not {"-h", "--help"} & set(sys.argv[1:]):
        # `python -m elman_triton.bench` and elman-bench import elman_triton (this package's parent) before
        # this line, too early for the interpreter: start again, with TRITON_INTERPRET=1 set from the start.
        sys.stdout.flush()
        command = [sys.executable, "-m", __package__] if as_module else [sys.executable, sys.argv[0]]
        os.execve(sys.executable, [*command, *sys.argv[1:]], {**os.environ, "TRITON_INTERPRET": "1"})
    from .cli import main as cli_main
    return cli_main(prog="python -m " + __package__ if as_module else os.path.basename(sys.argv[0]))


if __name__ == "__main__":
    sys.exit(main())
