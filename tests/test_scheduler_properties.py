"""The scheduler and block pool under random traffic, against a simulated worker whose KV
slots record which prefix each was computed for: every step, every token a request
attends to must hold exactly its own prefix. That catches any prefix hit on the wrong
blocks, a missing or late copy-on-write, a lost swap, or a write into someone else's
block. Random arrivals, lengths, shared prefixes, parallel samples (forks), aborts and
preemptions (recompute and swap), a host tier for the prefix cache sharing the host pool
with swapping (evicted blocks copied out, host hits copied back); integrity after every
step; nothing held at the end.
Both synchronous and asynchronous scheduling (each plan made while the step before is in
flight, its sampled tokens named by placeholder), with or without requests that stop on a
token (whose token from the step already in flight is then dropped).
`QUIRE_PROPERTY_EXAMPLES=N` runs N examples instead of 300 (a deeper search, outside CI)."""
from __future__ import annotations

import os
from collections import deque

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quire.cluster.core.block_pool import BlockPool
from quire.cluster.core.config import SchedulerConfig
from quire.cluster.core.kv_cache_manager import KVCacheManager
from quire.cluster.core.request import Request, RequestStatus
from quire.cluster.core.scheduler import Scheduler
from quire.protos.step import PLACEHOLDER_TOKEN, SamplingParams, StepPlan, StepResult

PREFIXES = [[], [7, 8, 9, 10, 11, 12], [7, 8, 9, 10, 13, 14, 15, 16, 17, 18, 19]]


class SimulatedWorker:
    """Applies plans as the model runner does; a KV slot holds the token prefix it was computed for."""

    def __init__(self, num_blocks: int, num_cpu_blocks: int, block_size: int):
        self.block_size = block_size
        self.kv = [[None] * block_size for _ in range(num_blocks)]
        self.cpu = [[None] * block_size for _ in range(num_cpu_blocks)]
        self.requests: dict[int, dict] = {}
        self.max_tokens: dict[int, int] = {}  # by handle, set by the test: the wire does not carry it

    def resolve(self, state: dict, token: int) -> int:
        if token != PLACEHOLDER_TOKEN:
            return token
        assert state["last"] is not None, "a placeholder for a request this worker sampled nothing for"
        token, state["last"] = state["last"], None
        return token

    def step(self, plan: StepPlan) -> StepResult:
        for handle in plan.finished_handles:
            self.requests.pop(handle, None)
        for new in plan.new_requests:
            self.requests[new.handle] = {"tokens": new.prompt_token_ids + new.output_token_ids,
                                         "table": list(new.block_ids), "computed": new.num_computed_tokens,
                                         "last": None, "limit": len(new.prompt_token_ids) + self.max_tokens[new.handle]}
            assert PLACEHOLDER_TOKEN not in self.requests[new.handle]["tokens"]
        for delta in plan.cached_requests:
            state = self.requests[delta.handle]
            state["tokens"] += [self.resolve(state, token) for token in delta.new_token_ids]
            state["table"] = list(delta.new_block_ids) if delta.replace_table else state["table"] + delta.new_block_ids
            state["computed"] = delta.num_computed_tokens
        for handle, token in zip(plan.decode_handles, plan.decode_token_ids):
            state = self.requests[handle]
            state["tokens"].append(self.resolve(state, token))
            assert state["computed"] == len(state["tokens"]) - 1
        for handle, block in zip(plan.decode_block_handles, plan.decode_block_ids):
            self.requests[handle]["table"].append(block)
        # The real pool scatters each list at once: a destination named twice would be a race.
        assert len({dst for _, dst in plan.swap_out}) == len(plan.swap_out), "two swap-outs write one host block"
        assert len({dst for _, dst in plan.swap_in}) == len(plan.swap_in), "two swap-ins write one device block"
        for src, dst in plan.swap_out:
            self.cpu[dst] = list(self.kv[src])
        for src, dst in plan.swap_in:
            self.kv[dst] = list(self.cpu[src])
        for src, dst in plan.block_copies:
            self.kv[dst] = list(self.kv[src])
        size, scheduled = self.block_size, plan.scheduled()
        for handle, count in scheduled:  # every layer writes all K/V first ...
            state = self.requests[handle]
            start, tokens, table = state["computed"], state["tokens"], state["table"]
            assert start + count <= len(tokens) and start + count <= len(table) * size, "scheduled past tokens/blocks"
            for pos in range(start, start + count):
                self.kv[table[pos // size]][pos % size] = tuple(tokens[:pos + 1])
        result = StepResult(plan.step_id)
        for handle, count in scheduled:  # ... then attends over the whole context
            state = self.requests[handle]
            end, tokens, table = state["computed"] + count, state["tokens"], state["table"]
            for pos in range(end):
                assert self.kv[table[pos // size]][pos % size] == tuple(tokens[:pos + 1]), \
                    f"request {handle} reads a slot at position {pos} that holds another prefix"
            state["computed"] = end
            if end == len(tokens):
                assert end < state["limit"], f"request {handle} sampled past its max_tokens"
                result.sampled_handles.append(handle)
                result.sampled_token_ids.append((handle * 31 + end * 7) % 5)
                state["last"] = result.sampled_token_ids[-1]
        return result


arrival = st.tuples(st.just("arrive"), st.integers(0, len(PREFIXES) - 1), st.integers(1, 14), st.integers(1, 12),
                    st.integers(1, 3))
events = st.lists(st.one_of(arrival, st.tuples(st.just("abort"), st.integers(0, 40)), st.just(("step",))),
                  min_size=1, max_size=50)


@settings(max_examples=int(os.environ.get("QUIRE_PROPERTY_EXAMPLES", "300")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(num_blocks=st.integers(6, 24), block_size=st.sampled_from([2, 4, 8]), budget=st.integers(4, 48),
       max_num_seqs=st.integers(1, 8), prefix_caching=st.booleans(), swap=st.booleans(),
       num_cpu_blocks=st.integers(0, 24), host_tier=st.booleans(), pipelined=st.booleans(),
       stop_on_zero=st.booleans(), watermark=st.sampled_from([0.0, 0.2]), script=events)
def test_random_traffic_keeps_every_block_consistent(num_blocks, block_size, budget, max_num_seqs, prefix_caching,
                                                     swap, num_cpu_blocks, host_tier, pipelined, stop_on_zero,
                                                     watermark, script):
    # One host pool for swapped-out requests and the prefix cache's host tier, either or both.
    cpu_pool = BlockPool(num_cpu_blocks) if (swap or host_tier) and num_cpu_blocks else None
    kv = KVCacheManager(BlockPool(num_blocks), block_size, enable_prefix_caching=prefix_caching, cpu_pool=cpu_pool,
                        host_tier=host_tier and cpu_pool is not None)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                          admission_watermark=watermark), kv,
                          preemption_mode="swap" if swap and cpu_pool else "recompute")
    worker = SimulatedWorker(num_blocks, num_cpu_blocks, block_size)
    arrived: list[Request] = []
    in_flight: deque[tuple[StepPlan, StepResult]] = deque()  # as the engine keeps them

    def step() -> None:
        while len(in_flight) < (2 if pipelined else 1):
            plan = scheduler.schedule()
            scheduler.check_integrity()
            if not plan.has_work:
                break
            in_flight.append((plan, worker.step(plan)))  # the worker runs steps in order, each after the last
        if not in_flight:
            return
        plan, result = in_flight.popleft()
        for request in scheduler.update_from_output(plan, result):
            if len(request.output_token_ids) >= request.sampling_params.max_tokens:
                scheduler.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
            elif stop_on_zero and request.output_token_ids[-1] == 0:
                scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
        scheduler.check_integrity()
        for request in scheduler.running:  # the worker's tables are the controller's
            assert worker.requests[request.handle]["table"] == kv.block_ids(request.request_id)

    for event in script:
        if event[0] == "arrive":
            _, prefix, suffix_len, max_tokens, n = event
            prompt = PREFIXES[prefix] + [(len(arrived) + i) % 5 for i in range(suffix_len)]
            if kv.blocks_for(len(prompt) + max_tokens) > num_blocks:
                continue  # the engine refuses what could never fit
            leader = None
            for _ in range(n):  # n > 1: parallel samples of one prompt, forked from the first
                request = Request(f"r{len(arrived)}", list(prompt), SamplingParams(max_tokens=max_tokens),
                                  arrival_time=float(len(arrived)))
                request.fork_of = leader
                scheduler.add_request(request)
                worker.max_tokens[request.handle] = max_tokens
                arrived.append(request)
                leader = leader or request
        elif event[0] == "abort":
            if arrived:
                scheduler.finish_request(arrived[event[1] % len(arrived)].request_id, RequestStatus.FINISHED_ABORTED)
                scheduler.check_integrity()
        else:
            step()
    for _ in range(3000):
        if not scheduler.num_unfinished:
            break
        step()
    assert not scheduler.num_unfinished, "the queue never drained"
    assert kv.num_used_blocks == 0 and not kv.tables
    assert cpu_pool is None or kv.cpu_pool.num_free_blocks == num_cpu_blocks


@settings(max_examples=int(os.environ.get("QUIRE_PROPERTY_EXAMPLES", "100")) // 3 or 1, deadline=None,
          derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(8, 16), num_cpu_blocks=st.integers(1, 64), block_size=st.sampled_from([2, 4]),
       conversations=st.integers(2, 6), turns=st.integers(2, 4), swap=st.booleans(), pipelined=st.booleans(),
       data=st.data())
def test_multi_turn_traffic_over_a_host_tier_reads_only_its_own_prefixes(num_blocks, num_cpu_blocks, block_size,
                                                                        conversations, turns, swap, pipelined, data):
    """Conversations whose histories outgrow the device pool, turn after turn, interleaved so
    each one's blocks are evicted (to the host tier, while it has room) before it comes back:
    every slot read holds its own prefix (host hits copied back exactly), the host pool is
    shared with swap preemption, integrity holds after every step, nothing is held at the end.
    (Over the default examples about a thousand blocks come back from the host.)"""
    cpu_pool = BlockPool(num_cpu_blocks)
    kv = KVCacheManager(BlockPool(num_blocks), block_size, cpu_pool=cpu_pool, host_tier=True)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=16), kv,
                          preemption_mode="swap" if swap else "recompute")
    worker = SimulatedWorker(num_blocks, num_cpu_blocks, block_size)
    histories = [[100 + c] + [c % 5] * data.draw(st.integers(1, 6)) for c in range(conversations)]
    in_flight: deque[tuple[StepPlan, StepResult]] = deque()
    for turn in range(turns):
        for c in range(conversations):
            prompt = histories[c] + [(turn + c) % 5, 9]
            if kv.blocks_for(len(prompt) + 3) > num_blocks:
                continue
            request = Request(f"c{c}t{turn}", prompt, SamplingParams(max_tokens=3), arrival_time=float(turn * 10 + c))
            scheduler.add_request(request)
            worker.max_tokens[request.handle] = 3
            for _ in range(400):  # one conversation at a time: the others' blocks age meanwhile
                while len(in_flight) < (2 if pipelined else 1):
                    plan = scheduler.schedule()
                    scheduler.check_integrity()
                    if not plan.has_work:
                        break
                    in_flight.append((plan, worker.step(plan)))
                if not in_flight:
                    break
                plan, result = in_flight.popleft()
                for done in scheduler.update_from_output(plan, result):
                    if len(done.output_token_ids) >= 3:
                        scheduler.finish_request(done.request_id, RequestStatus.FINISHED_LENGTH)
                scheduler.check_integrity()
            assert not scheduler.num_unfinished
            histories[c] = prompt + request.output_token_ids
    assert kv.num_used_blocks == 0 and not kv.tables and cpu_pool.num_free_blocks == num_cpu_blocks
