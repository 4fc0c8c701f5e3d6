"""How many CPU threads each process align starts may use: a share of this machine's cores, decided once per job.

torch sizes its thread pool from OMP_NUM_THREADS when it is first imported, and uses every core otherwise. Several
processes at once (torchrun ranks, decode workers beside the encoder, a training child beside its parent) or other
jobs on the machine then oversubscribe the cores, and torch's threads spin waiting for each other: on a loaded 2-core
machine the demo's training ran 4.5x slower on all cores than on its share (README, "CPU threads"). So the `align`
command decides a share before torch is imported and passes it to every process it starts through the
environment; a thread count the user set is kept as it is.
"""

import os
import time

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or SLURM's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(window: float = 0.2) -> int:
    """Cores other work keeps busy now, rounded: measured over a short `window` (this process sleeps meanwhile),
    not the last minute's load average, which still counts jobs that just ended."""
    before = _cpu_times()
    if before is None:  # not Linux: the load average it is
        try:
            return round(os.getloadavg()[0])
        except OSError:
            return 0
    time.sleep(window)
    after = _cpu_times()
    busy, total = after[0] - before[0], after[1] - before[1]
    return round(usable_cores() * busy / total) if total > 0 else 0


def thread_share(processes: int = 1) -> int:
    """Threads for each of `processes` processes started together: the cores not busy elsewhere now, divided
    evenly."""
    return max(1, (usable_cores() - busy_cores()) // max(1, processes))


def share_cores(processes: int = 1) -> int:
    """Set this job's thread count for this process and every process it starts (the user's OMP_NUM_THREADS when
    set, else `thread_share`); call it before torch is imported. Returns the count."""
    threads = _threads_set() or thread_share(processes)
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, str(threads))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def job_cores() -> int:
    """The cores this job's processes on this machine use together: each one's share times their number."""
    return (_threads_set() or usable_cores()) * max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _threads_set() -> int | None:
    """The thread count OMP_NUM_THREADS sets (the user's, or this job's share), if it sets a valid one."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None
