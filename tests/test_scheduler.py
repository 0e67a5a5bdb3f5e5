"""The step scheduler is pure bookkeeping: rows, pieces, admission by KV room, sessions parked and moved."""

from __future__ import annotations

import pytest

from tierkv.scheduler import Limits, Row, Scheduler, SeqStatus, StepPlan


class Sizer:
    """100 bytes per token of capacity wanted, 10 per token at least, 50 per token on the host."""

    def minimum_bytes(self, capacity_tokens: int) -> int:
        return 10 * capacity_tokens

    def want_bytes(self, capacity_tokens: int) -> int:
        return 100 * capacity_tokens

    def host_bytes(self, tokens: int) -> int:
        return 50 * tokens


def make(token_budget: int = 64, piece: int = 16, max_running: int = 8, room: int | None = None,
         host: int | None = None) -> Scheduler:
    return Scheduler(Limits(token_budget, piece, max_running, room, host), Sizer())


def run(s: Scheduler, plan: StepPlan, finished: tuple[int, ...] = ()) -> None:
    """Carry a plan out as the engine would: admitted caches hold their KV, rows fed, samplers go on."""
    for a in plan.admit:
        s.kept(a.seq_id, "cache")
    for o in plan.offload:
        assert o.to in ("host", "disk")
    for row in plan.rows:
        s.fed(row)
        if row.samples:
            if row.seq_id in finished:
                s.finish(row.seq_id)
            else:
                s.sampled(row.seq_id)


def test_prompt_prefills_in_whole_pieces_then_decodes_one_token_per_step() -> None:
    s = make(token_budget=40, piece=16)
    s.add(1, pending_tokens=37, capacity_tokens=45)
    plans = []
    for _ in range(5):
        plans.append(s.schedule())
        run(s, plans[-1])
    assert [a.seq_id for a in plans[0].admit] == [1]
    assert [r for p in plans for r in p.rows] == [
        Row(1, 0, 16, False), Row(1, 16, 16, False), Row(1, 32, 5, True), Row(1, 37, 1, True), Row(1, 38, 1, True)]


def test_decode_rows_and_a_joining_prefill_share_a_step() -> None:
    s = make(token_budget=20, piece=16)
    s.add(1, 3, 10)
    run(s, s.schedule())                       # 1 prefilled and sampled
    s.add(2, 30, 40)
    plan = s.schedule()
    assert [(r.seq_id, r.num_tokens) for r in plan.rows] == [(1, 1), (2, 16)]
    run(s, plan)
    plan = s.schedule()
    assert [(r.seq_id, r.start, r.num_tokens, r.samples) for r in plan.rows] == [(1, 4, 1, True), (2, 16, 14, True)]


def test_a_piece_is_never_cut_to_fit_and_waits_at_most_one_step() -> None:
    """Five decode rows leave 11 of 16 tokens: the 16-token piece waits, then goes first next step."""
    s = make(token_budget=16, piece=16)
    for i in range(5):
        s.add(i, 1, 50)
    run(s, s.schedule())
    s.add(9, 40, 60)
    first = s.schedule()
    assert all(r.num_tokens == 1 for r in first.rows) and 9 not in {r.seq_id for r in first.rows}
    run(s, first)
    second = s.schedule()
    assert [(r.seq_id, r.num_tokens) for r in second.rows] == [(9, 16)]
    run(s, second)
    third = s.schedule()                       # decodes are back before the next piece
    assert {r.seq_id for r in third.rows} == {0, 1, 2, 3, 4}


def test_admission_is_first_come_first_served_within_the_device_room() -> None:
    s = make(room=3000)
    s.add(1, 5, 20)                            # wants 2000
    s.add(2, 5, 20)                            # minimum 200: gets the 1000 left
    s.add(3, 5, 20)                            # nothing left: waits
    plan = s.schedule()
    assert [(a.seq_id, a.device_bytes) for a in plan.admit] == [(1, 2000), (2, 1000)]
    assert s.status(3) is SeqStatus.WAITING and s.counts()["device_allotted_bytes"] == 3000
    run(s, plan, finished=(1,))
    plan = s.schedule()
    assert [(a.seq_id, a.device_bytes) for a in plan.admit] == [(3, 2000)]


def test_max_running_bounds_the_live_set() -> None:
    s = make(max_running=2)
    for i in range(3):
        s.add(i, 4, 8)
    plan = s.schedule()
    assert [a.seq_id for a in plan.admit] == [0, 1] and s.status(2) is SeqStatus.WAITING
    s.close(0)
    assert [a.seq_id for a in s.schedule().admit] == [2]


def test_a_sequence_that_can_never_fit_is_refused_with_what_to_do() -> None:
    s = make(room=100)
    s.add(1, 5, 20)                            # minimum 200 > 100
    plan = s.schedule()
    assert plan.admit == () and plan.refuse[0][0] == 1 and "--device-mem" in plan.refuse[0][1]
    assert 1 not in s and s.counts()["device_allotted_bytes"] == 0


def test_finished_and_cancelled_sequences_free_their_room_at_once() -> None:
    s = make(room=10_000, host=10_000)
    s.add(1, 5, 20)
    run(s, s.schedule())
    assert s.counts()["device_allotted_bytes"] == 2000 and s.counts()["host_allotted_bytes"] == 1000
    s.finish(1)
    assert 1 not in s and s.counts()["device_allotted_bytes"] == 0 == s.counts()["host_allotted_bytes"]


def test_a_parked_session_resumes_on_its_cache_with_only_its_new_tokens() -> None:
    s = make(room=10_000)
    s.add(1, 5, 40, session=True)
    run(s, s.schedule(), finished=(1,))
    assert s.status(1) is SeqStatus.PARKED and s.counts()["device_allotted_bytes"] == 4000
    s.resume(1, pending_tokens=4, capacity_tokens=30)
    plan = s.schedule()
    assert plan.admit == () and plan.rows == (Row(1, 5, 4, True),)


def test_an_outgrown_session_cache_is_readmitted_larger() -> None:
    s = make(room=10_000)
    s.add(1, 5, 20, session=True)
    run(s, s.schedule(), finished=(1,))
    s.resume(1, pending_tokens=30, capacity_tokens=60)
    plan = s.schedule()
    assert [(a.seq_id, a.capacity_tokens, a.device_bytes, a.restore) for a in plan.admit] == [(1, 60, 6000, "cache")]
    assert s.counts()["device_allotted_bytes"] == 6000


def test_idle_sessions_move_to_host_then_disk_before_a_request_waits() -> None:
    s = make(room=4000, host=600)
    s.add(1, 10, 20, session=True)             # each wants 2000: together they take the whole room
    s.add(2, 10, 20, session=True)
    run(s, s.schedule(), finished=(1, 2))      # both park on their caches
    s.add(3, 10, 40)                           # minimum 400, nothing free: the oldest idle session moves
    plan = s.schedule()
    assert [(o.seq_id, o.to) for o in plan.offload] == [(1, "host")]      # 10 tokens x 50 = 500 <= 600
    assert [a.seq_id for a in plan.admit] == [3]
    run(s, plan)
    s.add(4, 10, 40)
    plan = s.schedule()                        # session 2 must leave too; the host is full: disk
    assert [(o.seq_id, o.to) for o in plan.offload] == [(1, "disk"), (2, "host")]


def test_a_session_moved_off_its_cache_is_restored_from_where_it_went() -> None:
    s = make(room=2000, host=0)
    s.add(1, 10, 20, session=True)
    run(s, s.schedule(), finished=(1,))
    s.add(2, 10, 20)
    plan = s.schedule()
    assert [(o.seq_id, o.to) for o in plan.offload] == [(1, "disk")]
    s.kept(1, "disk")
    run(s, plan, finished=(2,))
    s.resume(1, 3, 20)
    plan = s.schedule()
    assert [(a.seq_id, a.restore) for a in plan.admit] == [(1, "disk")]
    assert plan.rows == (Row(1, 10, 3, True),)


@pytest.mark.parametrize("room", [None, 5000])
def test_has_work_and_counts(room: int | None) -> None:
    s = make(room=room)
    assert not s.has_work()
    s.add(1, 3, 5, session=True)
    assert s.has_work() and s.counts()["waiting_sequences"] == 1
    run(s, s.schedule(), finished=(1,))
    assert not s.has_work() and s.counts()["parked_sessions"] == 1
    s.close(1)
    assert s.counts() == {"running_sequences": 0, "waiting_sequences": 0, "parked_sessions": 0,
                          "device_allotted_bytes": 0, "host_allotted_bytes": 0, "parked_on_host": 0,
                          "parked_on_disk": 0}


def test_truncating_a_parked_session_moves_its_kept_kv_off_the_cache() -> None:
    s = make(token_budget=64, piece=64, room=10_000, host=1000)
    s.add(1, 30, 40, session=True)
    run(s, s.schedule(), finished=(1,))                # one piece, sampled, the turn ends: parked
    assert s.truncate(1, 12) == "host"                 # 12 x 50 = 600 <= 1000
    assert s.counts()["device_allotted_bytes"] == 0 and s.counts()["host_allotted_bytes"] == 600
    assert s.computed_tokens(1) == 12 and s.counts()["parked_on_host"] == 1
    s.resume(1, 5, 40)
    plan = s.schedule()                                # restored from the host into a new cache
    assert [(a.seq_id, a.restore) for a in plan.admit] == [(1, "host")] and plan.rows == (Row(1, 12, 5, True),)
    assert s.counts()["host_allotted_bytes"] == 1000   # the cache's cold tier now (the parked copy came back)
    run(s, plan, finished=(1,))
    s.add(2, 30, 40, session=True)
    run(s, s.schedule(), finished=(2,))
    assert s.truncate(2, 30) == "disk"                 # 1500 bytes: more than the host room has left
    assert s.counts()["parked_on_disk"] == 1


# -- throughput mode: micro-batches and a shared room ----------------------------------------------


def test_micro_batches_pack_rows_first_fit_within_each_groups_budget() -> None:
    s = Scheduler(Limits(20, 16, 8, None, None, micro_batches=3), Sizer())
    for i in range(4):
        s.add(i, pending_tokens=12, capacity_tokens=20)
    plan = s.schedule()
    # three groups of 20 tokens: one 12-token piece each; the fourth waits for the next step
    assert [(r.seq_id, r.num_tokens, r.group) for r in plan.rows] == [(0, 12, 0), (1, 12, 1), (2, 12, 2)]
    run(s, plan)
    plan = s.schedule()
    groups: dict[int, int] = {}
    for r in plan.rows:
        groups[r.group] = groups.get(r.group, 0) + r.num_tokens
    assert sorted(r.seq_id for r in plan.rows) == [0, 1, 2, 3] and max(groups.values()) <= 20


def test_throughput_mode_packs_the_largest_pieces_first_and_fills_its_groups() -> None:
    # ragged prompts arriving shortest first (as bench_batch sends them): in arrival order three
    # 10-17-token pieces would fill two of the three 20-token groups and leave the third short
    s = Scheduler(Limits(20, 16, 8, None, None, micro_batches=3), Sizer())
    for i, n in enumerate([4, 6, 9, 30, 40, 50]):
        s.add(i, pending_tokens=n, capacity_tokens=n + 4)
    plan = s.schedule()
    assert sorted(r.seq_id for r in plan.rows if r.num_tokens == 16) == [3, 4, 5], \
        "the longest prompts' full pieces go first"
    per_group: dict[int, int] = {}
    for r in plan.rows:
        per_group[r.group] = per_group.get(r.group, 0) + r.num_tokens
    assert max(per_group.values()) <= 20 and sum(per_group.values()) == 16 * 3 + 4, "the 4-token piece fills a gap"
    single = make(token_budget=20, piece=16)
    for i, n in enumerate([4, 6, 9, 30]):
        single.add(i, n, n + 4)
    assert [r.seq_id for r in single.schedule().rows] == [0, 1, 2], "one group (serving): arrival order"


def _prefill_steps(s: Scheduler, lengths: list[int]) -> list[list[tuple[int, int]]]:
    """(seq_id, tokens) of each step's prefill rows until every prompt has sampled its first token."""
    for i, n in enumerate(lengths):
        s.add(i, n, n + 4)
    steps, waiting = [], set(range(len(lengths)))
    while waiting:
        plan = s.schedule()
        steps.append([(r.seq_id, r.num_tokens) for r in plan.rows if r.seq_id in waiting])
        waiting -= {r.seq_id for r in plan.rows if r.samples}
        run(s, plan)
    return steps


def test_a_batch_job_packs_the_longest_prompts_pieces_first_in_one_group() -> None:
    # a 64-token prompt arrived before a 512-token one, pieces of 288, a budget of the piece + one row:
    # by arrival the short prompt runs alone, then the long one takes two more passes; longest first,
    # the short prompt fills the room beside the long one's last piece: two passes
    arrival = _prefill_steps(Scheduler(Limits(289, 288, 2, None, None), Sizer()), [64, 512])
    assert arrival == [[(0, 64)], [(1, 288)], [(1, 224)]]
    longest = _prefill_steps(Scheduler(Limits(289, 288, 2, None, None, longest_first=True), Sizer()), [64, 512])
    assert longest == [[(1, 288)], [(0, 64), (1, 224)]]
    # each prompt's pieces are its solo ones whatever the order: the same boundaries, one piece per step
    for lengths in ([64, 213, 362, 512], [5, 300, 7, 290, 1, 288]):
        steps = _prefill_steps(Scheduler(Limits(291, 288, 8, None, None, longest_first=True), Sizer()), lengths)
        assert all(sum(n for _, n in step) <= 291 and len({i for i, _ in step}) == len(step) for step in steps)
        for i, n in enumerate(lengths):
            assert [t for step in steps for j, t in step if j == i] == [min(288, n - k) for k in range(0, n, 288)]
    assert len(_prefill_steps(Scheduler(Limits(291, 288, 4, None, None, longest_first=True), Sizer()),
                              [64, 213, 362, 512])) == 4 < len(_prefill_steps(make(291, 288, 4), [64, 213, 362, 512]))


def test_one_group_is_the_default_and_a_step_never_exceeds_it() -> None:
    s = make(token_budget=20, piece=16)
    for i in range(4):
        s.add(i, 12, 20)
    assert [r.seq_id for r in s.schedule().rows] == [0] and all(r.group == 0 for r in s.schedule().rows)


def test_a_shared_room_admits_the_whole_batch_each_at_least_its_minimum() -> None:
    # want 100/token, minimum 10/token: 8 sequences of 50 tokens want 40000 bytes; the room holds 10000
    unshared = Scheduler(Limits(64, 16, 8, 10_000, 8_000), Sizer())
    shared = Scheduler(Limits(64, 16, 8, 10_000, 8_000, share_room=True), Sizer())
    for s in (unshared, shared):
        for i in range(8):
            s.add(i, 10, 50)
    assert len(unshared.schedule().admit) == 2          # the first two take the whole room
    adm = shared.schedule().admit
    assert len(adm) == 8 and all(a.device_bytes >= 500 for a in adm)
    assert sum(a.device_bytes for a in adm) <= 10_000 and sum(a.host_bytes for a in adm) <= 8_000
    assert max(a.device_bytes for a in adm) - min(a.device_bytes for a in adm) <= 1250 // 7 + 1


def test_continuous_batching_keeps_the_batch_full_through_a_long_tail_of_short_prompts() -> None:
    s = Scheduler(Limits(64, 16, 4, 100_000, None, micro_batches=2, share_room=True), Sizer())
    s.add(0, 8, 200)                                      # one long generation
    for i in range(1, 30):
        s.add(i, 4, 8)                                    # a tail of short ones, 5 new tokens each
    left = {i: 5 for i in range(1, 30)}
    left[0] = 190
    sizes = []
    while s.has_work():
        plan = s.schedule()
        for a in plan.admit:
            s.kept(a.seq_id, "cache")
        done = []
        for row in plan.rows:
            s.fed(row)
            if row.samples:
                left[row.seq_id] -= 1
                done.append(row.seq_id) if left[row.seq_id] == 0 else s.sampled(row.seq_id)
        for i in done:
            s.finish(i)
        if s.counts()["waiting_sequences"]:
            sizes.append(s.counts()["running_sequences"] + len(done))
    assert sizes and min(sizes) == 4                      # while any wait, every place is taken


def test_a_shared_room_that_holds_every_want_gives_each_its_want() -> None:
    s = Scheduler(Limits(64, 16, 8, 100_000, None, micro_batches=2, share_room=True), Sizer())
    for i, cap in enumerate((400, 50, 60)):              # ragged: one wants far more than an even share
        s.add(i, 10, cap)
    assert [a.device_bytes for a in s.schedule().admit] == [40_000, 5_000, 6_000]
