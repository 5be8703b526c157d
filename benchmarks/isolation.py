"""Run a benchmark step in a child process, measured and, where the machine allows, memory-limited.

* :func:`run_measured`: a command's wall time, peak resident set and block I/O
  (``ru_inblock``/``ru_oublock``). The peak comes from GNU ``/usr/bin/time -f %M``, which
  forks the command from its own small process: the ``ru_maxrss`` that ``wait4`` reports for
  a child that Python started is polluted by the parent, because ``subprocess`` uses
  ``vfork`` and Linux carries the old address space's high-water mark across ``exec``
  (a child of a 1.3 GB benchmark reported 1.3 GB whatever it did). Without
  ``/usr/bin/time`` the polluted figure is returned and ``rss_clean`` is False.
* :class:`MemoryGroup`: a cgroup v1 memory group, created under this process's own group
  (``/proc/self/cgroup``), so the limit sits inside whatever the machine already imposes.
  Its limit counts anonymous memory *and* the page cache the group faults in: the one fair
  way to give a tiered store and a memory-mapped baseline "the same memory". Returns None
  where cgroup v1 memory is absent or not writable (not root, cgroup v2): callers then
  measure resident memory and page cache instead, and must say so.

``systemd-run -p MemoryMax=`` would do the same through systemd; it needs a running systemd
(this machine kind has the binary but no systemd as PID 1), so it is not tried.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ChildRun", "run_measured", "MemoryGroup", "io_counters"]

_V1_ROOT = Path("/sys/fs/cgroup/memory")
_TIME = "/usr/bin/time"  # GNU time


@dataclass(frozen=True)
class ChildRun:
    """What one measured child did."""

    returncode: int  # negative: killed by that signal (-9: OOM-killed under a MemoryGroup)
    seconds: float
    max_rss_bytes: int  # peak resident set of the child (anonymous + mapped file pages; not page cache)
    rss_clean: bool  # False: /usr/bin/time missing, max_rss_bytes may be the parent's (see the module docstring)
    read_bytes: int  # block reads (512-byte units from rusage, as bytes)
    write_bytes: int
    log: Path  # the child's stdout and stderr


def run_measured(cmd: list[str], *, log: Path, group: MemoryGroup | None = None, cwd: str | None = None,
                 env: dict[str, str] | None = None) -> ChildRun:
    """Run ``cmd`` to completion (inside ``group`` from its first instruction when given),
    its output to ``log``; returns its time, peak RSS and disk I/O. Does not raise on failure."""
    rss_file = log.with_suffix(".maxrss")
    rss_file.unlink(missing_ok=True)
    clean = os.access(_TIME, os.X_OK)
    if clean:
        cmd = [_TIME, "-f", "%M", "-o", str(rss_file), *cmd]
    if group is not None:
        cmd = group.wrap(cmd)
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    peak = ru.ru_maxrss * 1024
    if clean:
        try:
            peak = int(rss_file.read_text().split()[-1]) * 1024  # KiB; killed children leave a note first
        except (OSError, ValueError, IndexError):
            clean = False
    return ChildRun(p.returncode, dt, peak, clean, ru.ru_inblock * 512, ru.ru_oublock * 512, log)


def io_counters(pid: int | str = "self") -> dict[str, int]:
    """``/proc/PID/io`` as ints (read_bytes: bytes this process caused to be read from disk)."""
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, v = line.split(":")
        out[k.strip()] = int(v)
    return out


class MemoryGroup:
    """One cgroup v1 memory group for one child at a time; remove() when done.

    Thread-safety: none needed; one benchmark process drives it.
    """

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls, name: str) -> MemoryGroup | None:
        """A new group ``name`` under this process's memory group, or None where that cannot be
        made (no cgroup v1 memory controller, or no permission)."""
        try:
            mine = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                        if line.split(":", 2)[1] == "memory")
        except (OSError, StopIteration, IndexError):
            return None
        path = _V1_ROOT / mine.lstrip("/") / name
        try:
            path.mkdir()
            (path / "memory.limit_in_bytes").write_text("-1")  # writable: a group we control
        except OSError:
            try:
                path.rmdir()
            except OSError:
                pass
            return None
        return cls(path)

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` started inside the group: a shell joins it, then execs the command."""
        return ["sh", "-c", f'echo $$ > "{self.path / "cgroup.procs"}" && exec "$@"', "sh", *cmd]

    def _read(self, name: str) -> str:
        return (self.path / name).read_text().strip()

    def set_limit(self, nbytes: int) -> None:
        """Anonymous memory + page cache of the group's processes may not exceed ``nbytes``
        (the kernel reclaims page cache first, then OOM-kills)."""
        (self.path / "memory.limit_in_bytes").write_text(str(int(nbytes)))

    def limit(self) -> int:
        return int(self._read("memory.limit_in_bytes"))

    def usage(self) -> int:
        return int(self._read("memory.usage_in_bytes"))

    def max_usage(self) -> int:
        return int(self._read("memory.max_usage_in_bytes"))

    def reset_max_usage(self) -> None:
        (self.path / "memory.max_usage_in_bytes").write_text("0")

    def stat(self) -> dict[str, int]:
        """memory.stat (cache, rss, mapped_file, pgmajfault, ...)."""
        return {k: int(v) for k, v in (line.split() for line in self._read("memory.stat").splitlines())}

    def failcnt(self) -> int:
        """Times the group hit its limit."""
        return int(self._read("memory.failcnt"))

    def remove(self) -> None:
        """Delete the group (its processes must have exited); charged page cache moves to the parent."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # EBUSY right after the last process exits
                time.sleep(0.1)

    @staticmethod
    def at(path: str | os.PathLike[str]) -> MemoryGroup:
        """The group at ``path`` (a child reopens its parent's group by path)."""
        return MemoryGroup(Path(path))
