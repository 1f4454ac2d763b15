"""The hardware of this machine, as ``moe-cluster plan`` describes hardware (plan.py's ``Hardware``)."""

from __future__ import annotations

import os

import torch

from cluster.planning.plan import GIB, Hardware


def local_hardware(gpu_memory_gib: float | None = None, memory_gib_: float | None = None) -> Hardware:
    """This machine: its GPUs when CUDA is here, else its cores and memory (either size overridable)."""
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        memory = gpu_memory_gib or torch.cuda.get_device_properties(0).total_memory / GIB
        return Hardware("gpu", count, memory, 1, source="local")
    return Hardware("cpu", os.cpu_count() or 1, memory_gib_ or memory_gib(), 1, source="local")


def memory_gib() -> float:
    """This machine's memory (MemTotal), GiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    raise ValueError("cannot read this machine's memory: give --memory-gib")
