"""Budgets inside a cgroup memory limit: the reading (fake v1/v2 trees), the detected budget, the refusal, memcap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from tierkv import budgets as budgets_mod
from tierkv.budgets import CGROUP_HEADROOM_BYTES, CGROUP_HEADROOM_FRACTION, PlanError, detect_budgets
from tierkv.cgroup import CgroupMemory, cgroup_memory
from tierkv.config import Budget

MiB, GiB = 1 << 20, 1 << 30
V1_NO_LIMIT = "9223372036854771712"
MEMCAP = Path("/work/shared/tools/memcap")
ROOT = Path(__file__).resolve().parent.parent


def _proc(tmp: Path, text: str) -> Path:
    (tmp / "proc" / "self").mkdir(parents=True)
    (tmp / "proc" / "self" / "cgroup").write_text(text)
    return tmp / "proc"


def _v1_level(d: Path, limit: str, usage: int, inactive: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.limit_in_bytes").write_text(limit + "\n")
    (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (d / "memory.stat").write_text(f"cache 1\ninactive_file 7\ntotal_cache 5\ntotal_inactive_file {inactive}\n")


def _v2_level(d: Path, limit: str, usage: int, inactive: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.max").write_text(limit + "\n")
    (d / "memory.current").write_text(f"{usage}\n")
    (d / "memory.stat").write_text(f"anon 100\nfile 200\nactive_file 3\ninactive_file {inactive}\n")


def _v1_tree(tmp: Path) -> tuple[Path, Path]:
    """/docker (2 GiB limit, 1 GiB used) > /docker/box (1 GiB limit, 600 MiB used, 100 MiB inactive file)."""
    proc = _proc(tmp, "9:pids:/docker/box\n4:memory:/docker/box\n1:cpu,cpuacct:/docker/box\n0::/\n")
    mem = tmp / "cg" / "memory"
    _v1_level(mem, V1_NO_LIMIT, 10 * GiB, 0)
    _v1_level(mem / "docker", str(2 * GiB), GiB, 0)
    _v1_level(mem / "docker" / "box", str(GiB), 600 * MiB, 100 * MiB)
    return proc, tmp / "cg"


def test_v1_reads_the_leaf_limit_with_its_reclaimable_cache(tmp_path):
    proc, cg = _v1_tree(tmp_path)
    got = cgroup_memory(proc, cg)
    assert got == CgroupMemory(GiB, GiB - 600 * MiB + 100 * MiB, str(cg / "memory" / "docker" / "box"))


def test_an_ancestor_with_less_room_binds(tmp_path):
    proc, cg = _v1_tree(tmp_path)
    _v1_level(cg / "memory" / "docker", str(2 * GiB), 1900 * MiB, 20 * MiB)   # siblings use the parent's room
    got = cgroup_memory(proc, cg)
    assert got == CgroupMemory(2 * GiB, 2 * GiB - 1900 * MiB + 20 * MiB, str(cg / "memory" / "docker"))


def test_v2_reads_memory_max_and_skips_max(tmp_path):
    proc = _proc(tmp_path, "0::/user.slice/app.scope\n")
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cgroup.controllers").write_text("cpu memory pids\n")        # the unified hierarchy is mounted here
    _v2_level(cg / "user.slice", "max", 5 * GiB, 0)
    _v2_level(cg / "user.slice" / "app.scope", str(1600 * MiB), 400 * MiB, 50 * MiB)
    assert cgroup_memory(proc, cg) == CgroupMemory(1600 * MiB, 1250 * MiB, str(cg / "user.slice" / "app.scope"))
    (cg / "user.slice" / "app.scope" / "memory.max").write_text("max\n")
    assert cgroup_memory(proc, cg) is None


def test_no_limit_or_unreadable_files_read_as_none(tmp_path):
    proc, cg = _v1_tree(tmp_path)
    for d in (cg / "memory" / "docker", cg / "memory" / "docker" / "box"):
        (d / "memory.limit_in_bytes").write_text(V1_NO_LIMIT)
    assert cgroup_memory(proc, cg) is None
    (cg / "memory" / "docker" / "box" / "memory.limit_in_bytes").write_text(str(GiB))
    (cg / "memory" / "docker" / "box" / "memory.usage_in_bytes").unlink()      # unreadable: no figure
    assert cgroup_memory(proc, cg) is None
    (cg / "memory" / "docker" / "box" / "memory.usage_in_bytes").write_text("not a number")
    assert cgroup_memory(proc, cg) is None
    assert cgroup_memory(tmp_path / "no-proc", cg) is None
    assert cgroup_memory(proc, tmp_path / "no-cgroup-fs") is None


def test_a_container_that_sees_its_cgroup_as_the_mount_root(tmp_path):
    proc = _proc(tmp_path, "4:memory:/docker/0123abcd\n")        # the host's path; the mount is the container's own
    cg = tmp_path / "cg"
    _v1_level(cg / "memory", str(GiB), 300 * MiB, 0)
    assert cgroup_memory(proc, cg) == CgroupMemory(GiB, GiB - 300 * MiB, str(cg / "memory"))


def _fake_machine(monkeypatch, limit: CgroupMemory | None, available: int = 20 * GiB, total: int = 24 * GiB) -> None:
    mem = namedtuple("mem", "available total")
    monkeypatch.setattr(budgets_mod.psutil, "virtual_memory", lambda: mem(available, total))
    monkeypatch.setattr(budgets_mod, "cgroup_memory", lambda: limit)


def test_detected_budget_is_what_the_limit_leaves_less_a_small_headroom(monkeypatch, tmp_path):
    limit = CgroupMemory(1600 * MiB, 1300 * MiB, "/sys/fs/cgroup/memory/memcap-1")
    _fake_machine(monkeypatch, limit)
    dev, host, _, note = detect_budgets(Budget(offload_dir=tmp_path), torch.device("cpu"))
    assert dev == 1300 * MiB - int(1600 * MiB * CGROUP_HEADROOM_FRACTION) - CGROUP_HEADROOM_BYTES and host == 0
    assert dev > 900 * MiB                          # a small cap still leaves most of its room to the budget
    assert "cgroup memory limit of 1.56 GiB" in note and "memcap-1" in note and "detected" in note
    _fake_machine(monkeypatch, None)               # no limit: the machine's available RAM, as before
    dev, _, _, note = detect_budgets(Budget(offload_dir=tmp_path), torch.device("cpu"))
    assert dev == int(20 * GiB * 0.8) - GiB and note == ""
    _fake_machine(monkeypatch, CgroupMemory(64 * GiB, 60 * GiB, "/big"))   # a limit above the machine: no note
    assert detect_budgets(Budget(offload_dir=tmp_path), torch.device("cpu"))[0] == int(20 * GiB * 0.8) - GiB


def test_cuda_host_budget_is_detected_from_the_limit(monkeypatch, tmp_path):
    _fake_machine(monkeypatch, CgroupMemory(8 * GiB, 6 * GiB, "/docker/x"))
    dev, host, _, note = detect_budgets(Budget(device_mem_bytes=GiB, offload_dir=tmp_path), torch.device("cuda"))
    assert dev == GiB and host == 6 * GiB - int(8 * GiB * CGROUP_HEADROOM_FRACTION) - CGROUP_HEADROOM_BYTES
    assert "/docker/x" in note


def test_a_budget_above_the_limit_is_refused_naming_it_and_the_flag(monkeypatch, tmp_path):
    limit = CgroupMemory(1600 * MiB, 1300 * MiB, "/sys/fs/cgroup/memory/memcap-2")
    _fake_machine(monkeypatch, limit)
    with pytest.raises(PlanError, match=r"1\.95 GiB.*cgroup memory limit \(1\.56 GiB, .*memcap-2.*--device-mem"):
        detect_budgets(Budget(device_mem_bytes=2000 * MiB, offload_dir=tmp_path), torch.device("cpu"))
    with pytest.raises(PlanError, match="plus host budget.*--device-mem or --host-mem"):
        detect_budgets(Budget(device_mem_bytes=GiB, host_mem_bytes=GiB, offload_dir=tmp_path), torch.device("cpu"))
    with pytest.raises(PlanError, match="host budget 2.00 GiB.*cgroup memory limit.*--host-mem"):
        detect_budgets(Budget(device_mem_bytes=8 * GiB, host_mem_bytes=2 * GiB, offload_dir=tmp_path),
                       torch.device("cuda"))
    dev, _, _, note = detect_budgets(Budget(device_mem_bytes=1024 * MiB, offload_dir=tmp_path), torch.device("cpu"))
    assert dev == 1024 * MiB and "the given budgets fit it" in note
    # a what-if plan for another machine is not checked against this one's limit
    assert detect_budgets(Budget(device_mem_bytes=8 * GiB, offload_dir=tmp_path), torch.device("cpu"),
                          check_machine=False)[0] == 8 * GiB


_UNDER_CAP = r"""
import json
import torch
from tierkv.budgets import detect_budgets
from tierkv.cgroup import cgroup_memory
from tierkv.config import Budget
limit = cgroup_memory()
dev, _, _, note = detect_budgets(Budget(offload_dir="/tmp"), torch.device("cpu"))
print(json.dumps({"limit": limit and limit.limit_bytes, "available": limit and limit.available_bytes, "dev": dev,
                  "note": note}))
"""


def test_under_a_real_memory_cap(tmp_path):
    """memcap puts the process in a cgroup with a limit: the detected budget fits under it."""
    if not os.access(MEMCAP, os.X_OK):
        pytest.skip("no memcap here")
    cap = 1200 * MiB
    out = subprocess.run([str(MEMCAP), str(cap), "--", sys.executable, "-c", _UNDER_CAP], capture_output=True,
                         text=True, timeout=300, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    if out.returncode == 3:
        pytest.skip(f"memcap cannot cap memory here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["limit"] == cap and 0 < got["available"] < cap         # the interpreter and torch already use some
    assert 0 < got["dev"] < got["available"] and "cgroup memory limit of 1.17 GiB" in got["note"]
