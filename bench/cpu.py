"""How much of the proxy core went to something other than the proxy under test.

On a shared machine (other work running tests beside the benchmark) a figure can be low
because a neighbour took the proxy's core, not because the proxy was slow. Around every
wrk run the harness samples the core's busy time from ``/proc/stat`` and the CPU time of
the peer's processes (they are pinned to that core, children included) from
``/proc/<pid>/stat``; the difference is the neighbours' share, recorded with the run and
flagged in the table when it is large. The parsers are plain functions over the text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
# Above this share of the proxy core taken by other processes a run is flagged: a
# loopback benchmark's own noise is a few per cent, a neighbour's test run is tens.
FOREIGN_SHARE_FLAG = 0.10


@dataclass(frozen=True)
class CoreTimes:
    """Jiffies a core spent running tasks (user + nice + system) and in total."""

    task: int
    total: int


def parse_core_line(stat_text: str, cpu: int) -> CoreTimes:
    """Read ``cpuN user nice system idle iowait irq softirq steal ...`` from /proc/stat."""
    prefix = f"cpu{cpu} "
    for line in stat_text.splitlines():
        if line.startswith(prefix):
            values = [int(v) for v in line.split()[1:]]
            return CoreTimes(task=sum(values[0:3]), total=sum(values[0:8]))
    raise ValueError(f"no {prefix.strip()} line in /proc/stat")


def parse_pid_stat(text: str) -> tuple[int, int]:
    """(parent pid, utime + stime in jiffies) from one /proc/<pid>/stat line. The command
    name is in parentheses and may contain spaces or parentheses itself, so the fields
    are counted from the last ')'."""
    fields = text[text.rindex(")") + 2:].split()
    # after the name: state(0) ppid(1) ... utime(11) stime(12)
    return int(fields[1]), int(fields[11]) + int(fields[12])


def _process_table() -> dict[int, tuple[int, int]]:
    table: dict[int, tuple[int, int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            table[int(entry.name)] = parse_pid_stat((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
    return table


def tree_jiffies(table: dict[int, tuple[int, int]], roots: Iterable[int]) -> int:
    """CPU time of ``roots`` and all their descendants in a process table."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, stack, seen = 0, [r for r in roots if r in table], set[int]()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += table[pid][1]
        stack.extend(children.get(pid, ()))
    return total


@dataclass(frozen=True)
class Sample:
    core: CoreTimes
    ours: int


def sample(cpu: int, pids: Iterable[int]) -> Sample | None:
    """A reading of core ``cpu`` and of the processes ``pids`` (None off Linux)."""
    try:
        core = parse_core_line((PROC / "stat").read_text(), cpu)
    except (OSError, ValueError):
        return None
    return Sample(core, tree_jiffies(_process_table(), pids))


def foreign_share(before: Sample | None, after: Sample | None) -> float | None:
    """The share of the core's time, between two samples, that tasks other than ours
    ran on it (0.0 to 1.0), or None if it cannot be told."""
    if before is None or after is None:
        return None
    total = after.core.total - before.core.total
    if total <= 0:
        return None
    others = (after.core.task - before.core.task) - (after.ours - before.ours)
    return max(0.0, min(1.0, others / total))
