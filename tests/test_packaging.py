"""What is installed, and what it needs: the package list, the CLI's name, the extras.

- pyproject.toml lists its packages by hand (the CLI folder tools/ installs as
  ``tierstore_cli``, and a mapped folder cannot be found automatically): a package folder
  missing from the list would be left out of every wheel.
- The store needs only its core dependencies: importing it, building, verifying,
  serving, and the store's CLI run in a subprocess where every optional dependency (and
  the model package) cannot be imported. ``trace`` is the model's command: listed when the
  model can be imported, a one-line error when it cannot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# Importable as: folder on disk
PACKAGE_ROOTS = {"tierstore": "tierstore", "engram_model": "engram_model", "tierstore_cli": "tools"}
# Everything outside the core dependencies, and the model package
OPTIONAL = ["engram_model", "matplotlib", "tokenizers", "safetensors", "lmdb", "psutil", "cachetools",
            "libcachesim", "kvikio", "pytest"]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_package_list_names_every_package_folder():
    st = _pyproject()["tool"]["setuptools"]
    assert st["package-dir"] == {"tierstore_cli": "tools"}
    on_disk = set()
    for name, folder in PACKAGE_ROOTS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            if "__pycache__" not in rel:
                on_disk.add(".".join((name, *rel)))
    assert sorted(st["packages"]) == sorted(on_disk), "add the new package to [tool.setuptools] packages"
    assert "tools" not in st["packages"]  # a generic top-level name collides with other projects'


def test_console_script_and_commands_are_registered():
    from importlib.metadata import entry_points

    proj = _pyproject()["project"]
    assert proj["scripts"] == {"tierstore": "tierstore_cli.cli:main"}
    assert proj["entry-points"]["tierstore.commands"] == {"trace": "engram_model.trace:add_parser"}
    installed = {ep.name: ep.value for ep in entry_points(group="tierstore.commands")}
    assert installed.get("trace") == "engram_model.trace:add_parser", \
        "the installed metadata predates the entry point: pip install -e . again"


def test_core_dependencies_name_no_extra():
    proj = _pyproject()["project"]
    core = {d.split(">")[0].split("<")[0].split("=")[0].strip() for d in proj["dependencies"]}
    assert core == {"torch", "numpy", "numba", "zstandard", "tqdm"}
    assert "torch>=2.4,<3" in proj["dependencies"]  # a range: only the Makefile pins torch
    extras = proj["optional-dependencies"]
    assert {"model", "plot", "bench", "test", "gpu"} <= set(extras)


def test_trace_is_listed_when_the_model_can_be_imported():
    from tierstore_cli.cli import make_parser

    help_text = make_parser().format_help()
    for cmd in ("build", "inspect", "verify", "gc", "profile", "size", "trace"):
        assert cmd in help_text
    assert "unavailable" not in help_text


# Runs in a fresh interpreter: block the optional modules, then run each step in-process
# and report exit codes and output as one JSON line.
_SCRIPT = r"""
import contextlib, importlib.abc, io, json, sys
import numpy as np

BLOCKED = set(sys.argv[1].split(","))
tried = set()


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            tried.add(name.split(".")[0])
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, Block())
ckpt, work = sys.argv[2], sys.argv[3]
import tierstore
from tierstore_cli.cli import main

steps = {
    "build": ["build", ckpt, f"{work}/store", "--tables", r"blocks\.3\.", "--quiet"],  # one table: a .npy trace maps onto it
    "inspect": ["inspect", f"{work}/store", "--json"],
    "verify": ["verify", f"{work}/store", "--quiet"],
    "profile": ["profile", "--trace", f"{work}/t.npy", "--store", f"{work}/store", "--capacity", "0.1",
                "--policy", "lru,default", "--json"],
    "save_profile": ["profile", "--trace", f"{work}/t.npy", "--store", f"{work}/store", "--save-profile"],
    "size": ["size", "--trace", f"{work}/t.npy", "--store", f"{work}/store", "--device-hit", "0.2",
             "--total-hit", "0.5", "--json"],
    "plot": ["profile", "--trace", f"{work}/t.npy", "--store", f"{work}/store", "--plot", f"{work}/hit.png"],
    "help": ["--help"],
    "trace": ["trace", "--store", f"{work}/store", "--stdlib", "--out", f"{work}/t.trace.zst"],
}
res = {}
for name, argv in steps.items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    res[name] = {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}
want = np.load(f"{work}/rows.npy")
with tierstore.open(f"{work}/store", device="cpu", device_budget="8KiB", host_budget="16KiB") as st:
    got = st.lookup("blocks.3.engram.memory.weight", np.arange(want.shape[0])).numpy()
res["serve_bit_exact"] = bool(np.array_equal(got.view(np.uint8), want.view(np.uint8)))
res["tried"] = sorted(tried)
res["imported"] = sorted(m for m in BLOCKED if m in sys.modules)
print(json.dumps(res))
"""


def test_store_and_its_cli_run_without_optional_dependencies(small_ckpt, tmp_path):
    ckpt, tensors = small_ckpt
    np.save(tmp_path / "rows.npy", tensors["blocks.3.engram.memory.weight"].numpy())
    np.save(tmp_path / "t.npy", np.random.default_rng(0).zipf(1.3, 4000) % 1201)
    p = subprocess.run([sys.executable, "-c", _SCRIPT, ",".join(OPTIONAL), str(ckpt), str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for step in ("build", "inspect", "verify", "profile", "save_profile", "size"):
        assert res[step]["rc"] == 0, (step, res[step]["err"][-2000:])
    assert [t["name"] for t in json.loads(res["inspect"]["out"])["tables"]] == ["blocks.3.engram.memory.weight"]
    assert {r["policy"] for r in json.loads(res["profile"]["out"])["results"]} == {"lru", "default"}
    assert json.loads(res["size"]["out"])["sizes"][0]["device_hit_ratio"] >= 0.2
    assert res["serve_bit_exact"] and res["imported"] == []
    # plots and trace need what is blocked: one line each, naming what to install
    assert res["plot"]["rc"] == 2 and res["plot"]["err"].count("\n") == 1
    assert "pip install 'tierstore[plot]'" in res["plot"]["err"]
    assert res["help"]["rc"] == 0 and "profile" in res["help"]["out"]
    assert "unavailable commands:\n  trace: the command comes from engram_model.trace:add_parser" in res["help"]["out"]
    assert res["trace"]["rc"] == 2 and res["trace"]["err"].count("\n") == 1
    assert res["trace"]["err"].startswith("tierstore trace: error: the command comes from engram_model.trace")
    # negative control: the blocker was in the way of what plot and trace import
    assert {"engram_model", "matplotlib"} <= set(res["tried"])
