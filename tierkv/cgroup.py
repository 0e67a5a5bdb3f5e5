"""The memory a cgroup lets this process use: the RAM figure inside containers and under memory caps.

Why this module exists: ``psutil.virtual_memory().available`` is the whole machine's, and ignores
the cgroup memory limit a container (``docker --memory``), a systemd unit (``MemoryMax=``) or a cap
like ``memcap`` puts on this process; a budget detected from it is then OOM-killed at the limit.
Under a cgroup the room left is, over the process's cgroup and each ancestor that has a limit,
the least of ``limit - usage + reclaimable file cache`` (the usage already counts this process's
own memory and the page cache it charged, of which inactive file pages are reclaimed before an
OOM kill). cgroup v1 (``N:memory:/path`` in /proc/self/cgroup; ``memory.limit_in_bytes``,
``memory.usage_in_bytes``, ``total_inactive_file``) and v2 (``0::/path``; ``memory.max``,
``memory.current``, ``inactive_file``) are both read. The roots are parameters, so tests read
fake trees; anything unreadable reads as "no limit known" and callers fall back to psutil.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NO_LIMIT_BYTES = 1 << 60               # v1 writes "no limit" as a huge page-rounded number (about 2**63)


@dataclass(frozen=True)
class CgroupMemory:
    """The binding cgroup memory limit: the level with the least room left."""

    limit_bytes: int                   # that level's limit
    available_bytes: int               # limit - usage + inactive file cache at that level (>= 0)
    path: str                          # the level's directory (e.g. /sys/fs/cgroup/memory/docker/abc)


def cgroup_memory(proc_root: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> CgroupMemory | None:
    """The memory limit binding this process, or None when no level of its cgroup has one (or
    none can be read: then the machine's figures are all there is)."""
    levels = _levels(proc_root, cgroup_root)
    found = [m for m in (_read_level(d, v2) for d, v2 in levels) if m is not None]
    return min(found, key=lambda m: m.available_bytes) if found else None


def _levels(proc_root: Path, cgroup_root: Path) -> list[tuple[Path, bool]]:
    """(directory, is v2) of the process's memory cgroup and its ancestors up to the mount root.
    A path that is not under the mount (a container that sees its own cgroup as the root) is the root."""
    try:
        lines = (proc_root / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    v1 = [ln.split(":", 2)[2] for ln in lines if ln.count(":") >= 2 and "memory" in ln.split(":", 2)[1].split(",")]
    v2 = [ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")]
    if v1:
        mount, rel, is_v2 = cgroup_root / "memory", v1[0], False
    elif v2 and (cgroup_root / "cgroup.controllers").is_file():
        mount, rel, is_v2 = cgroup_root, v2[0], True
    else:
        return []
    leaf = mount / rel.strip("/")
    if not leaf.is_dir():
        leaf = mount
    chain = [leaf, *leaf.parents]
    return [(d, is_v2) for d in chain[:chain.index(mount) + 1]] if mount in chain else [(mount, is_v2)]


def _read_level(directory: Path, v2: bool) -> CgroupMemory | None:
    """One level's limit and room left, or None when it has no limit or its files cannot be read."""
    names = ("memory.max", "memory.current", "inactive_file") if v2 else \
        ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    try:
        raw = (directory / names[0]).read_text().strip()
        if raw == "max" or int(raw) >= NO_LIMIT_BYTES:
            return None
        limit, usage = int(raw), int((directory / names[1]).read_text().strip())
        stat = dict(ln.split()[:2] for ln in (directory / "memory.stat").read_text().splitlines() if ln.strip())
        inactive = int(stat.get(names[2], stat.get("inactive_file", 0)))
    except (OSError, ValueError):
        return None
    return CgroupMemory(limit, max(0, min(limit, limit - usage + inactive)), str(directory))


__all__ = ["CgroupMemory", "NO_LIMIT_BYTES", "cgroup_memory"]
