"""Fixtures shared by the format tests."""

from __future__ import annotations

import os
import subprocess

import pytest


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may create entries in, even root (immutable, where chattr works)."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("running as root where chattr +i does not work: cannot make a read-only directory")
    yield d
    subprocess.run(["chattr", "-i", str(d)], check=True)
