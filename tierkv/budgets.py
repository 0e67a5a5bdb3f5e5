"""Budgets: the device, host and disk room a plan may use, given by the user or detected.

Why this module exists: the planner (``plan.py``) is arithmetic over budgets and link speeds; what
this machine has (free GPU memory, available RAM, where the offload directory goes) and whether a
given budget is more than that is a separate question, answered here once for ``make_plan``,
``minimum_device_bytes`` and the CLI. A plan made from a config alone (``tierkv plan`` on a
directory with only config.json) is a what-if for another machine and skips the machine check.
Inside a container or under a memory cap, RAM is what the cgroup memory limit leaves
(``tierkv.cgroup``), not what the machine has.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import torch

from tierkv.cgroup import CgroupMemory, cgroup_memory
from tierkv.config import Budget, format_size
from tierkv.errors import TierkvError

DEVICE_HEADROOM_FRACTION = 0.10        # of free GPU memory (allocator fragmentation, CUDA context)
DEVICE_HEADROOM_BYTES = 512 << 20
HOST_HEADROOM_FRACTION = 0.20          # of available RAM (the OS, the page cache, other programs)
HOST_HEADROOM_BYTES = 1 << 30
# of a cgroup memory limit: allocator slack, the interpreter's growth, page cache for buffered reads. Smaller
# than the machine's: the process's own memory and the cgroup's other tasks are already in its usage.
CGROUP_HEADROOM_FRACTION = 0.10
CGROUP_HEADROOM_BYTES = 128 << 20


class PlanError(TierkvError):
    """The budgets cannot run this model; the message names the minimum and what to change."""


def default_offload_dir() -> Path:
    """$TIERKV_OFFLOAD_DIR, else $XDG_CACHE_HOME/tierkv, else ~/.cache/tierkv."""
    env = os.environ.get("TIERKV_OFFLOAD_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tierkv"


def detect_budgets(budget: Budget, device: torch.device,
                   check_machine: bool = True) -> tuple[int, int, Path, str]:
    """Fill the ``None`` fields of ``budget``: (device_mem_bytes, host_mem_bytes, offload_dir, ram_note).

    CUDA: free GPU memory (nvidia-ml-py, else torch) and usable RAM, each less headroom.
    CPU-only: the "device" is RAM: usable RAM (less host_mem if given); the host tier gets nothing
    unless asked for, since it would be the same memory. Usable RAM is the machine's available RAM
    less headroom, or, when a cgroup memory limit leaves less (a container, a memory cap), what the
    limit leaves less a smaller headroom (``usable_ram``). ``ram_note``: "" unless such a limit binds;
    then a line for ``tierkv plan`` naming it.
    Raises PlanError for a given budget larger than the machine or the limit allows (see
    ``_check_machine``), unless ``check_machine`` is False (a what-if plan for another machine).
    """
    limit = cgroup_memory() if check_machine else None
    if check_machine:
        _check_machine(budget, device, limit)
    ram_usable, binding = usable_ram(psutil.virtual_memory().available, limit)
    if device.type == "cuda":
        dev = budget.device_mem_bytes
        if dev is None:
            free = _gpu_free_bytes(device)
            dev = max(0, int(free * (1 - DEVICE_HEADROOM_FRACTION)) - DEVICE_HEADROOM_BYTES)
        host = budget.host_mem_bytes if budget.host_mem_bytes is not None else ram_usable
        from_ram = budget.host_mem_bytes is None
    else:
        host = budget.host_mem_bytes if budget.host_mem_bytes is not None else 0
        dev = budget.device_mem_bytes if budget.device_mem_bytes is not None else max(0, ram_usable - host)
        from_ram = budget.device_mem_bytes is None
    return dev, host, budget.offload_dir or default_offload_dir(), _ram_note(binding, from_ram)


def usable_ram(machine_available_bytes: int, limit: CgroupMemory | None) -> tuple[int, CgroupMemory | None]:
    """(RAM budgets may take, the cgroup limit if it is what bounds that figure, else None)."""
    machine = max(0, int(machine_available_bytes * (1 - HOST_HEADROOM_FRACTION)) - HOST_HEADROOM_BYTES)
    if limit is None:
        return machine, None
    capped = max(0, limit.available_bytes - int(limit.limit_bytes * CGROUP_HEADROOM_FRACTION) - CGROUP_HEADROOM_BYTES)
    return (capped, limit) if capped < machine else (machine, None)


def _ram_note(limit: CgroupMemory | None, detected: bool) -> str:
    if limit is None:
        return ""
    head = f"RAM is bound by a cgroup memory limit of {format_size(limit.limit_bytes)} ({limit.path}), " \
           f"{format_size(limit.available_bytes)} of it free"
    return head + ("; the budget detected from that, less headroom" if detected else "; the given budgets fit it")


def _check_machine(budget: Budget, device: torch.device, limit: CgroupMemory | None = None) -> None:
    """Refuse budgets no placement could honour: host above physical RAM or the cgroup memory limit
    ``limit``, device above the GPU's total memory (on CPU-only machines device and host share the RAM,
    so their sum must fit it and the limit). On a machine without CUDA a plan for a CUDA device checks
    the host budget only."""
    ram = psutil.virtual_memory().total
    dev, host = budget.device_mem_bytes, budget.host_mem_bytes
    if host is not None and host > ram:
        raise PlanError(f"host budget {format_size(host)} is more than this machine's RAM ({format_size(ram)}); "
                        f"lower --host-mem to at most that")
    in_ram = (host or 0) + (0 if device.type == "cuda" else dev or 0)      # what the budgets put in RAM
    if limit is not None and in_ram > limit.limit_bytes:
        flags = "--host-mem" if device.type == "cuda" else "--device-mem" + (" or --host-mem" if host else "")
        usable = usable_ram(psutil.virtual_memory().available, limit)[0]
        raise PlanError(f"{'host' if device.type == 'cuda' else 'device'} budget" + _sum_of(dev, host, device)
                        + f" is more than this process's cgroup memory limit ({format_size(limit.limit_bytes)}, "
                        f"{limit.path}: a container's or a memory cap's); lower {flags} to fit: about "
                        f"{format_size(usable)} is free under the limit now (or omit the budget to detect it)")
    if device.type == "cuda":
        if not torch.cuda.is_available():        # planning for a GPU elsewhere: nothing here to compare with
            return
        total = torch.cuda.get_device_properties(device.index if device.index is not None
                                                 else torch.cuda.current_device()).total_memory
        if dev is not None and dev > total:
            raise PlanError(f"device budget {format_size(dev)} is more than {device}'s memory "
                            f"({format_size(total)}); lower --device-mem to at most that")
    elif dev is not None and dev + (host or 0) > ram:
        raise PlanError(f"device budget {format_size(dev)}" + (f" plus host budget {format_size(host)}" if host else "")
                        + f" is more than this machine's RAM ({format_size(ram)}; on a CPU-only machine the device "
                        "is RAM); lower --device-mem" + (" or --host-mem" if host else "") + " to fit")


def _sum_of(dev: int | None, host: int | None, device: torch.device) -> str:
    """" 2 GiB" or " 2 GiB plus host budget 1 GiB": the budgets that live in RAM, for an error."""
    if device.type == "cuda":
        return f" {format_size(host or 0)}"
    return f" {format_size(dev or 0)}" + (f" plus host budget {format_size(host)}" if host else "")


def _gpu_free_bytes(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).free)
        finally:
            pynvml.nvmlShutdown()
    except Exception:           # no NVML (containers, MIG): ask the CUDA runtime instead
        return int(torch.cuda.mem_get_info(index)[0])


__all__ = ["CGROUP_HEADROOM_BYTES", "CGROUP_HEADROOM_FRACTION", "DEVICE_HEADROOM_BYTES", "DEVICE_HEADROOM_FRACTION",
           "HOST_HEADROOM_BYTES", "HOST_HEADROOM_FRACTION", "PlanError", "default_offload_dir", "detect_budgets",
           "usable_ram"]
