"""What this host can give (capacity, with the reference's oversubscription ratios), and what
one VMM process uses (from /proc). Pure reads; no state."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CPU_OVERSUBSCRIPTION = 4.0
MEMORY_OVERSUBSCRIPTION = 1.0
DISK_OVERSUBSCRIPTION = 1.0


@dataclass(frozen=True)
class HostCapacity:
    cpus: int
    memory_bytes: int
    disk_bytes: int
    disk_free_bytes: int

    @property
    def cpu_limit(self) -> int:
        return int(self.cpus * CPU_OVERSUBSCRIPTION)

    @property
    def memory_limit(self) -> int:
        return int(self.memory_bytes * MEMORY_OVERSUBSCRIPTION)


def host_capacity(data_dir: Path) -> HostCapacity:
    stat = os.statvfs(data_dir)
    return HostCapacity(
        cpus=os.cpu_count() or 1,
        memory_bytes=_meminfo("MemTotal"),
        disk_bytes=stat.f_blocks * stat.f_frsize,
        disk_free_bytes=stat.f_bavail * stat.f_frsize,
    )


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            name, _, rest = line.partition(":")
            if name == key:
                return int(rest.split()[0]) * 1024
    raise RuntimeError(f"/proc/meminfo has no {key}")


@dataclass(frozen=True)
class ProcessUsage:
    cpu_seconds: float
    rss_bytes: int
    vms_bytes: int


def process_usage(pid: int) -> ProcessUsage | None:
    """CPU time (user + system) and memory of a live process; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: fields start after the last ')'.
    fields = stat.rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    utime, stime = int(fields[11]), int(fields[12])
    return ProcessUsage(
        cpu_seconds=(utime + stime) / ticks,
        rss_bytes=int(statm[1]) * page,
        vms_bytes=int(statm[0]) * page,
    )


def sparse_size(path: Path) -> int:
    """Bytes a file really occupies on disk (a sparse overlay counts what was written)."""
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0
