"""The import graph obeys the layering of docs/architecture.md: no package imports one above it.

Every `import` in xqat/ counts, including the lazy ones inside functions (they are still dependencies)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "xqat"

# Lowest first, as in docs/architecture.md; names on one line share a layer.
LAYERS = [
    {"errors", "table"},
    {"tflite"},
    {"edgetpu"},
    {"torch_side"},
    {"export"},
    {"verify"},
    {"checkpoint"},
    {"demo"},
    {"cli", "__main__", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(module: str) -> str:
    """The layer unit of a dotted module path inside xqat: 'xqat.export.api' -> 'export'; 'xqat' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every xqat import in one file."""
    pkg = list(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])  # the package a relative import is in
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "xqat"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # from . import x: x is a submodule of base
                    out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
                    continue
            else:
                mod = node.module or ""
            if mod.split(".")[0] == "xqat":
                out.append((node.lineno, mod))
    return out


def test_every_package_is_in_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.is_file() and p.suffix == ".py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert units <= set(RANK), f"add these to LAYERS and docs/architecture.md: {sorted(units - set(RANK))}"


def test_no_package_imports_one_above_it():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        src = _unit(".".join(rel.parts)) if len(rel.parts) > 1 else "__init__"
        for line, mod in _imports(path):
            dst = _unit(mod)
            if dst in RANK and src in RANK and RANK[dst] > RANK[src]:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {src} imports {mod} ({dst})")
    assert not violations, "imports against the layering of docs/architecture.md:\n" + "\n".join(violations)


def test_no_module_over_600_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"split these by concern: {long}"
