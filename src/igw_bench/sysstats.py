"""Per-process CPU time from ``/proc`` (Linux): ``utime + stime`` of a process and all its threads.

A benchmark samples it at the edges of a measured window; the difference over the window gives
CPU per request or a share of one core.
"""

from __future__ import annotations

import os
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """``utime + stime`` of a process (all its threads), in seconds; None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def sample_cpu(pids: dict[str, int]) -> dict[str, float | None]:
    """:func:`cpu_seconds` of each named process."""
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def child_pids(parent: int, comm: str | None = None) -> list[int]:
    """Processes whose parent is ``parent`` (optionally with this command name)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            data = (entry / "stat").read_bytes()
        except OSError:
            continue
        name = data[data.index(b"(") + 1 : data.rindex(b")")].decode(errors="replace")
        fields = data[data.rindex(b")") + 2 :].split()
        if int(fields[1]) == parent and (comm is None or name == comm):
            found.append(int(entry.name))
    return found


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process (``VmRSS``), in bytes; None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (children, their children, ...)."""
    found = [pid]
    i = 0
    while i < len(found):
        found.extend(child_pids(found[i]))
        i += 1
    return found
