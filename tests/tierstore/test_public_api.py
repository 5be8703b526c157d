"""The public names stay: every error is exported, and each module that moved keeps its old
import path for one minor version, with a DeprecationWarning naming the new path."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

import tierstore
from tierstore import errors
from tierstore.moved import MOVED


def test_every_error_class_is_exported():
    classes = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, tierstore.TierStoreError)}
    assert classes <= set(errors.__all__), classes - set(errors.__all__)
    assert classes <= set(tierstore.__all__), classes - set(tierstore.__all__)


def test_top_level_names_resolve():
    for name in tierstore.__all__:
        assert getattr(tierstore, name) is not None, name
    from tierstore.serve.distributed import ShardedStore, build_shard

    assert tierstore.build_shard is build_shard and tierstore.ShardedStore is ShardedStore


def test_moved_modules_warn_and_are_the_new_ones():
    # a fresh interpreter (in this one an old name may already sit in sys.modules); one for all
    code = ("import importlib, json, sys, warnings\n"
            "import tierstore\n"
            "from tierstore.moved import MOVED\n"
            "res = {}\n"
            "for old, new in MOVED.items():\n"
            "    with warnings.catch_warnings(record=True) as w:\n"
            "        warnings.simplefilter('always')\n"
            "        mod = importlib.import_module(old)\n"
            "    res[old] = [mod is importlib.import_module(new), [str(x.message) for x in w\n"
            "               if issubclass(x.category, DeprecationWarning)]]\n"
            "print(json.dumps(res))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(res) == set(MOVED)
    for old, (same, warned) in res.items():
        assert same, f"{old} is not {MOVED[old]}"
        assert len(warned) == 1 and warned[0].startswith(f"{old} moved to {MOVED[old]}"), (old, warned)


def test_old_path_in_process():
    with pytest.warns(DeprecationWarning, match="tierstore.serve.distributed"):
        mod = importlib.import_module("tierstore.distributed")
    assert mod is importlib.import_module("tierstore.serve.distributed")


def test_engram_model_uses_only_the_public_api():
    """The model imports ``tierstore`` and uses ``tierstore.X`` for X in ``tierstore.__all__``:
    never a module inside the package (``tierstore.serve.store``, ``tierstore.files``, ...)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "engram_model"
    bad = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tierstore"):
                if node.module != "tierstore" or node.level:
                    bad.append(f"{where} from {node.module} import ...")
                bad += [f"{where} tierstore.{a.name}" for a in node.names if a.name not in tierstore.__all__]
            elif isinstance(node, ast.Import):
                bad += [f"{where} import {a.name}" for a in node.names if a.name.startswith("tierstore.")]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "tierstore" \
                    and node.attr not in tierstore.__all__:
                bad.append(f"{where} tierstore.{node.attr}")
    assert not bad, f"engram_model reaches past tierstore's public API: {bad}"
