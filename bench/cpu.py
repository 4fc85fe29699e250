"""Where a load's CPU goes, from Linux's /proc: a process tree (the server), the PostgreSQL
server's processes, and this process (the load client), and for the tree's processes how
much of the time they ran, waited for a core, or slept (waiting for the database, a lock or
the client). On a shared machine this tells a limit of the code (a process sleeping while
others wait for it) from a limit of the machine (every process runnable, few running).

Elsewhere than Linux every figure is None and nothing is printed.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

_PROC = Path("/proc")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: str) -> tuple[str, int, float] | None:
    """(command name, parent pid, CPU seconds) of a process, None once it is gone."""
    try:
        text = (_PROC / pid / "stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    rest = text[text.rindex(")") + 2 :].split()
    return name, int(rest[1]), (int(rest[11]) + int(rest[12])) / _TICK


def _schedstat(pid: int) -> tuple[float, float] | None:
    """(seconds running, seconds runnable but waiting for a core) of a process."""
    try:
        ran, waited, _ = (int(v) for v in (_PROC / str(pid) / "schedstat").read_text().split())
    except (OSError, ValueError):
        return None
    return ran / 1e9, waited / 1e9


@dataclass
class Sample:
    at: float
    server: float
    postgres: float
    client: float
    # Per process of the server's tree: (seconds running, seconds waiting for a core).
    sched: dict[int, tuple[float, float]]


@dataclass
class CpuMeter:
    """Sums the CPU of `server_pid`'s tree, of PostgreSQL's processes (every one on this
    machine: another database's work counts too) and of this process, between samples."""

    server_pid: int
    usable: bool = field(default_factory=lambda: (_PROC / "self" / "schedstat").exists())

    def sample(self) -> Sample | None:
        if not self.usable:
            return None
        processes = {}
        for entry in _PROC.iterdir():
            if entry.name.isdigit() and (stat := _stat(entry.name)) is not None:
                processes[int(entry.name)] = stat
        tree = {self.server_pid}
        grown = True
        while grown:
            grown = False
            for pid, (_, parent, _) in processes.items():
                if parent in tree and pid not in tree:
                    tree.add(pid)
                    grown = True
        usage = resource.getrusage(resource.RUSAGE_SELF)
        sched = {pid: s for pid in tree if (s := _schedstat(pid)) is not None}
        return Sample(
            at=time.perf_counter(),
            server=sum(processes[pid][2] for pid in tree if pid in processes),
            postgres=sum(cpu for name, _, cpu in processes.values() if name == "postgres"),
            client=usage.ru_utime + usage.ru_stime,
            sched=sched,
        )


@dataclass
class Usage:
    """What the sides used between two samples, summed over as many spans as added."""

    wall: float = 0.0
    operations: float = 0.0
    server: float = 0.0
    postgres: float = 0.0
    client: float = 0.0
    # Per server process: (seconds running, seconds waiting for a core).
    sched: dict[int, tuple[float, float]] = field(default_factory=dict)

    def add(self, before: Sample | None, after: Sample | None, operations: float) -> None:
        if before is None or after is None:
            return
        self.wall += after.at - before.at
        self.operations += operations
        self.server += after.server - before.server
        self.postgres += after.postgres - before.postgres
        self.client += after.client - before.client
        for pid, (ran, waited) in after.sched.items():
            if pid in before.sched:
                old_ran, old_waited = self.sched.get(pid, (0.0, 0.0))
                self.sched[pid] = (
                    old_ran + ran - before.sched[pid][0],
                    old_waited + waited - before.sched[pid][1],
                )

    def describe(self, label: str) -> str | None:
        """One line: CPU milliseconds per operation by side, and how the server's API
        processes spent the time (running / runnable but waiting for a core / sleeping)."""
        if self.operations <= 0 or self.wall <= 0:
            return None
        per_op = {
            name: getattr(self, name) / self.operations * 1000
            for name in ("server", "postgres", "client")
        }
        shares = []
        for ran, waited in self.sched.values():
            if ran / self.wall >= 0.02:  # the API processes; the idle parent is left out
                run_pct, wait_pct = ran / self.wall * 100, waited / self.wall * 100
                shares.append(f"{run_pct:.0f}/{wait_pct:.0f}/{100 - run_pct - wait_pct:.0f}")
        return (
            f"{label}: CPU ms per operation: server {per_op['server']:.2f},"
            f" postgres (all) {per_op['postgres']:.2f}, load client {per_op['client']:.2f};"
            f" API processes run/wait-for-core/sleep % {' '.join(shares) or 'n/a'}"
        )
