"""Fixtures shared by the format tests."""

from __future__ import annotations

import errno
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


def refuse_o_direct(monkeypatch: pytest.MonkeyPatch, where: str) -> list[object]:
    """Make the filesystem refuse O_DIRECT, as some do: with EINVAL at ``open`` (``where ==
    "open"``) or at the first transfer through a direct descriptor (``"write"``). Returns the
    list of refusals (flags or descriptors), which grows as writers try."""
    real_open, real_pwrite = os.open, os.pwrite
    direct_fds: set[int] = set()
    refused: list[object] = []

    def fake_open(path, flags, *a):
        if flags & os.O_DIRECT and where == "open":
            refused.append(flags)
            raise OSError(errno.EINVAL, "Invalid argument", path)
        fd = real_open(path, flags, *a)
        (direct_fds.add if flags & os.O_DIRECT else direct_fds.discard)(fd)  # numbers are reused
        return fd

    def fake_pwrite(fd, data, offset):
        if fd in direct_fds:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr("tierstore.files.os.pwrite", fake_pwrite)
    return refused
