"""The KV chunk table: pure bookkeeping, tested with no tensors and no device."""

import random

import pytest

from tierkv.pipeline.kv.table import ChunkKey, KVBudgetError, KVChunkTable, Tier

D, H, K = Tier.DEVICE, Tier.HOST, Tier.DISK


def _table(device=400):
    """Six chunks of 16 tokens / 100 bytes: the sink on disk, the others on the host."""
    t = KVChunkTable({D: device, H: 1000, K: None})
    for c in range(6):
        t.add(ChunkKey(0, c), tokens=16, nbytes=100, tier=H if c else K)
    return t


def _run(t, plan):
    t.begin(plan.evict)
    t.finish(plan.evict)
    t.begin(plan.fetch)
    t.finish(plan.fetch)


def test_add_grow_and_budgets():
    t = KVChunkTable({D: 250, H: None})
    t.add(ChunkKey(0, 0), 16, 100)
    assert (t.tier_of(ChunkKey(0, 0)), t.used_bytes(D), t.free_bytes(D), t.free_bytes(K)) == (D, 100, 150, float("inf"))
    with pytest.raises(ValueError, match="in order"):
        t.add(ChunkKey(0, 2), 16, 100)
    with pytest.raises(KeyError, match="already exists"):
        t.add(ChunkKey(0, 0), 16, 100)
    t.add(ChunkKey(0, 1), 3, 20)
    t.grow(ChunkKey(0, 1), 10, 150)
    assert (t.tokens_of(ChunkKey(0, 1)), t.used_bytes(D)) == (10, 250)
    with pytest.raises(KVBudgetError, match="device"):
        t.grow(ChunkKey(0, 1), 11, 151)
    with pytest.raises(KVBudgetError, match="raise the device budget"):
        t.add(ChunkKey(0, 2), 1, 1)
    with pytest.raises(AssertionError, match="open chunk"):
        t.grow(ChunkKey(0, 0), 20, 100)
    with pytest.raises(KeyError, match="unknown"):
        t.tier_of(ChunkKey(5, 0))
    with pytest.raises(ValueError, match=">= 0"):
        KVChunkTable({D: -1})
    assert KVChunkTable({"host": 5}).budget_bytes(H) == 5
    assert {("host", "device"): 1}[(H, D)] == 1  # interoperates with tierkv.io.tiers' route keys


def test_pin_unpin_misuse_asserts():
    t = _table()
    key = ChunkKey(0, 1)
    t.pin([key, key])
    t.unpin([key])
    assert t.pins_of(key) == 1
    t.unpin([key])
    with pytest.raises(AssertionError, match="not pinned"):
        t.unpin([key])


def test_protected_sinks_and_recent_window():
    t = KVChunkTable({}, sink_chunks=2, recent_tokens=20)
    for c, tokens in enumerate([16, 16, 16, 16, 8, 5]):
        t.add(ChunkKey(3, c, seq=1), tokens, 10)
    # chunk c is recent while the chunks after it hold < 20 tokens: 5, 5 + 8 = 13 -> chunks 3, 4, 5
    assert [t.protected(k) for k in t.chunks(3, seq=1)] == [True, True, False, True, True, True]
    t.grow(ChunkKey(3, 5, seq=1), 12, 10)  # 12 + 8 >= 20: chunk 3 leaves the window
    assert [t.protected(k) for k in t.chunks(3, seq=1)] == [True, True, False, False, True, True]
    t2 = KVChunkTable({}, sink_chunks=0, recent_tokens=0)
    t2.add(ChunkKey(0, 0), 4, 1)
    assert not t2.protected(ChunkKey(0, 0))


def test_plan_fetches_then_evicts_least_recently_selected():
    t = _table(device=300)
    plan = t.plan_moves([ChunkKey(0, 0), ChunkKey(0, 1), ChunkKey(0, 2)])
    assert plan.evict == {} and plan.fetch == {(H, D): (ChunkKey(0, 1), ChunkKey(0, 2)), (K, D): (ChunkKey(0, 0),)}
    assert [pair for pair, _ in plan.moves()] == [(H, D), (K, D)]
    _run(t, plan)
    assert t.used_bytes(D) == 300 and t.used_bytes(H) == 300 and t.used_bytes(K) == 0
    plan = t.plan_moves([ChunkKey(0, 0), ChunkKey(0, 2), ChunkKey(0, 3)])  # chunk 1 is least recent
    assert plan.evict == {(D, H): (ChunkKey(0, 1),)} and plan.fetch == {(H, D): (ChunkKey(0, 3),)}
    _run(t, plan)
    where = t.by_tier(t.chunks(0))
    assert where == {D: [ChunkKey(0, c) for c in (0, 2, 3)], H: [ChunkKey(0, c) for c in (1, 4, 5)]}
    assert not t.plan_moves([ChunkKey(0, 0), ChunkKey(0, 3)])  # resident already: nothing to move


def test_never_evicts_sinks_recent_pinned_or_selected():
    t = KVChunkTable({D: 500, H: 1000}, recent_tokens=20)  # recent window = chunks 6 and 7
    for c in range(8):
        t.add(ChunkKey(0, c), 16, 100, tier=D if c in (0, 1, 2, 6, 7) else H)
    t.pin([ChunkKey(0, 1)])
    assert t.eviction_order(D) == [ChunkKey(0, 2)]
    plan = t.plan_moves([ChunkKey(0, 3), ChunkKey(0, 0), ChunkKey(0, 6), ChunkKey(0, 7)])
    assert plan.evict == {(D, H): (ChunkKey(0, 2),)}
    with pytest.raises(KVBudgetError, match="pinned, in flight, or sink/recent"):
        t.plan_moves([ChunkKey(0, 3), ChunkKey(0, 4)])


def test_evicts_to_disk_when_host_is_full_and_accounts_in_flight():
    t = KVChunkTable({D: 200, H: 100, K: 1000}, recent_tokens=0, sink_chunks=0)
    for c in range(5):
        t.add(ChunkKey(0, c), 16, 100, tier=D if c < 2 else K)
    t.add(ChunkKey(1, 0), 16, 100, tier=H)
    t.add(ChunkKey(1, 1), 16, 100, tier=K)
    t.add(ChunkKey(1, 2), 16, 100, tier=K)
    plan = t.plan_moves([ChunkKey(0, 2), ChunkKey(0, 3)])
    assert plan.evict == {(D, K): (ChunkKey(0, 0), ChunkKey(0, 1))}
    t.begin(plan.evict)
    assert t.used_bytes(K) == 700 and t.used_bytes(D) == 200 and t.in_flight(ChunkKey(0, 0))
    assert t.pins_of(ChunkKey(0, 0)) == 1
    with pytest.raises(KVBudgetError, match="finish the evictions"):
        t.begin(plan.fetch)  # device bytes come free only when the evictions finish
    with pytest.raises(RuntimeError, match="finish"):
        t.plan_moves([ChunkKey(0, 0)])
    t.finish(plan.evict)
    t.begin(plan.fetch)
    t.abort(plan.fetch)
    assert t.used_bytes(D) == 0 and t.pins_of(ChunkKey(0, 2)) == 0 and not t.in_flight(ChunkKey(0, 2))
    _run(t, t.plan_moves([ChunkKey(0, 2), ChunkKey(0, 3)]))
    assert t.by_tier([ChunkKey(0, 2), ChunkKey(0, 3)]) == {D: [ChunkKey(0, 2), ChunkKey(0, 3)]}
    with pytest.raises(AssertionError, match="not moving"):
        t.finish(plan.fetch)


def test_selection_over_budget_and_full_lower_tiers_raise():
    t = KVChunkTable({D: 250, H: 100, K: 0}, sink_chunks=0, recent_tokens=0)
    for c in range(3):
        t.add(ChunkKey(0, c), 16, 100, tier=D if c < 2 else H)
    with pytest.raises(KVBudgetError, match="lower the KV token budget"):
        t.plan_moves([ChunkKey(0, 0), ChunkKey(0, 1), ChunkKey(0, 2)])
    with pytest.raises(KVBudgetError, match="host and disk budgets are full"):
        t.plan_moves([ChunkKey(0, 2)])


def test_drop_sequence_frees_bytes():
    t = KVChunkTable({D: 1000})
    for seq in (0, 1):
        for c in range(3):
            t.add(ChunkKey(0, c, seq), 16, 100)
    assert len(t.drop_sequence(1)) == 3 and t.used_bytes(D) == 300 and t.chunks(0, seq=1) == []
    t.pin([ChunkKey(0, 0, 0)])
    with pytest.raises(AssertionError, match="pinned"):
        t.drop_sequence(0)


def test_random_steps_keep_invariants():
    rng = random.Random(0)
    layers, chunks = 3, 12
    t = KVChunkTable({D: 1500, H: 1200, K: None}, sink_chunks=1, recent_tokens=16)
    for layer in range(layers):
        for c in range(chunks):
            t.add(ChunkKey(layer, c), 16, 100, tier=rng.choice([D, H, K]) if c < 5 else K)
    for _ in range(60):
        layer = rng.randrange(layers)
        keys = t.chunks(layer)
        selected = [keys[0], keys[-1], *rng.sample(keys[1:-1], 2)]
        plan = t.plan_moves(selected)
        moved = [k for _, ks in plan.moves() for k in ks]
        evicted = [k for ks in plan.evict.values() for k in ks]
        assert len(moved) == len(set(moved)) and not set(evicted) & set(selected)
        _run(t, plan)
        assert all(t.tier_of(k) is D for k in selected)
        where = t.by_tier([k for layer in range(layers) for k in t.chunks(layer)])
        for tier in (D, H):
            assert t.used_bytes(tier) == 100 * len(where.get(tier, [])) <= t.budget_bytes(tier)


def test_the_table_records_device_and_host_slots_through_moves():
    """The table is the one record of residency: a chunk's device slot while it is on (or coming to)
    the device, its host slot while it is on the host, neither on disk."""
    t = KVChunkTable({Tier.DEVICE: 300, Tier.HOST: 300}, sink_chunks=0, recent_tokens=0)
    a, b = ChunkKey(0, 0), ChunkKey(0, 1)
    t.add(a, 16, 100, slot=3)
    t.add(b, 16, 100, Tier.HOST, host_slot=7)
    assert (t.slot_of(a), t.host_slot_of(a), t.slot_of(b), t.host_slot_of(b)) == (3, None, None, 7)
    t.begin({(Tier.DEVICE, Tier.HOST): [a]})
    t.finish({(Tier.DEVICE, Tier.HOST): [a]}, host_slots={a: 2})
    assert (t.tier_of(a), t.slot_of(a), t.host_slot_of(a)) == (Tier.HOST, None, 2)
    t.begin({(Tier.HOST, Tier.DEVICE): [b]}, slots={b: 5})
    assert t.slot_of(b) == 5 and t.host_slot_of(b) == 7 and t.tier_of(b) is Tier.HOST   # in flight
    t.abort({(Tier.HOST, Tier.DEVICE): [b]})
    assert t.slot_of(b) is None and t.host_slot_of(b) == 7
    t.begin({(Tier.HOST, Tier.DEVICE): [b]}, slots={b: 5})
    t.finish({(Tier.HOST, Tier.DEVICE): [b]})
    assert (t.tier_of(b), t.slot_of(b), t.host_slot_of(b)) == (Tier.DEVICE, 5, None)
    assert t.on_tier(Tier.DEVICE) == [b] and t.count(Tier.HOST) == 1
