"""Budgets: the device, host and disk room a plan may use, given by the user or detected.

Why this module exists: the planner (``plan.py``) is arithmetic over budgets and link speeds; what
this machine has (free GPU memory, available RAM, where the offload directory goes) and whether a
given budget is more than that is a separate question, answered here once for ``make_plan``,
``minimum_device_bytes`` and the CLI. A plan made from a config alone (``tierkv plan`` on a
directory with only config.json) is a what-if for another machine and skips the machine check.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import torch

from tierkv.config import Budget, format_size
from tierkv.errors import TierkvError

DEVICE_HEADROOM_FRACTION = 0.10        # of free GPU memory (allocator fragmentation, CUDA context)
DEVICE_HEADROOM_BYTES = 512 << 20
HOST_HEADROOM_FRACTION = 0.20          # of available RAM (the OS, the page cache, other programs)
HOST_HEADROOM_BYTES = 1 << 30


class PlanError(TierkvError):
    """The budgets cannot run this model; the message names the minimum and what to change."""


def default_offload_dir() -> Path:
    """$TIERKV_OFFLOAD_DIR, else $XDG_CACHE_HOME/tierkv, else ~/.cache/tierkv."""
    env = os.environ.get("TIERKV_OFFLOAD_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tierkv"


def detect_budgets(budget: Budget, device: torch.device, check_machine: bool = True) -> tuple[int, int, Path]:
    """Fill the ``None`` fields of ``budget``: (device_mem_bytes, host_mem_bytes, offload_dir).

    CUDA: free GPU memory (nvidia-ml-py, else torch) and available RAM, each less headroom.
    CPU-only: the "device" is RAM: available RAM less headroom (less host_mem if given); the host
    tier gets nothing unless asked for, since it would be the same memory.
    Raises PlanError for a given budget larger than the machine has (see ``_check_machine``), unless
    ``check_machine`` is False (a what-if plan for another machine).
    """
    if check_machine:
        _check_machine(budget, device)
    ram = psutil.virtual_memory().available
    ram_usable = max(0, int(ram * (1 - HOST_HEADROOM_FRACTION)) - HOST_HEADROOM_BYTES)
    if device.type == "cuda":
        dev = budget.device_mem_bytes
        if dev is None:
            free = _gpu_free_bytes(device)
            dev = max(0, int(free * (1 - DEVICE_HEADROOM_FRACTION)) - DEVICE_HEADROOM_BYTES)
        host = budget.host_mem_bytes if budget.host_mem_bytes is not None else ram_usable
    else:
        host = budget.host_mem_bytes if budget.host_mem_bytes is not None else 0
        dev = budget.device_mem_bytes if budget.device_mem_bytes is not None else max(0, ram_usable - host)
    return dev, host, budget.offload_dir or default_offload_dir()


def _check_machine(budget: Budget, device: torch.device) -> None:
    """Refuse budgets no placement could honour: host above physical RAM, device above the GPU's total
    memory (on CPU-only machines device and host share the RAM, so their sum must fit it). On a machine
    without CUDA a plan for a CUDA device checks the host budget only."""
    ram = psutil.virtual_memory().total
    dev, host = budget.device_mem_bytes, budget.host_mem_bytes
    if host is not None and host > ram:
        raise PlanError(f"host budget {format_size(host)} is more than this machine's RAM ({format_size(ram)}); "
                        f"lower --host-mem to at most that")
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


__all__ = ["DEVICE_HEADROOM_BYTES", "DEVICE_HEADROOM_FRACTION", "HOST_HEADROOM_BYTES", "HOST_HEADROOM_FRACTION",
           "PlanError", "default_offload_dir", "detect_budgets"]
