"""BlockPool and KVCacheManager: exact block ids, ref counts, integrity after every operation."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quire.cluster.block_pool import BlockPool
from quire.cluster.kv_cache_manager import KVCacheManager


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
    pool.share(a)
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
    with pytest.raises(ValueError, match="free and cannot be shared"):
        pool.share([0])


def test_integrity_check_catches_disagreeing_tables():
    pool = BlockPool(4)
    pool.allocate(2)
    with pytest.raises(AssertionError, match="disagree"):
        pool.check_integrity([[0]])


def test_manager_grows_tables_block_by_block():
    kv = KVCacheManager(BlockPool(5), block_size=4)
    assert kv.allocate_slots("a", 3) == [0]
    kv.check_integrity()
    assert kv.allocate_slots("a", 4) == []  # still fits in block 0
    assert kv.allocate_slots("a", 5) == [1]
    assert kv.allocate_slots("b", 9) == [2, 3, 4]
    kv.check_integrity()
    assert kv.block_ids("a") == [0, 1] and kv.block_ids("b") == [2, 3, 4]
    assert kv.allocate_slots("a", 9) is None
    assert kv.block_ids("a") == [0, 1], "a failed allocation changes nothing"
    kv.check_integrity()
    kv.free("b")
    kv.check_integrity()
    # tail first: b's blocks return as 4, 3, 2
    assert kv.allocate_slots("c", 12) == [4, 3, 2]
    kv.check_integrity()
    kv.free("a")
    kv.free("c")
    kv.free("never-seen")
    kv.check_integrity()
    assert kv.num_used_blocks == 0


operations = st.lists(
    st.tuples(st.sampled_from(["append", "free", "abort"]), st.integers(0, 5), st.integers(1, 40)),
    min_size=1, max_size=60)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 4, 16]), ops=operations)
def test_random_operations_keep_integrity(num_blocks, block_size, ops):
    kv = KVCacheManager(BlockPool(num_blocks), block_size)
    lengths: dict[str, int] = {}
    for op, who, amount in ops:
        request_id = f"r{who}"
        if op == "append":
            target = lengths.get(request_id, 0) + amount
            before = list(kv.block_ids(request_id))
            free_before = kv.pool.num_free_blocks
            added = kv.allocate_slots(request_id, target)
            if added is None:
                assert kv.block_ids(request_id) == before and kv.pool.num_free_blocks == free_before
            else:
                lengths[request_id] = target
                assert kv.block_ids(request_id) == before + added
                assert len(kv.block_ids(request_id)) == -(-target // block_size)
        else:  # free on finish and abort release the same way
            kv.free(request_id)
            lengths.pop(request_id, None)
        kv.check_integrity()
    for request_id in list(lengths):
        kv.free(request_id)
        kv.check_integrity()
    assert kv.pool.num_free_blocks == num_blocks
