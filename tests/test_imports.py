"""The package's imports run one way: each file imports only from its own layer or a lower one, and no
files import each other in a circle. Read from the source with ast (nothing is imported), so a function-
local import counts as much as one at the top.

The layers, lowest first:

    kernels       kernels/*.py: the @triton.jit code (installed as elman_triton.kernels); imports only triton
                  and each other.
    launchers     config.py (buffer layout, options, direct launch), stepwise.py and persistent.py (the Triton
                  launchers); beside them the other building blocks the ops dispatch to: reference.py (the
                  plain PyTorch loop, the "reference" backend and the tests' oracle) and state_gradients.py
                  (the kernel-side ‖∂L/∂h_t‖ maths that the ops' backward calls).
    ops           ops.py: the ops, checks, dispatch, autograd Function and custom ops; family_ops.py: the
                  LSTM and GRU ops beside them.
    modules       modules.py: ElmanRNN, ElmanRNNCell (nn.RNN / nn.RNNCell drop-ins); family.py: the LSTM
                  and GRU modules beside them.
    research      diagnostics.py (record_state_gradients, through the modules' documented
                  state_grad_norms_hook) and init.py (irnn_, orthogonal_): tools built on the modules.
    package       __init__.py: the public names, re-exported.
    bench         benchmarks/*.py (installed as elman_triton.bench): the benchmark suite, on top of it all.

A new file must be given its layer in LAYERS below; until it is, test_every_file_has_a_layer fails and says so.
"""
import ast
import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["kernels", "launchers", "ops", "modules", "research", "package", "bench"]
LAYERS = {  # path from the repository root (or a pattern) -> layer
    "kernels/*.py": "kernels",
    "elman_triton/config.py": "launchers",
    "elman_triton/stepwise.py": "launchers",
    "elman_triton/persistent.py": "launchers",
    "elman_triton/reference.py": "launchers",
    "elman_triton/state_gradients.py": "launchers",
    "elman_triton/ops.py": "ops",
    "elman_triton/family_ops.py": "ops",  # the LSTM and GRU ops, on ops' checks and helpers
    "elman_triton/modules.py": "modules",
    "elman_triton/family.py": "modules",  # LSTM, GRU, LSTMCell, GRUCell, on modules' input handling
    "elman_triton/diagnostics.py": "research",
    "elman_triton/init.py": "research",
    "elman_triton/__init__.py": "package",
    "benchmarks/*.py": "bench",
}
# Where each package's modules live: elman_triton.kernels ships from the top-level kernels/ folder,
# elman_triton.bench from benchmarks/ (which also runs from the root as the package `benchmarks`).
PACKAGES = {"elman_triton": "elman_triton", "elman_triton.kernels": "kernels", "elman_triton.bench": "benchmarks",
            "benchmarks": "benchmarks"}


def package_files(root=ROOT):
    return sorted({p.relative_to(root).as_posix() for folder in PACKAGES.values() for p in (root / folder).glob("*.py")})


def layer_of(path):
    if path in LAYERS:
        return LAYERS[path]
    matches = [layer for pattern, layer in LAYERS.items() if fnmatch.fnmatch(path, pattern)]
    return matches[0] if matches else None


def module_file(name, root=ROOT):
    """The package file of a dotted module name, or None if it is not one of the package's files."""
    for package, folder in sorted(PACKAGES.items(), key=lambda item: -len(item[0])):
        if name == package:
            return f"{folder}/__init__.py"
        if name.startswith(package + "."):
            rest = name[len(package) + 1:]
            if "." not in rest and (root / folder / f"{rest}.py").exists():
                return f"{folder}/{rest}.py"
            return None
    return None


def imports_of(path, root=ROOT):
    """The package files that path imports (anywhere in it), as {file: line of the first import}."""
    folder = path.rsplit("/", 1)[0]
    package = next(p for p, f in PACKAGES.items() if f == folder)
    found = {}
    for node in ast.walk(ast.parse((root / path).read_text(), path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .common import x, from . import common
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # from package import name: the submodule if name is one, else the package's __init__
            names = [f"{base}.{alias.name}" if module_file(f"{base}.{alias.name}", root) else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            target = module_file(name, root)
            if target is not None and target != path:
                found.setdefault(target, node.lineno)
    return found


def import_graph(root=ROOT):
    return {path: imports_of(path, root) for path in package_files(root)}


def upward_imports(graph):
    """'a:line imports b' for every import from a lower layer to a higher one."""
    rank = {path: ORDER.index(layer_of(path)) for path in graph}
    return [f"{path}:{line} ({layer_of(path)}) imports {target} ({layer_of(target)})"
            for path, targets in graph.items() for target, line in targets.items() if rank[target] > rank[path]]


def circles(graph):
    """Import circles, each as the files around it from its first in sorted order back to it (depth-first
    search: every file on a circle is reported, though not every circle through the same files)."""
    found, state, stack = [], {}, []

    def visit(path):
        state[path] = "open"
        stack.append(path)
        for target in graph.get(path, {}):
            if state.get(target) == "open":
                circle = stack[stack.index(target):]
                start = circle.index(min(circle))  # told from its first file in sorted order, wherever found
                found.append(circle[start:] + circle[:start + 1])
            elif target not in state:
                visit(target)
        stack.pop()
        state[path] = "done"

    for path in sorted(graph):
        if path not in state:
            visit(path)
    return found


def test_every_file_has_a_layer():
    unassigned = [path for path in package_files() if layer_of(path) is None]
    assert not unassigned, (f"{unassigned}: assign each file a layer in tests/test_imports.py's LAYERS "
                            f"(one of {ORDER}; see the module docstring for what each layer holds)")


def test_imports_run_down_the_layers():
    graph = import_graph()
    if any(layer_of(path) is None for path in graph):
        return  # test_every_file_has_a_layer reports it
    upward = upward_imports(graph)
    assert not upward, "imports from a lower layer to a higher one (layers: " + " <- ".join(ORDER) + "):\n" + \
        "\n".join(upward)


def test_no_import_circle():
    found = circles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(circle) for circle in found)


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path):
    """The walker on a tiny package of its own: a relative import, a function-local import and
    `from package import submodule` all count; a circle and an import up the layers are both found."""
    (tmp_path / "elman_triton").mkdir()
    (tmp_path / "kernels").mkdir()
    files = {
        "kernels/__init__.py": "",
        "kernels/common.py": "import triton\n",
        "kernels/stepwise.py": "from .common import x\n",
        "elman_triton/__init__.py": "from elman_triton.modules import ElmanRNN\n",
        "elman_triton/config.py": "from elman_triton.kernels import stepwise\n",
        "elman_triton/ops.py": "from elman_triton import config, diagnostics\n",
        "elman_triton/modules.py": "from elman_triton.ops import elman_rnn\n",
        "elman_triton/diagnostics.py": "def f():\n    from elman_triton.modules import ElmanRNN\n",
    }
    for path, text in files.items():
        (tmp_path / path).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["kernels/stepwise.py"] == {"kernels/common.py": 1}
    assert graph["elman_triton/config.py"] == {"kernels/stepwise.py": 1}
    assert set(graph["elman_triton/ops.py"]) == {"elman_triton/config.py", "elman_triton/diagnostics.py"}
    assert upward_imports(graph) == ["elman_triton/ops.py:1 (ops) imports elman_triton/diagnostics.py (research)"]
    assert circles(graph) == [["elman_triton/diagnostics.py", "elman_triton/modules.py", "elman_triton/ops.py",
                               "elman_triton/diagnostics.py"]]
