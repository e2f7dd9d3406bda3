"""BlockPool and KVCacheManager: exact block ids, ref counts, the prefix cache, forks with
copy-on-write and swapping, with integrity checked after every operation."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quire.cluster.core.block_pool import BlockPool
from quire.cluster.core.kv_cache_manager import NO_HIT, KVCacheManager, PrefixHit
from quire.cluster.core.request import Request
from quire.protos.step import SamplingParams

H = [bytes([i]) * 16 for i in range(8)]  # stand-in content hashes


def req(request_id: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(request_id, list(tokens), SamplingParams(), cache_salt=salt)


def test_pool_allocates_in_order_and_reuses_least_recently_freed():
    pool = BlockPool(6)
    assert pool.allocate(2) == [0, 1]
    pool.check_integrity([[0, 1]])
    assert pool.allocate(3) == [2, 3, 4]
    pool.check_integrity([[0, 1], [2, 3, 4]])
    pool.free([1, 0])
    pool.check_integrity([[2, 3, 4]])
    assert pool.num_free_blocks == 3
    # 5 was never used, then 1 and 0 in the order they were freed
    assert pool.allocate(3) == [5, 1, 0]
    pool.check_integrity([[2, 3, 4], [5, 1, 0]])
    assert pool.allocate(1) is None, "an empty pool must answer None, not a sentinel"
    assert pool.usage == 1.0


def test_pool_refuses_partial_allocation():
    pool = BlockPool(3)
    assert pool.allocate(4) is None
    assert pool.num_free_blocks == 3
    pool.check_integrity([])


def test_shared_blocks_are_freed_only_by_their_last_reference():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.touch(a)
    assert pool.ref_counts[:2] == [2, 2]
    pool.check_integrity([a, a])
    pool.free(a)
    assert pool.num_free_blocks == 2 and pool.ref_counts[:2] == [1, 1]
    pool.check_integrity([a])
    pool.free(a)
    assert pool.num_free_blocks == 4
    pool.check_integrity([])
    with pytest.raises(ValueError, match="freed more often"):
        pool.free([0])
    with pytest.raises(ValueError, match="holds no cached content"):
        pool.touch([0])


def test_cached_free_blocks_revive_and_are_evicted_least_recent_first():
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    for block in (0, 1, 2):
        pool.cache(block, H[block])
    pool.check_integrity([[0, 1, 2]])
    pool.free([2, 1, 0])  # a table, tail first
    pool.check_integrity([])
    assert pool.num_free_blocks == 4 and pool.num_cached_free_blocks() == 3
    assert pool.lookup(H[0]) == 0, "a freed block keeps its content until reused"
    pool.touch([0])  # a prefix hit revives it out of the middle of the free queue
    assert pool.ref_counts[0] == 1 and pool.num_free_blocks == 3
    pool.check_integrity([[0]])
    # never-used 3 first, then the tail block 2 (its hash goes), then 1
    assert pool.allocate(2) == [3, 2]
    assert pool.lookup(H[2]) is None and pool.lookup(H[1]) == 1 and pool.num_evictions == 1
    pool.check_integrity([[0], [3, 2]])
    pool.cache(3, H[0])  # the same content in a second block: lookups keep finding the first
    assert pool.lookup(H[0]) == 0 and pool.block_hash[3] is None
    with pytest.raises(ValueError, match="cannot be cached"):
        pool.cache(1, H[5])


def test_integrity_check_catches_disagreeing_tables_and_hashes():
    pool = BlockPool(4)
    pool.allocate(2)
    with pytest.raises(AssertionError, match="disagree"):
        pool.check_integrity([[0]])
    pool.cache(0, H[0])
    pool.cached[H[1]] = 1  # corrupt the map
    with pytest.raises(AssertionError, match="hash"):
        pool.check_integrity()


def test_manager_grows_tables_block_by_block():
    kv = KVCacheManager(BlockPool(5), block_size=4, enable_prefix_caching=False)
    a, b, c = req("a", range(1, 10)), req("b", range(20, 29)), req("c", range(40, 52))
    assert kv.allocate_slots(a, 3) == [0]
    kv.check_integrity()
    assert kv.allocate_slots(a, 4) == []  # still fits in block 0
    assert kv.allocate_slots(a, 5) == [1]
    assert kv.allocate_slots(b, 9) == [2, 3, 4]
    kv.check_integrity()
    assert kv.block_ids("a") == [0, 1] and kv.block_ids("b") == [2, 3, 4]
    assert kv.allocate_slots(a, 9) is None
    assert kv.block_ids("a") == [0, 1], "a failed allocation changes nothing"
    kv.check_integrity()
    kv.free("b")
    kv.check_integrity()
    # tail first: b's blocks return as 4, 3, 2
    assert kv.allocate_slots(c, 12) == [4, 3, 2]
    kv.check_integrity()
    kv.free("a")
    kv.free("c")
    kv.free("never-seen")
    kv.check_integrity()
    assert kv.num_used_blocks == 0


def test_prefix_hits_share_full_blocks_but_never_the_last_token():
    kv = KVCacheManager(BlockPool(8), block_size=4, hash_seed=b"s" * 32)
    a = req("a", range(1, 11))                  # 10 tokens: blocks 0, 1 full, 2 partial
    assert kv.get_computed_blocks(a) == NO_HIT
    assert kv.allocate_slots(a, 10) == [0, 1, 2]
    assert kv.pool.lookup(kv.block_hashes(a, 8)[1]) == 1 and kv.pool.block_hash[2] is None
    b = req("b", [*range(1, 9), 99, 98])        # same first 8 tokens
    hit = kv.get_computed_blocks(b)
    assert hit == PrefixHit([0, 1], 8)
    assert kv.allocate_slots(b, 10, hit) == [3]
    assert kv.block_ids("b") == [0, 1, 3] and kv.pool.ref_counts[:4] == [2, 2, 1, 1]
    kv.check_integrity()
    c = req("c", range(1, 9))                   # exactly two blocks: the last token is computed again
    assert kv.get_computed_blocks(c) == PrefixHit([0], 4)
    d = req("d", [1, 2, 3, 5, 5, 6, 7, 8])      # differs inside the first block: no hit at all
    assert kv.get_computed_blocks(d) == NO_HIT
    kv.free("a")
    kv.free("b")
    kv.check_integrity()
    assert kv.num_used_blocks == 0 and kv.pool.num_cached_free_blocks() == 2
    hit = kv.get_computed_blocks(b)     # revived from the free queue after everyone left
    assert hit == PrefixHit([0, 1], 8)
    assert kv.allocate_slots(b, 10, hit.blocks) == [4]
    kv.check_integrity()


def test_a_block_is_cached_once_its_tokens_are_known():
    """With a step in flight, a table may cover positions whose token is still being sampled:
    the block holding one is registered only once the token is in, under the hash of all
    its tokens (the one a later request with those tokens looks up)."""
    kv = KVCacheManager(BlockPool(8), block_size=4, hash_seed=b"s" * 32)
    a = req("a", range(1, 8))                   # 7 tokens known; an 8th and a 9th are pending
    assert kv.allocate_slots(a, 9) == [0, 1, 2]
    assert kv.pool.block_hash[0] is not None and kv.pool.block_hash[1] is None
    kv.check_integrity()
    a.output_token_ids += [8, 9]                # the steps in flight answer
    assert kv.append_block(a) == 3              # the next decode opens block 3 (position 12)
    kv.check_integrity()
    expected = kv.block_hashes(req("b", range(1, 13)), 12)
    assert [kv.pool.block_hash[b] for b in (0, 1, 2)] == [expected[0], expected[1], None]
    assert kv.get_computed_blocks(req("c", range(1, 11))).num_tokens == 8
    kv.free("a")
    kv.check_integrity()


def test_cache_salt_separates_tenants():
    kv = KVCacheManager(BlockPool(8), block_size=4)
    kv.allocate_slots(req("plain", range(1, 10)), 9)
    assert kv.get_computed_blocks(req("salted", range(1, 10), salt="tenant-a")) == NO_HIT
    kv.allocate_slots(req("a1", range(1, 10), salt="tenant-a"), 9)
    assert kv.get_computed_blocks(req("a2", range(1, 10), salt="tenant-a")).num_tokens == 8
    assert kv.get_computed_blocks(req("b", range(1, 10), salt="tenant-b")) == NO_HIT
    assert kv.get_computed_blocks(req("none", range(1, 10))).num_tokens == 8


def test_hashes_depend_on_the_secret_seed():
    tokens = list(range(1, 9))
    one = KVCacheManager(BlockPool(2), 4, hash_seed=b"1" * 32).block_hashes(req("x", tokens), 8)
    two = KVCacheManager(BlockPool(2), 4, hash_seed=b"2" * 32).block_hashes(req("x", tokens), 8)
    assert len(one) == 2 and one[0] != two[0] and one[1] != two[1]


def test_fork_shares_then_copies_the_written_block():
    kv = KVCacheManager(BlockPool(6), block_size=4)
    leader, sibling = req("lead", range(1, 7)), req("sib", range(1, 7))  # 6 tokens: block 1 half full
    assert kv.allocate_slots(leader, 6) == [0, 1]
    assert kv.fork("sib", "lead", 6) == [0, 1]
    assert kv.pool.ref_counts[:2] == [2, 2]
    kv.check_integrity()
    copies = []
    # the sibling recomputes token 5 (position 5, block 1): block 1 is copied, block 0 stays shared
    assert kv.allocate_slots(sibling, 6, write_from=5, copies=copies) == []
    assert copies == [(1, 2)] and kv.block_ids("sib") == [0, 2] and kv.pool.ref_counts[:3] == [2, 1, 1]
    kv.check_integrity()
    copies = []  # the leader writes position 6 into block 1, now its own: nothing to copy
    assert kv.allocate_slots(leader, 7, write_from=6, copies=copies) == [] and copies == []
    tight = KVCacheManager(BlockPool(2), block_size=4)
    tight.allocate_slots(leader, 6)
    tight.fork("sib", "lead", 6)
    assert tight.allocate_slots(sibling, 6, write_from=5, copies=copies) is None and copies == []
    assert tight.block_ids("sib") == [0, 1], "a failed copy-on-write changes nothing"
    tight.check_integrity()


def test_swap_out_and_in_move_whole_tables():
    kv = KVCacheManager(BlockPool(4), block_size=4, cpu_pool=BlockPool(3), enable_prefix_caching=False)
    a, b = req("a", range(1, 10)), req("b", range(20, 24))
    assert kv.allocate_slots(a, 9) == [0, 1, 2]
    assert kv.allocate_slots(b, 4) == [3]
    assert kv.swap_out("a") == [(0, 0), (1, 1), (2, 2)]
    assert kv.block_ids("a") == [] and kv.cpu_tables["a"] == [0, 1, 2] and kv.pool.num_free_blocks == 3
    kv.check_integrity()
    assert kv.swap_out("b") is None and kv.block_ids("b") == [3], "a full CPU pool changes nothing"
    assert kv.swap_out("never-seen") is None
    # back into the device blocks it left, reused tail first; the CPU blocks are held until the
    # step's plan is closed (nothing planned later in the step may overwrite them), then free
    assert kv.swap_in(a, 9) == [(0, 2), (1, 1), (2, 0)]
    assert kv.block_ids("a") == [2, 1, 0] and "a" not in kv.cpu_tables and kv.cpu_pool.num_free_blocks == 0
    kv.check_integrity()
    assert kv.end_step() == ([], []) and kv.cpu_pool.num_free_blocks == 3
    kv.check_integrity()
    assert kv.swap_out("b") == [(3, 2)]
    kv.check_integrity()
    assert kv.swap_in(b, 5) is None, "b's next token needs a second block, and only one is free"
    assert kv.cpu_tables["b"] == [2] and kv.block_ids("b") == []
    kv.free("a")
    assert kv.swap_in(b, 5) == [(2, 3)] and kv.block_ids("b") == [3, 0]
    kv.check_integrity()
    kv.free("b")
    kv.end_step()
    kv.check_integrity()
    assert kv.num_used_blocks == 0 and kv.cpu_pool.num_free_blocks == 3


operations = st.lists(
    st.tuples(st.sampled_from(["append", "free", "abort"]), st.integers(0, 5), st.integers(1, 40)),
    min_size=1, max_size=60)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 4, 16]), ops=operations,
       alphabet=st.integers(1, 3), host_blocks=st.sampled_from([0, 0, 1, 3, 12]))
def test_random_operations_keep_integrity(num_blocks, block_size, ops, alphabet, host_blocks):
    """Random growth and release of requests whose tokens come from a tiny alphabet, so that
    prefix hits, shared blocks and revivals happen all the time; with a host tier of
    `host_blocks` (0: none), evictions move to the host and hits come back from it. Each
    operation is a step (closed by `end_step`); integrity is checked before and after."""
    cpu_pool = BlockPool(host_blocks) if host_blocks else None
    kv = KVCacheManager(BlockPool(num_blocks), block_size, cpu_pool=cpu_pool, host_tier=bool(host_blocks))
    requests: dict[str, Request] = {}
    lengths: dict[str, int] = {}
    for op, who, amount in ops:
        request_id = f"r{who}"
        if op == "append":
            if request_id not in requests:
                request = requests[request_id] = req(request_id, [(who + i) % alphabet for i in range(amount)])
                hit = kv.get_computed_blocks(request)
                assert hit.num_tokens == len(hit.blocks) * block_size < amount
                assert hit.num_host_tokens == len(hit.host_positions) * block_size and (host_blocks or not hit.host_positions)
                added = kv.allocate_slots(request, amount, hit)
                if added is None:
                    del requests[request_id]
                    kv.free(request_id)
                else:
                    lengths[request_id] = amount
                    table = kv.block_ids(request_id)
                    assert len(table) == -(-amount // block_size)
                    device_hits = [b for i, b in enumerate(hit.blocks) if i not in hit.host_positions]
                    assert [table[i] for i in range(len(hit.blocks)) if i not in hit.host_positions] == device_hits
                    assert sorted(table) == sorted(device_hits + added)
            else:
                request = requests[request_id]
                request.output_token_ids.extend([who % alphabet] * amount)
                target = lengths[request_id] + amount
                before, free_before = list(kv.block_ids(request_id)), kv.pool.num_free_blocks
                added = kv.allocate_slots(request, target)
                if added is None:
                    del request.output_token_ids[-amount:]
                    assert kv.block_ids(request_id) == before and kv.pool.num_free_blocks == free_before
                else:
                    lengths[request_id] = target
                    assert kv.block_ids(request_id) == before + added
                    assert len(kv.block_ids(request_id)) == -(-target // block_size)
        else:  # free on finish and abort release the same way
            kv.free(request_id)
            requests.pop(request_id, None)
            lengths.pop(request_id, None)
        kv.check_integrity()
        offloads, loads = kv.end_step()
        assert len({host for _, host in offloads}) == len(offloads), "two offloads write one host block"
        assert not {host for _, host in offloads} & {host for host, _ in loads}, "a step reads a host block it writes"
        kv.check_integrity()
    for request_id in list(lengths):
        kv.free(request_id)
        kv.check_integrity()
    kv.end_step()
    assert kv.pool.num_free_blocks == num_blocks
    assert cpu_pool is None or kv.cpu_pool.num_free_blocks == host_blocks


def test_the_host_tier_keeps_evicted_prefixes_and_brings_them_back():
    """Exact block ids: evicted cached blocks are copied to the host (tail first, as the
    device evicts them), a later prompt hits them there and gets fresh device blocks filled
    by load copies; host blocks a step touches are held until `end_step`; the host copy
    stays cached; LRU across both tiers; a full host drops the oldest."""
    kv = KVCacheManager(BlockPool(6), 4, cpu_pool=BlockPool(5), host_tier=True, hash_seed=b"s" * 32)

    def admit(request_id, tokens):
        request = req(request_id, tokens)
        hit = kv.get_computed_blocks(request)
        assert kv.allocate_slots(request, len(tokens), hit) is not None
        kv.record_lookup(len(tokens), hit)
        kv.check_integrity()
        return request, hit

    a, hit = admit("a", list(range(1, 14)))         # 13 tokens: blocks 0-3, three full
    assert hit == NO_HIT and kv.end_step() == ([], [])
    kv.free("a")
    kv.check_integrity()
    b, hit = admit("b", list(range(50, 67)))        # 17 tokens: 5 blocks, evicting a's 2, 1 (tail first)
    assert kv.block_ids("b") == [4, 5, 3, 2, 1]
    assert kv.end_step() == ([(2, 0), (1, 1)], [])  # a's blocks 2 and 1, to host blocks 0 and 1
    kv.check_integrity()
    assert kv.cpu_pool.num_free_blocks == 5 and len(kv.cpu_pool.cached) == 2
    kv.free("b")
    a2, hit = admit("a2", list(range(1, 14)))       # block 0 still on the device, 1 and 2 on the host
    assert hit == PrefixHit([0, 1, 0], 12, host_positions=(1, 2), num_host_tokens=8)
    # Fresh device blocks 1, 2, 3 (free queue 1, 2, 3, 5, 4 after b left): 1 had no hash, 2 and 3
    # held b's last full blocks, now evicted to the host; host hits land in device blocks 1 and 2.
    assert kv.block_ids("a2") == [0, 1, 2, 3]
    assert kv.cpu_pool.num_free_blocks == 3, "the hits' host blocks are held for the step"
    # Device 2 is offloaded before the load writes it: the workers run swap-outs first.
    assert kv.end_step() == ([(2, 2), (3, 3)], [(1, 1), (0, 2)])
    kv.check_integrity()
    assert len(kv.cpu_pool.cached) == 4 and kv.cpu_pool.num_free_blocks == 5, "host copies stay cached"
    assert (kv.num_hit_tokens, kv.num_host_hit_tokens, kv.num_offloaded_blocks, kv.num_loaded_blocks) == (12, 8, 4, 2)
    kv.free("a2")
    kv.end_step()
    kv.check_integrity()
    assert kv.num_used_blocks == 0
