"""Import rules: which quire package may import which. They are data (RULES) so the README can
state them, and they are checked statically over the source, on every import statement:
absolute and relative, at module level or inside a function, and under `if TYPE_CHECKING:`
too. A TYPE_CHECKING import is still a dependency of the design (and `from __future__ import
annotations` makes none necessary), so it counts. `importlib.import_module("literal")` counts
as well; imports built from computed names are out of reach.

The light commands (`quire --help`, `plan`, `bench serve`) are checked at run time as well: in
a fresh interpreter they must not load torch, transformers or the worker."""
from __future__ import annotations

import ast
import json
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {f"quire.{top}": ROOT / top for top in ("protos", "kernels", "worker", "cluster")}


@dataclass(frozen=True)
class Import:
    path: Path  # the importing file
    line: int
    module: str  # the importing module, e.g. quire.cluster.core.engine
    target: str  # what it imports: `from a.b import c` gives a.b.c (a module or a name in a.b)

    def __str__(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}: {self.module} imports {self.target}"


def find_imports(package_dir: Path, package: str) -> list[Import]:
    """Every import in the .py files under `package_dir`, the folder of the dotted `package`,
    with relative imports resolved to absolute names."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        is_init = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_init else parts)
        here = module.split(".") if is_init else module.split(".")[:-1]  # the package `.` refers to
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(filter(None, [*here[:len(here) - node.level + 1], node.module])) \
                    if node.level else node.module
                targets = [base if alias.name == "*" else f"{base}.{alias.name}" for alias in node.names]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                  in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)):
                targets = [node.args[0].value]
            else:
                continue
            found.extend(Import(path, node.lineno, module, target) for target in targets)
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@dataclass(frozen=True)
class Rule:
    """No module in `importer` (a package, with its subpackages) imports anything in `forbidden`,
    except the modules listed in `allowed`."""
    importer: str
    forbidden: tuple[str, ...]
    why: str
    allowed: tuple[str, ...] = ()

    def violations(self, imports: list[Import]) -> list[Import]:
        return [imp for imp in imports if within(imp.module, self.importer) and imp.module not in self.allowed
                and any(within(imp.target, name) for name in self.forbidden)]


RULES = [
    Rule("quire.protos", ("quire.cluster", "quire.worker", "quire.kernels"),
         "the wire contracts are what both sides share: everything may import them, they import no other part"),
    Rule("quire.kernels", ("quire.cluster", "quire.worker"),
         "kernels are leaf compute, called by the worker"),
    Rule("quire.worker", ("quire.cluster",),
         "a rank knows the wire contracts and kernels only; it never loads controller code"),
    Rule("quire.cluster", ("quire.worker",),
         "the controller talks to ranks through the executor contract (protos), not by importing them",
         allowed=("quire.cluster.executor.inproc",  # runs the one rank in the controller's process
                  "quire.cluster.executor.ray_launcher")),  # a Ray actor hosts the worker's gRPC server
    Rule("quire.cluster", ("quire.kernels",), "the controller plans steps; kernels run on the ranks"),
    Rule("quire.cluster.core", ("quire.cluster.serving", "quire.cluster.tools", "quire.cluster.cli"),
         "the engine knows no frontend, tool or command line: they are built on it"),
    Rule("quire.cluster.executor", ("quire.cluster.serving", "quire.cluster.tools", "quire.cluster.cli"),
         "executors serve the engine, below every frontend and tool"),
    Rule("quire.cluster.tools", ("quire.cluster.core", "quire.cluster.executor", "quire.cluster.serving",
                                 "quire.worker", "quire.kernels"),
         "the planner and the benchmark are standalone clients: they run where no engine is loaded"),
    Rule("quire", ("quire.cluster.cli",), "the command line is the top of the graph: nothing imports it"),
]


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return [imp for package, folder in PACKAGES.items() for imp in find_imports(folder, package)]


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: f"{rule.importer}-not-{'+'.join(rule.forbidden)}")
def test_import_rule(rule, imports):
    assert any(within(imp.module, rule.importer) for imp in imports), f"no modules found in {rule.importer}"
    found = rule.violations(imports)
    assert not found, f"{rule.why}:\n" + "\n".join(map(str, found))


def test_checker_reports_violations_with_file_and_line(tmp_path):
    package = tmp_path / "protos"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from . import sub\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "mod.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from quire.cluster.core import engine\n"
        "if TYPE_CHECKING:\n"
        "    from ...worker import server\n"  # relative, resolved beyond quire.protos
        "def f():\n"
        "    import quire.kernels.triton_attention as t\n"
        "    return importlib.import_module('quire.cluster.cli')\n")
    imports = find_imports(package, "quire.protos")
    assert ("quire.protos", "quire.protos.sub") in {(imp.module, imp.target) for imp in imports}
    found = [(imp.path.name, imp.line, imp.target) for imp in RULES[0].violations(imports)]
    assert found == [("mod.py", 2, "quire.cluster.core.engine"), ("mod.py", 4, "quire.worker.server"),
                     ("mod.py", 6, "quire.kernels.triton_attention"), ("mod.py", 7, "quire.cluster.cli")]
    assert str(RULES[0].violations(imports)[0]).endswith("mod.py:2: quire.protos.sub.mod imports "
                                                          "quire.cluster.core.engine")


def test_checker_honours_the_allowed_modules(tmp_path):
    executor = tmp_path / "cluster" / "executor"
    executor.mkdir(parents=True)
    for name in ("inproc.py", "grpc_executor.py"):
        (executor / name).write_text("def start():\n    import quire.worker.worker\n")
    (rule,) = [rule for rule in RULES if rule.forbidden == ("quire.worker",) and rule.importer == "quire.cluster"]
    found = rule.violations(find_imports(tmp_path / "cluster", "quire.cluster"))
    assert [(imp.module, imp.line) for imp in found] == [("quire.cluster.executor.grpc_executor", 2)]


HEAVY = ("torch", "transformers", "quire.worker")
PROBE = """
import json, sys
from quire.cluster.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in %r))
print(json.dumps({"code": code, "heavy": heavy}))
""" % (HEAVY,)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["plan", "--model", "llama-3-70b", "-tp", "4"],
    ["bench", "serve", "--help"],
    # A real run, against nothing: both requests fail fast, so the exit code is 1.
    ["bench", "serve", "--base-url", "http://127.0.0.1:{port}", "--num-prompts", "2", "--input-len", "4",
     "--output-len", "2", "--timeout", "10"],
], ids=["help", "plan", "bench-serve-help", "bench-serve-run"])
def test_light_commands_load_neither_torch_nor_the_worker(argv):
    argv = [arg.format(port=closed_port()) for arg in argv]
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] == (1 if "--base-url" in argv else 0), out.stderr[-2000:]
    assert result["heavy"] == [], f"`quire {' '.join(argv)}` imported {result['heavy']}"
