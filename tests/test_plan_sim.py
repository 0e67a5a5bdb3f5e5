"""The planner's layer-loop simulation on hand-made link speeds (pure arithmetic, no device).

It must model what ``StreamingWeights`` does: reads for the next streamed layers run while resident
layers compute, bounded by the ring of depth + 1 slots (the under-prediction it fixes: a depth-1
placement with 5 of 16 layers resident was predicted at 1.57 tok/s and measured at 2.15, disk-bound).
"""

from __future__ import annotations

import math

import pytest

from tierkv.plan import LinkSpeeds, simulate_step_s, spread_layers

MB = 10**6
INF = math.inf


def _links(read_s_per_layer: float, compute_s: float, copy_s_per_layer: float | None = None,
           layer_bytes: int = 100 * MB) -> LinkSpeeds:
    """Links at which one layer of ``layer_bytes`` takes the given times."""
    h2d = INF if copy_s_per_layer is None else layer_bytes / copy_s_per_layer / 1e9
    return LinkSpeeds(disk_read_gbps=layer_bytes / read_s_per_layer / 1e9, h2d_gbps=h2d, layer_compute_s=compute_s)


@pytest.mark.parametrize("cuda", [False, True])
def test_all_resident_is_compute_bound(cuda):
    for depth in (0, 1, 3):
        step = simulate_step_s(("device",) * 12, depth, 100 * MB, _links(0.5, 0.01, 0.2), cuda)
        assert step == pytest.approx(12 * 0.01, rel=1e-9)


@pytest.mark.parametrize("read_s,compute_s", [(0.03, 0.01), (0.01, 0.03), (0.02, 0.02)])
def test_all_streamed_is_the_slower_of_disk_and_compute_per_layer(read_s, compute_s):
    kinds = ("disk",) * 10
    serial = simulate_step_s(kinds, 0, 100 * MB, _links(read_s, compute_s), cuda=False)
    assert serial == pytest.approx(10 * (read_s + compute_s), rel=1e-6)      # depth 0: nothing overlaps
    for depth in (1, 2, 4):
        step = simulate_step_s(kinds, depth, 100 * MB, _links(read_s, compute_s), cuda=False)
        assert step == pytest.approx(10 * max(read_s, compute_s), rel=1e-6)


def test_cuda_streamed_pipeline_is_bound_by_its_slowest_link():
    kinds = ("disk",) * 8
    for read_s, copy_s, compute_s in [(0.03, 0.01, 0.005), (0.01, 0.03, 0.005), (0.005, 0.01, 0.02)]:
        step = simulate_step_s(kinds, 2, 100 * MB, _links(read_s, compute_s, copy_s), cuda=True)
        assert step == pytest.approx(8 * max(read_s, copy_s, compute_s), rel=1e-6)
    host = simulate_step_s(("host",) * 8, 2, 100 * MB, _links(1.0, 0.005, 0.01), cuda=True)
    assert host == pytest.approx(8 * 0.01, rel=1e-6)         # host layers never touch the (slow) disk


def test_reads_overlap_resident_compute_with_spare_ring_slots():
    # the measured case: 16 layers, 5 resident, 11 from disk, depth 1; a layer reads in 42 ms and
    # computes in 12 ms, so the disk alone needs 11 x 42 ms and the compute 16 x 12 ms per step
    kinds = spread_layers(16, 5, 0)
    links = _links(0.042, 0.012)
    step = simulate_step_s(kinds, 1, 100 * MB, links, cuda=False)
    assert step == pytest.approx(11 * 0.042, rel=1e-6)       # disk busy the whole step: 2.16 tok/s
    # the old model left the disk idle while resident layers computed: at least their compute more
    idle = sum(0.012 for k in kinds if k == "device")
    assert step < 11 * 0.042 + idle - 1e-3


def test_the_ring_bounds_how_far_reads_run_ahead():
    # four resident layers, then four streamed (read 20 ms, compute 8 ms each): the disk needs 80 ms
    # a step, the compute 64 ms; how much of the reading hides under the resident block depends on
    # how many streamed layers the ring lets the loop start early
    kinds = ("device",) * 4 + ("disk",) * 4
    read_s, compute_s = 0.02, 0.008
    steps = [simulate_step_s(kinds, depth, 100 * MB, _links(read_s, compute_s), cuda=False) for depth in range(6)]
    assert all(a >= b - 1e-12 for a, b in zip(steps, steps[1:]))           # a deeper ring never hurts
    assert steps[0] == pytest.approx(4 * (read_s + compute_s) + 4 * compute_s, rel=1e-6)   # serial
    # depth 1: both ring slots read during the resident block (the window's layer and, in the slot no
    # layer computes from, the next: StreamingWeights._fill_ring); the disk then idles only while the
    # first streamed layer computes with the second landed (the old window: 3 reads + 5 computes, 100 ms)
    assert steps[1] == pytest.approx(4 * read_s + compute_s, rel=1e-6)
    # depth 4: all four are read while the resident block computes: the disk is busy all step
    assert steps[4] == pytest.approx(4 * read_s, rel=1e-6) and steps[5] == pytest.approx(steps[4], rel=1e-9)


def test_streamed_layers_spread_out_beat_bunched_ones():
    links = _links(0.02, 0.01)
    spread = simulate_step_s(spread_layers(8, 4, 0), 1, 100 * MB, links, cuda=False)
    bunched = simulate_step_s(("device",) * 4 + ("disk",) * 4, 1, 100 * MB, links, cuda=False)
    assert spread <= bunched + 1e-12
    assert spread == pytest.approx(max(4 * 0.02, 8 * 0.01), rel=1e-6)
