"""CPU threads for the command lines (train.py, sample.py, python -m diffusion....).

Unless the environment says otherwise:
- OpenMP threads wait passively (`OMP_WAIT_POLICY=PASSIVE`). torch's default is to spin while
  waiting for the other threads; on a CPU shared with other jobs a spinning thread holds a core that
  a descheduled thread of the same step needs, and 40 steps of configs/shapes.yaml took 98-105 s with
  2 spinning threads, 22 s with 2 passive ones and 14-19 s with 1 thread (2 cores, load 4; see
  docs/training.md). OpenMP reads the setting once, when torch is imported, so `prefer_passive_waits`
  runs before any torch import.
- torch uses one thread per core it may run on (its own default), but no more than the cgroup CPU
  quota (a container or job limited to 2 CPUs of a 64-core host gets 2 threads, not 32).
The thread count does not depend on the machine's momentary load, so a resumed run computes with the
same count as the run it continues. `OMP_NUM_THREADS` overrides the count, `OMP_WAIT_POLICY` the waits.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_QUOTA = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"


def prefer_passive_waits() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless it is set (effective only before torch is first imported)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cgroup_cpus(path: Path = CGROUP_QUOTA) -> int | None:
    """The CPUs a cgroup v2 quota allows (rounded up), or None without a quota."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def set_cpu_threads() -> str:
    """Set torch's CPU threads (unless OMP_NUM_THREADS is set) and say what they are, in a few words."""
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        quota = cgroup_cpus()
        if quota is not None and torch.get_num_threads() > quota:
            torch.set_num_threads(quota)
    return cpu_threads_note()


def cpu_threads_note() -> str:
    """E.g. '2 CPU threads (one per core; OMP_NUM_THREADS sets them), waiting passively (OMP_WAIT_POLICY=PASSIVE)'."""
    import torch

    given = os.environ.get("OMP_NUM_THREADS")
    count = f"OMP_NUM_THREADS={given}" if given else "one per core; OMP_NUM_THREADS sets them"
    policy = os.environ.get("OMP_WAIT_POLICY")
    waits = f"waiting {policy.lower()}ly" if policy and policy.upper() in ("PASSIVE", "ACTIVE") else "spin-waiting"
    return f"{torch.get_num_threads()} CPU threads ({count}), {waits} (OMP_WAIT_POLICY={policy or 'unset'})"
