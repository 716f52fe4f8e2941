"""CPU threads for training on a machine that other programs share.

PyTorch runs one OpenMP thread per core. Each parallel region waits for its slowest
thread, so when another busy program holds one core of two, the thread that shares that
core holds every region back, and OpenMP's spin-waiting burns the time slices it needs:
2-thread training fell to 36% of its quiet speed beside one busy process (BENCHMARKS.md).
One thread on the free core keeps most of it.

So with `train.cpu_threads=0` (auto), training measures for 0.2 s how many cores other
programs keep busy, and uses the cores left (at least one). The choice is made once, at
the start, and kept in the checkpoints: the thread count changes the order of some float
sums, so a resumed run keeps the count it started with, whatever the load then, to stay
bit-exact. Load that starts later is not followed (set train.cpu_threads to fix a count;
LMLAB_CPU_AUTO=0 turns the check off).
"""

from __future__ import annotations

import os
import sys
import time

SAMPLE_S = 0.2
"""How long `busy_cores` watches the machine."""


def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies over all CPUs from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    values = [float(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def busy_cores(sample_s: float = SAMPLE_S) -> float | None:
    """Cores that other processes kept busy over `sample_s` seconds while this one slept
    (Linux; None elsewhere)."""
    cores = os.cpu_count() or 1
    before, mine_before = _cpu_times(), _own_cpu_s()
    if before is None:
        return None
    time.sleep(sample_s)
    after, mine_after = _cpu_times(), _own_cpu_s()
    if after is None or after[1] <= before[1]:
        return None
    share = (after[0] - before[0]) / (after[1] - before[1])
    elapsed = sample_s if sample_s > 0 else 1.0
    own = (mine_after - mine_before) / elapsed
    return max(0.0, share * cores - own)


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def auto_threads(cores: int, busy: float | None) -> int:
    """Threads to use on `cores` cores when others keep `busy` of them busy: the cores
    left, rounding a half-busy core to busy, at least one."""
    if busy is None:
        return cores
    return max(1, min(cores, cores - int(busy + 0.5)))


def describe(threads: int, cores: int, busy: float | None) -> str:
    """A few words for the start-up line."""
    text = f"{threads} thread{'s' if threads != 1 else ''}"
    if threads < cores and busy is not None:
        text += f" (other programs keep {busy:.1f} of {cores} cores busy)"
    return text


def enabled() -> bool:
    """Linux (it reads /proc/stat), unless LMLAB_CPU_AUTO=0 (the test suite sets it, so
    that runs compared with each other use the same count whatever the machine does)."""
    return sys.platform.startswith("linux") and os.environ.get("LMLAB_CPU_AUTO", "1") != "0"


_measured: list[float | None] = []


def busy_cores_once() -> float | None:
    """`busy_cores`, measured once per process (every later run in it gets the same)."""
    if not _measured:
        _measured.append(busy_cores())
    return _measured[0]
