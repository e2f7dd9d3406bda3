"""KV events and the router's PrefixMirror: exact events per pool operation (exact block ids,
integrity after each), the mirror equal to every replica's real cache under random traffic
(real Schedulers against simulated workers), loss detection and resync, and cache salts.
`QUIRE_PROPERTY_EXAMPLES=N` runs N examples instead of 200."""
from __future__ import annotations

import os
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_scheduler_properties import SimulatedWorker

from quire.cluster.core.block_pool import BlockPool
from quire.cluster.core.config import SchedulerConfig
from quire.cluster.core.kv_cache_manager import KVCacheManager
from quire.cluster.core.kv_events import HOST, BlockRemoved, BlockStored, CacheCleared, KVEventLog
from quire.cluster.core.request import Request, RequestStatus
from quire.cluster.core.scheduler import Scheduler
from quire.cluster.serving.prefix_mirror import PrefixMirror
from quire.protos.step import SamplingParams, StepPlan, StepResult

H = [bytes([i]) * 16 for i in range(8)]  # stand-in content hashes
SEED = b"k" * 32  # replicas share the hash seed, as the router computes the same hashes


def req(request_id: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(request_id, list(tokens), SamplingParams(), cache_salt=salt)


# -- events per operation ------------------------------------------------------------------------
def test_pool_publishes_store_and_evict_only_on_hash_map_changes():
    log = KVEventLog()
    pool = BlockPool(3, events=log)
    assert pool.allocate(2) == [0, 1]
    pool.cache(0, H[0])
    pool.cache(1, H[1], H[0])
    pool.check_integrity([[0, 1]])
    assert log.drain() == [BlockStored(0, H[0], None, 0), BlockStored(1, H[1], H[0], 1)]
    pool.touch([0])                  # shared: no change of the map
    pool.cache(1, H[1], H[0])        # already holds it
    assert pool.allocate_one() == 2
    pool.cache(2, H[0])              # another block holds H[0]: lookups keep finding block 0
    pool.check_integrity([[0, 1], [0], [2]])
    pool.free([1, 0])
    pool.free([0])
    pool.free([2])                   # freed blocks keep their hashes: still cached
    pool.check_integrity([])
    assert log.drain() == [] and log.next_seq == 2
    assert pool.allocate(2) == [1, 0]  # reuse evicts, least recently freed first
    pool.check_integrity([[1, 0]])
    assert log.drain() == [BlockRemoved(2, H[1], 1), BlockRemoved(3, H[0], 0)]
    assert pool.allocate_one() == 2  # held no hash: nothing to publish
    pool.check_integrity([[1, 0], [2]])
    assert log.drain() == [] and log.snapshot().blocks == {}


def test_manager_publishes_parents_shares_silently_and_clears_on_reset():
    log = KVEventLog()
    kv = KVCacheManager(BlockPool(4, events=log), block_size=2, hash_seed=SEED)
    r1, r2, r3 = req("r1", [1, 2, 3, 4, 5]), req("r2", [1, 2, 3, 4, 5]), req("r3", [9, 9, 9, 9, 9])
    assert kv.allocate_slots(r1, 5) == [0, 1, 2]
    kv.check_integrity()
    h0, h1 = kv.block_hashes(r1, 4)
    assert log.drain() == [BlockStored(0, h0, None, 0), BlockStored(1, h1, h0, 1)]
    hit = kv.get_computed_blocks(r2)
    assert (hit.blocks, hit.num_tokens) == ([0, 1], 4)
    assert kv.allocate_slots(r2, 5, computed_blocks=hit) == [3]  # a prefix hit shares: silent
    kv.check_integrity()
    kv.free("r1")
    kv.free("r2")
    kv.check_integrity()
    assert log.drain() == []
    assert kv.allocate_slots(r3, 5) == [2, 3, 1]  # free queue 2, 3, 1, 0: block 1 loses h1
    kv.check_integrity()
    g0, g1 = kv.block_hashes(r3, 4)
    assert log.drain() == [BlockRemoved(2, h1, 1), BlockStored(3, g0, None, 2), BlockStored(4, g1, g0, 3)]
    assert log.snapshot() == type(log.snapshot())(5, {h0: None, g0: None, g1: g0})
    kv.reset()
    kv.check_integrity()
    assert kv.pool.events is log and log.drain() == [CacheCleared(5)]
    kv.reset()                                     # nothing cached: no change, no event
    assert log.drain() == [] and log.next_seq == 6


def test_a_pool_without_a_log_publishes_nothing():
    kv = KVCacheManager(BlockPool(4), block_size=2, hash_seed=SEED)
    kv.allocate_slots(req("r1", [1, 2, 3, 4, 5]), 5)
    kv.reset()
    assert kv.pool.events is None
    kv.check_integrity()


def test_a_full_log_drops_the_oldest_events_and_the_mirror_sees_the_gap():
    log = KVEventLog(capacity=2)
    pool = BlockPool(3, events=log)
    pool.allocate(3)
    for block in range(3):
        pool.cache(block, H[block], H[block - 1] if block else None)
    pool.check_integrity([[0, 1, 2]])
    assert log.num_dropped == 1
    mirror = PrefixMirror()
    assert not mirror.apply("a", log.drain(), log.next_seq)
    mirror.resync("a", log.snapshot())
    assert mirror.is_exact("a") and mirror.cached_hashes("a") == set(pool.cached)


# -- the mirror ------------------------------------------------------------------------------------
def test_mirror_detects_lost_events_and_resyncs_exactly():
    logs = {name: KVEventLog() for name in "ab"}
    kvs = {name: KVCacheManager(BlockPool(4, events=logs[name]), block_size=2, hash_seed=SEED) for name in "ab"}
    mirror = PrefixMirror()
    prompt = [1, 2, 3, 4, 5]
    for name in "ab":
        kvs[name].allocate_slots(req("r1", prompt), 5)
        kvs[name].check_integrity()
        assert mirror.apply(name, logs[name].drain(), logs[name].next_seq)
    h0, h1 = kvs["a"].block_hashes(req("x", prompt), 4)
    assert mirror.replicas_holding(h0) == {"a", "b"} and mirror.cached_prefix_blocks("b", [h0, h1, H[0]]) == 2
    kvs["a"].free("r1")
    kvs["a"].allocate_slots(req("r2", [7, 7, 7, 7, 7, 7, 7]), 7)  # evicts both of r1's blocks
    kvs["a"].check_integrity()
    lost = logs["a"].drain()
    assert [type(event) for event in lost] == [BlockRemoved, BlockRemoved, BlockStored, BlockStored, BlockStored]
    assert not mirror.apply("a", [], logs["a"].next_seq), "a loss at the tail is caught by next_seq"
    assert not mirror.is_exact("a") and mirror.is_exact("b")
    assert not mirror.apply("a", lost), "a stale replica ignores events until resynced"
    mirror.resync("a", logs["a"].snapshot())
    assert mirror.is_exact("a") and mirror.cached_hashes("a") == set(kvs["a"].pool.cached)
    assert mirror.replicas_holding(h0) == {"b"} and mirror.cached_prefix_blocks("a", [h0, h1]) == 0
    kvs["a"].free("r2")
    kvs["a"].allocate_slots(req("r3", prompt), 5)                 # a later batch, after a lost one
    lost = logs["a"].drain()
    kvs["a"].free("r3")
    kvs["a"].allocate_slots(req("r4", [5, 5, 5]), 3)
    assert not mirror.apply("a", logs["a"].drain()), "a gap in seq marks the replica stale"
    mirror.resync("a", logs["a"].snapshot())
    assert mirror.cached_hashes("a") == set(kvs["a"].pool.cached) and lost


def test_mirror_detects_a_restarted_stream_and_forgets_removed_replicas():
    log = KVEventLog()
    pool = BlockPool(2, events=log)
    pool.allocate(2)
    pool.cache(0, H[0])
    pool.cache(1, H[1], H[0])
    mirror = PrefixMirror()
    assert mirror.apply("a", log.drain())
    restarted = KVEventLog()                     # the replica came back with a fresh pool and log
    BlockPool(2, events=restarted).allocate(1)
    restarted.stored(H[2], None, 0)
    assert not mirror.apply("a", restarted.drain()), "seq going back is a restart"
    mirror.resync("a", restarted.snapshot())
    assert mirror.cached_hashes("a") == {H[2]} and mirror.replicas_holding(H[0]) == frozenset()
    assert mirror.apply("a", [CacheCleared(1)]) and mirror.cached_hashes("a") == set()
    mirror.remove_replica("a")
    assert mirror.replicas == [] and not mirror.is_exact("a")


def test_different_cache_salts_never_share_a_hash():
    logs = {name: KVEventLog() for name in "ab"}
    kvs = {name: KVCacheManager(BlockPool(6, events=logs[name]), block_size=2, hash_seed=SEED) for name in "ab"}
    mirror = PrefixMirror()
    prompt = [1, 2, 3, 4, 5]
    kvs["a"].allocate_slots(req("x", prompt, salt="tenant-1"), 5)
    kvs["a"].allocate_slots(req("y", prompt, salt="tenant-2"), 5)   # same tokens, another salt: no hit
    kvs["b"].allocate_slots(req("x", prompt, salt="tenant-1"), 5)
    for name in "ab":
        kvs[name].check_integrity()
        assert mirror.apply(name, logs[name].drain(), logs[name].next_seq)
    salted_1 = kvs["a"].block_hashes(req("p", prompt, salt="tenant-1"), 4)
    salted_2 = kvs["a"].block_hashes(req("q", prompt, salt="tenant-2"), 4)
    assert not set(salted_1) & set(salted_2)
    assert kvs["a"].block_ids("y") == [3, 4, 5], "the second salt shares no block"
    assert [mirror.replicas_holding(h) for h in salted_1] == [{"a", "b"}] * 2
    assert [mirror.replicas_holding(h) for h in salted_2] == [{"a"}] * 2
    assert mirror.cached_prefix_blocks("b", salted_2) == 0 and mirror.cached_prefix_blocks("b", salted_1) == 2


# -- exactness under random traffic -------------------------------------------------------------
PREFIXES = [[], [7, 8, 9, 10, 11, 12], [7, 8, 9, 10, 13, 14, 15, 16, 17, 18, 19]]
SALTS = [None, "tenant"]


class Replica:
    """A scheduler and its pool (with an event log) driven by a simulated worker, one step in flight."""

    def __init__(self, num_blocks: int, block_size: int, budget: int, max_num_seqs: int, host_blocks: int = 0):
        self.log = KVEventLog(capacity=64)  # small: overflow (a gap) happens under this traffic too
        self.host_blocks = host_blocks  # a host tier of this many blocks (0: none)
        self.kv = KVCacheManager(BlockPool(num_blocks, events=self.log), block_size, hash_seed=SEED,
                                 cpu_pool=BlockPool(host_blocks) if host_blocks else None, host_tier=bool(host_blocks))
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget), self.kv)
        self.worker = SimulatedWorker(num_blocks, host_blocks, block_size)
        self.in_flight: deque[tuple[StepPlan, StepResult]] = deque()

    def step(self) -> None:
        if not self.in_flight:
            plan = self.scheduler.schedule()
            if plan.has_work:
                self.in_flight.append((plan, self.worker.step(plan)))
        if self.in_flight:
            plan, result = self.in_flight.popleft()
            for request in self.scheduler.update_from_output(plan, result):
                if len(request.output_token_ids) >= request.sampling_params.max_tokens:
                    self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
        self.scheduler.check_integrity()


def sync_and_check(mirror: PrefixMirror, replicas: list[Replica], lost: set[int]) -> None:
    """Drain every replica into the mirror: in sync unless a batch of it was lost (then resync);
    either way the mirror then equals every replica's hash map."""
    for rid, replica in enumerate(replicas):
        expected = rid not in lost and not replica.log.num_dropped  # every loss is detected, and only a loss
        in_sync = mirror.apply(rid, replica.log.drain(), replica.log.next_seq)
        assert in_sync == expected
        if not in_sync:
            mirror.resync(rid, replica.log.snapshot())
        lost.discard(rid)
        replica.log.num_dropped = 0
        assert mirror.is_exact(rid) and mirror.cached_hashes(rid) == set(replica.kv.pool.cached)
        host_cached = set(replica.kv.cpu_pool.cached) if replica.host_blocks else set()
        assert mirror.cached_hashes(rid, HOST) == host_cached, "the mirror's host tier differs from the replica's"
    for rid, replica in enumerate(replicas):
        for block_hash in replica.kv.pool.cached:
            assert rid in mirror.replicas_holding(block_hash)
        for block_hash in (replica.kv.cpu_pool.cached if replica.host_blocks else ()):
            assert rid in mirror.host_holders_view(block_hash)


arrival = st.tuples(st.just("arrive"), st.integers(0, 2), st.integers(0, len(PREFIXES) - 1),
                    st.integers(0, len(SALTS) - 1), st.integers(1, 10), st.integers(1, 12))
step = st.tuples(st.just("step"), st.integers(0, 2))
op = st.one_of(arrival, step, arrival, step, step, st.tuples(st.just("abort"), st.integers(0, 40)),
               st.tuples(st.just("drain"), st.integers(0, 2)), st.tuples(st.just("drop"), st.integers(0, 2)),
               st.just(("check",)), st.tuples(st.just("reset"), st.integers(0, 2)))


@settings(max_examples=int(os.environ.get("QUIRE_PROPERTY_EXAMPLES", "200")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(num_replicas=st.integers(2, 3), num_blocks=st.integers(5, 10), block_size=st.sampled_from([2, 4]),
       budget=st.integers(4, 32), max_num_seqs=st.integers(1, 6), host_blocks=st.sampled_from([0, 0, 3, 12]),
       script=st.lists(op, min_size=10, max_size=80))
def test_mirror_equals_every_replicas_cache_under_random_traffic(num_replicas, num_blocks, block_size, budget,
                                                                   max_num_seqs, host_blocks, script):
    """With or without host tiers (`host_blocks`): the mirror holds each tier apart, exactly."""
    replicas = [Replica(num_blocks, block_size, budget, max_num_seqs, host_blocks) for _ in range(num_replicas)]
    mirror, lost, arrived = PrefixMirror(), set(), []
    for event in script:
        kind, rid = event[0], (event[1] % num_replicas if len(event) > 1 else 0)
        replica = replicas[rid]
        if kind == "arrive":
            _, _, prefix, salt, suffix_len, max_tokens = event
            prompt = PREFIXES[prefix] + [(len(arrived) + i) % 3 for i in range(suffix_len)]
            if replica.kv.blocks_for(len(prompt) + max_tokens) > num_blocks:
                continue  # the engine refuses what could never fit
            request = Request(f"r{len(arrived)}", prompt, SamplingParams(max_tokens=max_tokens),
                              arrival_time=float(len(arrived)), cache_salt=SALTS[salt])
            replica.scheduler.add_request(request)
            replica.worker.max_tokens[request.handle] = max_tokens
            arrived.append((replica, request))
        elif kind == "abort" and arrived:
            owner, request = arrived[event[1] % len(arrived)]
            owner.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_ABORTED)
            owner.scheduler.check_integrity()
        elif kind == "step":
            replica.step()
        elif kind == "drain":
            if not mirror.apply(rid, replica.log.drain()):
                assert rid in lost or replica.log.num_dropped, "stale without a loss"
        elif kind == "drop":
            if replica.log.drain():
                lost.add(rid)
        elif kind == "reset" and not replica.in_flight:  # the workers were replaced
            replica.scheduler.forget_worker_state()
            replica.worker = SimulatedWorker(num_blocks, host_blocks, block_size)
            for owner, request in arrived:
                if owner is replica:
                    replica.worker.max_tokens[request.handle] = request.sampling_params.max_tokens
            replica.scheduler.check_integrity()
        elif kind == "check":
            sync_and_check(mirror, replicas, lost)
    for replica in replicas:
        for _ in range(2000):
            if not replica.scheduler.num_unfinished and not replica.in_flight:
                break
            replica.step()
        assert not replica.scheduler.num_unfinished, "the queue never drained"
    sync_and_check(mirror, replicas, lost)
    assert all(replica.kv.num_used_blocks == 0 for replica in replicas)


def test_the_mirror_keeps_host_tiers_apart_and_routing_scores_a_host_hit_below_a_device_hit():
    from quire.cluster.serving.routing import HOST_HIT_COST, CacheAware, ReplicaLoad, matched_prefix_blocks

    mirror = PrefixMirror()
    chain = H[:4]
    device_events = [BlockStored(i, h, chain[i - 1] if i else None, i) for i, h in enumerate(chain)]
    assert mirror.apply("dev", device_events)
    # "host" holds the first block on its device and the next three only in host memory.
    host_events = [BlockStored(0, chain[0], None, 0)] + [
        BlockStored(i, h, chain[i - 1], i - 1, HOST) for i, h in enumerate(chain) if i]
    assert mirror.apply("host", host_events)
    assert mirror.cached_hashes("host") == {chain[0]} and mirror.cached_hashes("host", HOST) == set(chain[1:])
    assert mirror.cached_prefix_tiers("host", chain) == (4, 3) and mirror.cached_prefix_tiers("dev", chain) == (4, 0)
    assert matched_prefix_blocks(mirror, chain) == {"dev": (4, 0), "host": (4, 3)}
    assert matched_prefix_blocks(mirror, [chain[0], H[7]]) == {"dev": (1, 0), "host": (1, 0)}
    policy, block_size = CacheAware(), 16
    loads = [ReplicaLoad("host"), ReplicaLoad("dev")]
    decision = policy.choose(loads, chain, 4 * block_size + 1, block_size, mirror)
    assert (decision.replica_id, decision.cached_blocks, decision.host_blocks) == ("dev", 4, 0)
    # A queue on the device holder longer than the copy-back cost sends it to the host holder.
    loads = [ReplicaLoad("host"), ReplicaLoad("dev", queued_prefill_tokens=int(HOST_HIT_COST * 3 * block_size) + 1)]
    decision = policy.choose(loads, chain, 4 * block_size + 1, block_size, mirror)
    assert (decision.replica_id, decision.cached_blocks, decision.host_blocks) == ("host", 4, 3)
    # The host copy leaving (its block reused) ends the chain there; a CacheCleared empties both tiers.
    assert mirror.apply("host", [BlockRemoved(4, chain[2], 1, HOST)])
    assert mirror.cached_prefix_tiers("host", chain) == (2, 1)
    assert mirror.apply("host", [CacheCleared(5)])
    assert mirror.cached_hashes("host") == set() and mirror.cached_hashes("host", HOST) == set()
    assert not mirror.has_host_blocks
