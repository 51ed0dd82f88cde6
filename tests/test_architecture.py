"""The package's layering: one-way imports between subpackages and no import cycle, lazy
(function-level) imports included; and `import engram` stays light (docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "engram"

# Lower rank = lower layer. A module may import from its own subpackage or from a lower rank.
RANKS = {
    "engram.ops": 0,
    "engram.config": 1,
    "engram.core": 2,
    "engram.nn": 3,
    "engram.models": 4,
    "engram.storage": 4,
    "engram.demo": 4,
    "engram.compat": 5,
    "engram.training": 5,
    "engram.interop": 5,
    "engram.hf": 6,
    "engram.distributed": 6,
    "engram.evaluation": 7,
    "engram.cli": 8,
}
# Entry points above every layer: the package itself, its public shims (engram.offload; the seed
# code's module paths engram.tokenizer and engram.modules) and the Auto-class hook.
TOP = {"engram", "engram.__main__", "engram.offload", "engram.tokenizer", "engram.modules", "engram.hf_autoload"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> str | None:
    for prefix in sorted(RANKS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return None


def engram_imports(path: Path) -> set[str]:
    """Every engram module ``path`` imports, at any depth of the file (lazy imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "engram")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "engram":
            out.add(node.module)  # `from engram.hf import compat` runs engram/hf/__init__.py too
            for a in node.names:  # ... and names a module
                full = f"{node.module}.{a.name}"
                if (ROOT.parent / full.replace(".", "/")).with_suffix(".py").exists():
                    out.add(full)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; the package uses absolute engram.* imports")
    return out


GRAPH = {module_name(p): engram_imports(p) for p in ROOT.rglob("*.py")}


def test_every_module_has_a_layer():
    assert not [m for m in GRAPH if m not in TOP and layer(m) is None]


def test_imports_go_down_the_layers_only():
    bad = []
    for mod, deps in GRAPH.items():
        if mod in TOP:
            continue
        for dep in deps:
            if dep in TOP and dep != "engram":
                bad.append((mod, dep))
                continue
            a, b = layer(mod), layer(dep)
            if b is None or a == b:
                continue
            if RANKS[b] >= RANKS[a]:
                bad.append((mod, dep))
    assert not bad, "imports that go up or sideways between subpackages: " + repr(bad)


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH.get(m, ())):
            if d not in GRAPH or d == "engram":
                continue
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_import_engram_is_light():
    """`import engram` imports neither torch nor transformers (they load with what uses them)."""
    code = "import sys, engram; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_package_data_globs_match_the_files_a_non_editable_install_needs():
    """The C source and the demo corpus must ship in a wheel (a moved file once fell out of it)."""
    import re

    text = (ROOT.parent / "pyproject.toml").read_text()  # (tomllib is Python >= 3.11; we support 3.10)
    line = re.search(r"^\[tool\.setuptools\.package-data\]\s*\nengram\s*=\s*\[(.*?)\]", text, re.M | re.S).group(1)
    globs = re.findall(r'"([^"]+)"', line)
    shipped = {p for g in globs for p in ROOT.glob(g)}
    assert ROOT / "ops" / "csrc" / "engram_cpu.c" in shipped
    assert ROOT / "assets" / "tiny_corpus.txt" in shipped
