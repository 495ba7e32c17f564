"""Block manager and scheduler on their own (no model): allocation, sharing, eviction, preemption, budgets."""

from __future__ import annotations

from frugalm.serve.block_manager import BlockManager
from frugalm.serve.config import EngineConfig
from frugalm.serve.sampling_params import SamplingParams
from frugalm.serve.scheduler import Scheduler
from frugalm.serve.sequence import Sequence


def seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(temperature=0))


def test_allocate_grow_free():
    bm = BlockManager(8, 4)
    s = seq("a", list(range(10)))
    hits, hashes = bm.match_prefix(s.token_ids)
    assert hits == [] and bm.can_admit(hits, 10)
    bm.admit(s, hits, hashes, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.ensure(s, 12) and len(s.block_table) == 3  # still fits
    assert bm.ensure(s, 13) and len(s.block_table) == 4
    assert not bm.ensure(s, 4 * 9)  # more than the cache: all or nothing
    assert len(s.block_table) == 4
    bm.free_sequence(s)
    assert bm.num_free_blocks == 8 and s.block_table == [] and bm.usage == 0.0


def test_prefix_sharing_and_refcounts():
    bm = BlockManager(16, 4)
    a = seq("a", list(range(13)))
    bm.admit(a, [], [], 13)
    a.num_computed = 12  # three full blocks computed
    bm.register(a)
    assert a.num_hashed_blocks == 3
    b = seq("b", list(range(12)) + [99, 98])
    hits, hashes = bm.match_prefix(b.token_ids)
    assert hits == a.block_table[:3]
    bm.admit(b, hits, hashes, len(b.token_ids))
    assert b.num_computed == 12
    assert all(bm.blocks[i].ref_count == 2 for i in hits)
    # A different token inside block 1 breaks the chain from block 1 on.
    c = seq("c", [0, 1, 2, 3, 4, 77, 6, 7, 8, 9, 10, 11, 12])
    assert bm.match_prefix(c.token_ids)[0] == a.block_table[:1]
    # The whole prompt is never served from cache: one token is left to compute.
    d = seq("d", list(range(12)))
    assert len(bm.match_prefix(d.token_ids)[0]) == 2
    bm.free_sequence(a)
    assert all(bm.blocks[i].ref_count == 1 for i in hits)
    bm.free_sequence(b)
    assert bm.num_free_blocks == 16


def test_freed_blocks_stay_cached_until_evicted():
    bm = BlockManager(4, 4)
    a = seq("a", list(range(9)))
    bm.admit(a, [], [], 9)
    a.num_computed = 8
    bm.register(a)
    bm.free_sequence(a)
    b = seq("b", list(range(9)))
    hits, _ = bm.match_prefix(b.token_ids)
    assert len(hits) == 2  # revived from the free list
    # Fill the cache with unrelated work: the cached blocks get evicted and stop matching.
    other = seq("o", [50 + i for i in range(16)])
    bm.admit(other, [], [], 16)
    assert bm.match_prefix(b.token_ids)[0] == []
    assert bm.cached == {}


def test_hash_collision_is_caught_by_key_check():
    bm = BlockManager(8, 4)
    a = seq("a", [1, 2, 3, 4, 5])
    bm.admit(a, [], [], 5)
    a.num_computed = 4
    bm.register(a)
    (h, block_id), = bm.cached.items()
    # Forge a colliding entry: same hash, different tokens must not match.
    bm.blocks[block_id].key = (None, (9, 9, 9, 9), None)
    assert bm.match_prefix([1, 2, 3, 4, 5])[0] == []


def test_next_token_is_part_of_the_key_with_mtp():
    bm = BlockManager(8, 4, hash_next_token=True)
    a = seq("a", [1, 2, 3, 4, 5, 6])
    bm.admit(a, [], [], 6)
    a.num_computed = 5
    bm.register(a)
    assert bm.match_prefix([1, 2, 3, 4, 5, 0])[0] == [a.block_table[0]]
    assert bm.match_prefix([1, 2, 3, 4, 7, 0])[0] == []  # MTP entry at position 3 was built from token 5


def test_scheduler_budget_chunks_and_admission_limits():
    cfg = EngineConfig(block_size=4, max_num_batched_tokens=10, max_num_seqs=2)
    bm = BlockManager(32, 4)
    sch = Scheduler(cfg, bm)
    for i, n in enumerate((7, 7, 3)):
        sch.add(seq(str(i), list(range(n))))
    out = sch.schedule()
    assert [(s.seq.request_id, s.start, len(s.token_ids)) for s in out] == [("0", 0, 7), ("1", 0, 3)]
    assert len(sch.running) == 2 and len(sch.waiting) == 1  # max_num_seqs
    for s in out:
        s.seq.num_computed = s.start + len(s.token_ids)
    assert out[0].samples and not out[1].samples
    out[0].seq.token_ids.append(5)  # what the engine does with the sampled token
    out = sch.schedule()  # seq 0 decodes one token, seq 1 continues its prompt chunk
    assert [(s.seq.request_id, s.start, len(s.token_ids), s.decode) for s in out] == [
        ("0", 7, 1, True), ("1", 3, 4, False)]


def test_preemption_frees_newest_and_requeues_it_first():
    cfg = EngineConfig(block_size=2, max_num_batched_tokens=64, max_num_seqs=4)
    bm = BlockManager(4, 2)
    sch = Scheduler(cfg, bm)
    a, b = seq("a", [1, 2, 3]), seq("b", [4, 5, 6])
    sch.add(a)
    sch.add(b)
    out = sch.schedule()
    assert len(out) == 2 and bm.num_free_blocks == 0
    for s in out:  # both sampled a token: now decoding, needing a third block each
        s.seq.num_computed = 3
        s.seq.token_ids.append(7)
    a.token_ids.append(8)  # a needs position 4 -> a third block
    a.num_computed = 4
    out = sch.schedule()
    assert [s.seq.request_id for s in out] == ["a"]
    assert sch.num_preemptions == 1 and list(sch.waiting) == [b] and b.num_computed == 0 and b.block_table == []


def test_unchunked_prefill_waits_for_a_whole_prompt():
    cfg = EngineConfig(block_size=4, max_num_batched_tokens=8, enable_chunked_prefill=False)
    sch = Scheduler(cfg, BlockManager(32, 4))
    sch.add(seq("short", list(range(5))))
    sch.add(seq("long", list(range(6))))
    out = sch.schedule()
    assert [s.seq.request_id for s in out] == ["short"]  # 5 + 6 > 8: the long one waits
    out[0].seq.num_computed = 5
    out[0].seq.token_ids.append(1)
    assert [s.seq.request_id for s in sch.schedule()] == ["short", "long"]
