"""The layer loop's timing model: where streamed layers go and how long one decode step takes.

Why this module exists: the planner (``plan.make_plan``) compares placements and prefetch depths by
predicted step time; that prediction is a small discrete-event simulation of the loop
``pipeline.weights.StreamingWeights`` runs (one disk queue, one host->device copy queue, a ring of
slots), kept apart from the planner's budget arithmetic so each stays small and is tested on its own
(tests/test_plan_sim.py).
"""

from __future__ import annotations

import heapq
import math

from tierkv.io.store import CRC_BLOCK_BYTES
from tierkv.pipeline.schedule import ahead
from tierkv.probe import LinkSpeeds

__all__ = ["simulate_pieces_step_s", "simulate_step_s", "spread_layers", "step_bound"]


def spread_layers(num_layers: int, n_device: int, n_host: int) -> tuple[str, ...]:
    """Kind per layer ("device"/"host"/"disk"): disk layers evenly spaced, then host layers evenly
    over what is left, the rest on the device."""
    kinds = ["device"] * num_layers
    n_disk = num_layers - n_device - n_host
    assert n_disk >= 0 and n_device >= 0 and n_host >= 0
    for k in range(n_disk):
        kinds[int((k + 0.5) * num_layers / n_disk)] = "disk"
    rest = [j for j in range(num_layers) if kinds[j] == "device"]
    for k in range(n_host):
        kinds[rest[int((k + 0.5) * len(rest) / n_host)]] = "host"
    assert kinds.count("disk") == n_disk and kinds.count("host") == n_host
    return tuple(kinds)


def simulate_step_s(kinds: tuple[str, ...], depth: int, layer_bytes: int, links: LinkSpeeds, cuda: bool,
                    pieces: int = 0, piece_bytes: int = CRC_BLOCK_BYTES) -> float:
    """Steady-state time of one decode step of the layer loop as ``pipeline.weights.StreamingWeights``
    runs it, with three resources: one disk queue, one host->device copy queue (CUDA) and the device
    ring of ``depth + 1`` slots.

    Before layer j computes, the loop prefetches ``ahead(j, depth)``, and each of those layers stands
    for the first streamed layer at or after it (wrapping into the next step): so reads for the next
    streamed layers proceed while resident layers compute, and at most ``depth`` of them are in
    flight beside the one computing. A streamed layer holds a ring slot from its prefetch until its
    compute ends; a read (CPU: straight into the slot) or a copy (CUDA: from pinned staging or a host
    layer) into a slot waits until the slot is free. On the CPU, slots free when the window is issued
    take the streamed layers after it (``StreamingWeights._fill_ring``: while resident layers compute
    the whole ring reads). Host layers on a CPU-only machine are used in
    place, like device layers. The pinned staging ring (depth + 1 slots, CUDA disk layers) never binds
    before the device ring does, so it is not modelled. ``pieces`` > 0 (CPU): disk layers stream in
    ``piece_bytes`` pieces through that many slots instead (``simulate_pieces_step_s``).
    """
    if pieces and not cuda:
        return simulate_pieces_step_s(kinds, layer_bytes, links, pieces, piece_bytes)
    n = len(kinds)
    streamed = [k == "disk" or (k == "host" and cuda) for k in kinds]
    if not any(streamed):
        return n * links.layer_compute_s
    t_read = layer_bytes / (links.disk_read_gbps * 1e9)
    t_copy = 0.0 if math.isinf(links.h2d_gbps) else layer_bytes / (links.h2d_gbps * 1e9)
    first = [min((s for s in range(n) if streamed[s]), key=lambda s: (s - j) % n) for j in range(n)]
    ring = [0.0] * (depth + 1)                           # heap: the time each ring slot becomes free
    ready: dict[int, float] = {}                         # streamed layer in flight -> when usable
    queues = {"disk": 0.0, "copy": 0.0}                  # when each link is next free
    comp_start = comp_end = 0.0
    step_ends = []
    for _ in range(4):
        for j in range(n):
            issue_at = comp_start if cuda else comp_end  # the host runs ahead of the GPU by a layer
            window = [first[x] for x in ahead(j, depth, n)]
            for s in ([j] if streamed[j] else []) + window:
                if s not in ready:
                    assert ring, "the prefetch window holds more layers than the ring has slots"
                    ready[s] = _arrival(kinds[s], issue_at, heapq.heappop(ring), t_read, t_copy, queues, cuda)
            s = window[-1] if window else j
            while not cuda and streamed[s] and ring and ring[0] <= issue_at:   # CPU: free slots are filled too
                s = first[(s + 1) % n]
                if s in ready:
                    break
                ready[s] = _arrival(kinds[s], issue_at, heapq.heappop(ring), t_read, t_copy, queues, cuda)
            comp_start = max(comp_end, ready.pop(j, 0.0))
            comp_end = comp_start + links.layer_compute_s
            if streamed[j]:
                heapq.heappush(ring, comp_end)
        step_ends.append(comp_end)
    return step_ends[-1] - step_ends[-2]


def simulate_pieces_step_s(kinds: tuple[str, ...], layer_bytes: int, links: LinkSpeeds, slots: int,
                           piece_bytes: int) -> float:
    """Steady-state step time of ``pipeline.pieces`` on the CPU: the disk reads the disk layers' pieces in
    order, each into the ring slot the piece ``slots - 1`` before it frees (a row block spans two pieces,
    so one slot is held beside the piece computing); a disk layer's compute advances piece by piece as they
    land (its share of the layer's compute per piece), resident layers compute in place."""
    per_layer = max(1, -(-layer_bytes // piece_bytes))
    t_read = layer_bytes / per_layer / (links.disk_read_gbps * 1e9)
    t_piece = links.layer_compute_s / per_layer
    frees = [0.0] * max(1, slots - 1)                    # when the slots next take a read, oldest first
    disk = comp = 0.0
    step_ends = []
    for _ in range(4):
        for kind in kinds:
            if kind != "disk":
                comp += links.layer_compute_s
                continue
            for _p in range(per_layer):
                disk = max(disk, frees.pop(0)) + t_read
                comp = max(comp, disk) + t_piece
                frees.append(comp)
        step_ends.append(comp)
    return step_ends[-1] - step_ends[-2]


def _arrival(kind: str, issue_at: float, slot_free: float, t_read: float, t_copy: float,
             queues: dict[str, float], cuda: bool) -> float:
    """When a streamed layer prefetched at ``issue_at`` into a ring slot free at ``slot_free`` is usable;
    advances the disk and copy queues in ``queues``."""
    arrived = issue_at
    if kind == "disk":            # CPU: the read lands in the ring slot; CUDA: in a pinned staging slot
        queues["disk"] = max(issue_at, queues["disk"], issue_at if cuda else slot_free) + t_read
        arrived = queues["disk"]
    if cuda:
        queues["copy"] = max(arrived, queues["copy"], slot_free) + t_copy
        arrived = queues["copy"]
    return arrived


def step_bound(kinds: tuple[str, ...], layer_bytes: int, links: LinkSpeeds, cuda: bool) -> str:
    """The busiest resource of one pass over ``kinds``: "compute", "disk" or "h2d" (``Plan.bound``)."""
    n_disk = kinds.count("disk")
    n_copy = n_disk + kinds.count("host") if cuda else 0
    busy = {"compute": len(kinds) * links.layer_compute_s,
            "disk": n_disk * layer_bytes / (links.disk_read_gbps * 1e9),
            "h2d": 0.0 if math.isinf(links.h2d_gbps) else n_copy * layer_bytes / (links.h2d_gbps * 1e9)}
    return max(busy, key=lambda k: busy[k])
