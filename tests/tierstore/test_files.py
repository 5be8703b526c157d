"""The atomic writer: a killed writer's temporary file is removed by the next write."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tierstore.files import atomic_write

REPO = Path(__file__).resolve().parents[2]

# writes the new bytes to the temporary sibling, then dies (SIGKILL) before the rename
KILLED = textwrap.dedent("""
    import os, signal, sys
    from tierstore import files
    os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
    files.atomic_write(sys.argv[1], b"torn")
""")


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "profile.json"
    atomic_write(target, b"old")
    p = subprocess.run([sys.executable, "-c", KILLED, str(target)], env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == -9
    (left,) = [n for n in os.listdir(tmp_path) if n != "profile.json"]
    assert left.startswith(".profile.json.tmp-") and target.read_bytes() == b"old"
    # a live writer's file (here: our parent's PID) is not touched
    live = tmp_path / f".profile.json.tmp-{os.getppid()}-1"
    live.write_bytes(b"writing")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == sorted(["profile.json", live.name]), "the dead writer's file stays"
