"""The package's layers, checked: a lower layer never imports a higher one, no import cycles,
no module over ~600 lines, and the serving path loads none of the offline tools' libraries.

The layers, lowest first (docs/architecture.md):

0. foundation: ``tierstore.errors``, ``sizes``, ``faults``, ``files``, ``ids``, ``jit``, ``ranking``;
1. ``tierstore.format``: the on-disk format, checkpoint readers, build, verify, profiles;
2. ``tierstore.cache``: which rows each cache tier holds (compiled policies);
3. ``tierstore.tiers``: the tiers that hold rows and move bytes;
4. ``tierstore.serve`` (the runtime) and ``tierstore.analysis`` (offline replay and sizing),
   side by side: neither imports the other;
5. ``tierstore`` itself (its ``__init__``, the public face).

``engram_model`` builds on tierstore; tierstore never imports it. Every import counts,
including those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "tierstore"
FOUNDATION = {"errors", "sizes", "faults", "files", "ids", "jit", "ranking"}
RANK = {"format": 1, "cache": 2, "tiers": 3, "serve": 4, "analysis": 4}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> tuple[int, str]:
    """(rank, name) of a tierstore module; the package itself is the top."""
    parts = module.split(".")
    if parts == ["tierstore"] or parts == ["tierstore", "moved"]:  # the public face and its old paths
        return 5, "tierstore"
    if parts[1] in FOUNDATION:
        return 0, "foundation"
    if parts[1] in RANK:
        return RANK[parts[1]], parts[1]
    raise AssertionError(f"{module} belongs to no layer: add it to this test and to docs/architecture.md")


def _imports(path: Path, module: str, body_only: bool = False) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names), with the line: at any depth, or only
    the module-level statements with ``body_only``. ``from . import x`` imports the submodule
    ``x``, not the package."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    nodes = tree.body if body_only else ast.walk(tree)
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names]
            subs = [s for s in subs if (ROOT / (s.replace(".", "/") + ".py")).exists()
                    or (ROOT / s.replace(".", "/")).is_dir()]
            out += [(s, node.lineno) for s in subs]
            if len(subs) < len(node.names):
                out.append((target, node.lineno))
    return out


MODULES = {_module(p): p for p in sorted(PKG.rglob("*.py"))}


def test_every_module_has_a_layer():
    for m in MODULES:
        _layer(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_goes_up_or_sideways(module):
    rank, name = _layer(module)
    bad = []
    for target, line in _imports(MODULES[module], module):
        top = target.split(".")[0]
        if top in ("engram_model", "tools", "tierstore_cli", "benchmarks", "tests"):
            bad.append(f"line {line}: {target} (tierstore never imports the model, the CLI or tests)")
        if top != "tierstore" or target == "tierstore" and module == "tierstore":
            continue
        if target == "tierstore":
            bad.append(f"line {line}: the package's public face (import the module that defines the name)")
            continue
        trank, tname = _layer(target)
        if trank > rank or (trank == rank and tname != name):
            bad.append(f"line {line}: {target} ({tname}, layer {trank}) from {name} (layer {rank})")
    assert not bad, f"{module} imports above its layer:\n  " + "\n  ".join(bad)


def test_no_import_cycle():
    """Module-level imports only (a function-level import is how a needed cycle is broken)."""
    graph = {m: {t for t, _ in _imports(p, m, body_only=True) if t in MODULES and t != m}
             for m, p in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_over_600_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 620}
    assert not long, f"split these modules (over ~600 lines): {long}"


def test_serving_loads_no_offline_library(tmp_path):
    """Opening a store and looking rows up loads neither the builder nor the verifier, the
    analysis package, plotting, tokenizers or benchmark libraries: not the serving path's."""
    code = f"""
import sys, numpy as np, torch
from safetensors.torch import save_file
save_file({{"t.weight": torch.randn(5000, 16)}}, {str(tmp_path / 'c.safetensors')!r})
import subprocess
subprocess.run([sys.executable, "-c", "import tierstore; tierstore.build_store({str(tmp_path / 'c.safetensors')!r}, {str(tmp_path / 's')!r}, tables=r'.*')"], check=True)
import tierstore
with tierstore.open({str(tmp_path / 's')!r}, device_budget="16KiB", host_budget="32KiB") as st:
    st.lookup("t.weight", np.arange(100))
    st.prefetch("t.weight", np.arange(50)).result()
# (tqdm itself is not checked: torch imports it)
bad = sorted(m for m in ("matplotlib", "tokenizers", "lmdb", "engram_model", "tierstore.analysis",
                         "tierstore.format.build", "tierstore.format.verify", "psutil") if m in sys.modules)
print(bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
