"""The shape of the package: no import cycles among ``src/deltatune`` modules, no ``peft`` import, and a method
registered by one line (its ``PeftType`` member and its exports follow from the registry).

Imports are read from the source with :mod:`ast`, so imports inside functions and ``if TYPE_CHECKING:`` blocks count:
a lazy or type-only import still makes two modules depend on each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import deltatune
from deltatune import registry
from deltatune.config import PeftType

PACKAGE_ROOT = Path(deltatune.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth: inside functions and ``if TYPE_CHECKING:`` blocks too, since a
    type-only import still ties the two modules together for a reader (and for tools that draw the structure)."""
    return (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Absolute names an import node asks for: ``from . import a`` in ``pkg.m`` asks for ``pkg.a`` (a sub-module, or
    else an attribute of ``pkg``), ``from .a import X`` for ``pkg.a.X`` (an attribute of ``pkg.a`` unless a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [f"{base}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """``module -> deltatune modules it imports``, each name resolved to the longest module it names (``pkg.a.X`` is
    ``pkg.a`` when ``X`` is an attribute). The parent packages' ``__init__`` that every import also runs are left out:
    an edge to a package means the code asks the package itself for a name."""
    files = {_module_name(p): p for p in PACKAGE_ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = set()
        for node in _imports(tree):
            for name in _targets(node, module, path.name == "__init__.py"):
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    edges.add(name)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_lowest_modules_import_only_what_is_below_them():
    def imports(module: str) -> set[str]:
        return {name.removeprefix("deltatune.") for name in graph[f"deltatune.{module}"]}

    graph = import_graph()
    assert imports("files") <= {"errors"}  # config reads its file through it
    assert imports("registry") <= {"errors"}  # methods by string; configs import the registry
    assert "functional" not in imports("model")  # peft's module-level API sits above the wrapper


def test_src_never_imports_peft():
    offenders = []
    for path in PACKAGE_ROOT.rglob("*.py"):
        module = _module_name(path)
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if not getattr(node, "level", 0) and any(n == "peft" or n.startswith("peft.") for n in names):
                offenders.append(f"{module}:{node.lineno}")
    assert not offenders, f"src imports peft (a test-only oracle): {offenders}"


def test_the_checker_sees_lazy_and_type_only_imports():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .a import X\nelse:\n    from .b import Y\n"
        "def f():\n    from . import c\n    import deltatune.d.e\n"
    )
    found = {t for node in _imports(tree) for t in _targets(node, "deltatune.m", False)}
    assert {"deltatune.a.X", "deltatune.b.Y"} <= found
    assert {"deltatune.c", "deltatune.d.e"} <= found
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_peft_type_has_one_member_per_registered_method_spelled_as_peft_writes_it():
    assert [t.value for t in PeftType] == [t.name for t in PeftType] == [str(t) for t in registry.supported_types()]
    for peft_type in PeftType:
        assert registry.config_class(peft_type).peft_type_default() is peft_type
    assert str(PeftType.LORA) == f"{PeftType.LORA}" == "LORA" and PeftType("VERA") is deltatune.PeftType.VERA


def test_every_method_exports_its_public_names_from_deltatune():
    for module in registry.method_modules():
        assert module.__all__, f"{module.__name__} declares no public names"
        for name in module.__all__:
            assert getattr(deltatune, name) is getattr(module, name)
            assert name in deltatune.__all__ and name in dir(deltatune)
    namespace: dict = {}
    exec("from deltatune import *", namespace)
    assert {"LoraConfig", "PromptEncoder", "PeftModel", "get_peft_model"} <= set(namespace)


def test_importing_deltatune_imports_no_method():
    code = "import sys, deltatune; print(sorted(m for m in sys.modules if m.startswith('deltatune.methods.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
