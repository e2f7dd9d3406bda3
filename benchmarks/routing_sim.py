"""The routing benchmark's workload and its simulated deployment (`routing.py`, which runs and
reports them, documents both): the seeded multi-tenant, multi-turn workload; the oracle (one
cache holding all KV); a simulated replica (a real `BlockPool`, `KVCacheManager` and
`Scheduler` behind a worker that answers with the conversation's predetermined tokens); the
simulation of the router in front of N of them in simulated time; and the timed decisions
(hash + choose) against the replicas' final state.
"""
from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import time
from dataclasses import dataclass

from quire.cluster.core.block_hash import BlockHasher
from quire.cluster.core.block_pool import BlockPool
from quire.cluster.core.config import SchedulerConfig
from quire.cluster.core.kv_cache_manager import KVCacheManager
from quire.cluster.core.kv_events import KVEventLog
from quire.cluster.core.request import Request, RequestStatus
from quire.cluster.core.scheduler import Scheduler
from quire.cluster.serving.prefix_mirror import PrefixMirror
from quire.cluster.serving.routing import ReplicaLoad, make_policy
from quire.protos.step import SamplingParams, StepResult

TOKEN_LOW, TOKEN_HIGH = 3, 2000  # away from the special ids, inside any vocabulary quire's tests build


# -- the workload -----------------------------------------------------------------------------
@dataclass
class Turn:
    user: list[int]
    output_len: int
    output: list[int]  # the simulated worker's answer (the real model writes its own)
    think_s: float     # pause after the answer before the next turn


@dataclass
class Conversation:
    cid: int
    tenant: int
    start_s: float
    turns: list[Turn]


@dataclass
class Workload:
    block_size: int
    system_prompts: list[list[int]]
    conversations: list[Conversation]

    def salt(self, tenant: int) -> str:
        return f"tenant-{tenant}"

    @property
    def num_requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    def prompt_tokens(self) -> int:
        """Prompt tokens of all turns (answers have their full length: EOS is ignored)."""
        total = 0
        for c in self.conversations:
            length = len(self.system_prompts[c.tenant])
            for turn in c.turns:
                length += len(turn.user)
                total += length
                length += turn.output_len
        return total

    def max_len(self) -> int:
        """Tokens of the longest conversation's whole history."""
        return max(len(self.system_prompts[c.tenant]) + sum(len(t.user) + t.output_len for t in c.turns)
                   for c in self.conversations)

    def working_set_blocks(self) -> int:
        """Full blocks of every system prompt and of every conversation's whole history
        beyond its system prompt: what one cache must hold to never evict anything useful."""
        size = self.block_size
        total = sum(len(p) // size for p in self.system_prompts)
        for c in self.conversations:
            system = len(self.system_prompts[c.tenant])
            history = system + sum(len(t.user) + t.output_len for t in c.turns)
            total += history // size - system // size
        return total


def span(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    low, high = int(low), int(high or low)
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 0 <= MIN <= MAX (got {text!r})")
    return low, high


def make_workload(seed: int, num_tenants: int, system_len: int, num_conversations: int, rate: float,
                  turns: tuple[int, int], user_len: tuple[int, int], output_len: tuple[int, int],
                  think_s: float, block_size: int) -> Workload:
    rng = random.Random(f"routing/{seed}")

    def tokens(count: int) -> list[int]:
        return [rng.randrange(TOKEN_LOW, TOKEN_HIGH) for _ in range(count)]

    systems = [tokens(system_len) for _ in range(num_tenants)]
    conversations, clock = [], 0.0
    for cid in range(num_conversations):
        clock += rng.expovariate(rate) if cid else 0.0
        conv_turns = []
        for _ in range(rng.randint(*turns)):
            length = rng.randint(*output_len)
            conv_turns.append(Turn(tokens(rng.randint(*user_len)), length, tokens(length),
                                   rng.expovariate(1 / think_s) if think_s > 0 else 0.0))
        conversations.append(Conversation(cid, rng.randrange(num_tenants), clock, conv_turns))
    return Workload(block_size, systems, conversations)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# -- the oracle: one cache holding everything ---------------------------------------------------
class Oracle:
    """One KVCacheManager over the blocks of all replicas together, fed every request at its
    arrival (longest cached prefix looked up, the prompt's blocks held) and its end (the
    whole history registered, the blocks released), as one replica with no queue would."""

    def __init__(self, num_blocks: int, block_size: int, seed: bytes):
        self.kv = KVCacheManager(BlockPool(num_blocks), block_size, hash_seed=seed)
        self.live: dict[str, Request] = {}
        self.num_unplaced = 0  # requests the pool had no room for (looked up, not held)

    def arrive(self, request_id: str, prompt: list[int], salt: str | None) -> None:
        request = Request(request_id, prompt, SamplingParams(max_tokens=1), cache_salt=salt)
        hit = self.kv.get_computed_blocks(request)
        self.kv.record_lookup(request.num_tokens, hit)
        if self.kv.allocate_slots(request, request.num_tokens, hit) is None:
            self.num_unplaced += 1
            self.kv.free(request_id)
            return
        self.live[request_id] = request

    def finish(self, request_id: str, output: list[int]) -> None:
        request = self.live.pop(request_id, None)
        if request is None:
            return
        request.output_token_ids.extend(output)
        # The last output token is sampled, never computed: its KV is not in the cache.
        if self.kv.allocate_slots(request, request.num_tokens - 1) is None:
            self.kv.cache_computed_blocks(request)
        self.kv.free(request_id)

    def report(self) -> dict:
        query, hit = self.kv.num_query_tokens, self.kv.num_hit_tokens
        return {"hit_rate": hit / query if query else 0.0, "prompt_tokens": query, "hit_tokens": hit,
                "prefill_tokens": query - hit, "num_blocks": self.kv.pool.num_blocks,
                "unplaced_requests": self.num_unplaced}


# -- the simulated part -----------------------------------------------------------------------
class SimReplica:
    """A replica without a model: a block pool publishing KV events, a KV cache manager with
    the deployment's seed, a scheduler, and a simulated worker that answers every plan."""

    def __init__(self, replica_id: str, num_blocks: int, block_size: int, seed: bytes, config: SchedulerConfig):
        self.replica_id = replica_id
        self.log = KVEventLog(capacity=1 << 22)
        self.pool = BlockPool(num_blocks, events=self.log)
        self.kv = KVCacheManager(self.pool, block_size, hash_seed=seed)
        self.scheduler = Scheduler(config, self.kv)
        self.load = ReplicaLoad(replica_id)
        self.answers: dict[str, list[int]] = {}  # request id → its predetermined output tokens
        self.plan = None  # the step in flight
        self.num_steps = 0
        self.num_requests = 0

    def work(self, plan) -> StepResult:
        """The simulated worker: a token for every scheduled request whose step reaches the
        end of its known tokens (synchronous scheduling: those awaiting exactly one token)."""
        result = StepResult(plan.step_id)
        by_handle = self.scheduler.by_handle
        for handle, _ in plan.scheduled():
            request = by_handle.get(handle)
            if request is not None and request.num_pending_tokens:
                result.sampled_handles.append(handle)
                result.sampled_token_ids.append(self.answers[request.request_id][len(request.output_token_ids)])
        return result


def simulate(workload: Workload, num_replicas: int, policy_name: str, args, seed: bytes) -> tuple[dict, tuple]:
    """One run of the workload through the router and `num_replicas` simulated replicas, in
    simulated time. Returns the run's figures and the replicas (for `decision_bench`)."""
    size = workload.block_size
    oracle_blocks = max(math.ceil(args.pool_slack * workload.working_set_blocks()), 1)
    per_replica = max(math.ceil(oracle_blocks / num_replicas), 2 * -(-workload.max_len() // size))
    config = SchedulerConfig(max_num_seqs=args.sim_max_num_seqs, max_num_batched_tokens=args.sim_max_num_batched_tokens)
    replicas = [SimReplica(f"r{i}", per_replica, size, seed, config) for i in range(num_replicas)]
    by_id = {r.replica_id: r for r in replicas}
    loads = [r.load for r in replicas]
    mirror, policy, hasher = PrefixMirror(), make_policy(policy_name), BlockHasher(size, seed)
    oracle = Oracle(per_replica * num_replicas, size, seed)
    step_base, step_token = args.sim_step_ms / 1e3, args.sim_token_us / 1e6

    events: list = []  # (time, order, kind, payload)
    order = 0

    def push(at: float, kind: str, payload) -> None:
        nonlocal order
        heapq.heappush(events, (at, order, kind, payload))
        order += 1

    for conv in workload.conversations:
        push(conv.start_s, "arrive", (conv, 0, list(workload.system_prompts[conv.tenant])))

    info: dict[str, dict] = {}  # request id → its routing and timing
    decision_us: list[float] = []
    ttft, finished_at, output_tokens = [], 0.0, 0
    predicted_hit_tokens = prompt_tokens = 0
    hash_seconds = 0.0
    live_at_arrivals = 0  # live requests over all replicas, summed over the arrivals

    def start_step(replica: SimReplica, now: float) -> None:
        plan = replica.scheduler.schedule()
        if not plan.has_work:
            replica.plan = None
            return
        replica.plan = plan
        replica.num_steps += 1
        push(now + step_base + step_token * plan.total_num_scheduled_tokens, "step", replica)

    began = time.perf_counter()
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            conv, index, history = payload
            turn = conv.turns[index]
            prompt = history + turn.user
            salt = workload.salt(conv.tenant)
            request_id = f"c{conv.cid}t{index}"
            started = time.perf_counter()
            hashes = hasher.prefix_hashes(prompt, salt, (len(prompt) - 1) // size)
            hashed = time.perf_counter()
            decision = policy.choose(loads, hashes, len(prompt), size, mirror)
            chosen = time.perf_counter()
            decision_us.append((chosen - started) * 1e6)
            hash_seconds += hashed - started
            live_at_arrivals += sum(load.live_requests for load in loads)
            replica = by_id[decision.replica_id]
            uncached = len(prompt) - min(decision.cached_blocks * size, len(prompt))
            replica.load.live_requests += 1
            replica.load.queued_prefill_tokens += uncached
            replica.answers[request_id] = turn.output
            replica.num_requests += 1
            predicted_hit_tokens += len(prompt) - uncached
            prompt_tokens += len(prompt)
            info[request_id] = {"conv": conv, "index": index, "prompt": prompt, "arrival": now,
                                "uncached": uncached, "first": None}
            replica.scheduler.add_request(Request(request_id, prompt, SamplingParams(max_tokens=turn.output_len,
                                                                                     ignore_eos=True),
                                                  cache_salt=salt, arrival_time=now))
            oracle.arrive(request_id, prompt, salt)
            if replica.plan is None:
                start_step(replica, now)
        else:  # a replica's step ends
            replica = payload
            plan, replica.plan = replica.plan, None
            scheduler = replica.scheduler
            for request in scheduler.update_from_output(plan, replica.work(plan)):
                entry = info[request.request_id]
                if entry["first"] is None:
                    entry["first"] = now
                    ttft.append(now - entry["arrival"])
                    replica.load.queued_prefill_tokens -= entry["uncached"]
                if len(request.output_token_ids) >= request.sampling_params.max_tokens:
                    scheduler.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
                    replica.load.live_requests -= 1
                    output_tokens += len(request.output_token_ids)
                    finished_at = now
                    del replica.answers[request.request_id]
                    oracle.finish(request.request_id, request.output_token_ids)
                    conv, index = entry["conv"], entry["index"]
                    if index + 1 < len(conv.turns):
                        history = entry["prompt"] + list(request.output_token_ids)
                        push(now + conv.turns[index].think_s, "arrive", (conv, index + 1, history))
                    del info[request.request_id]
            log = replica.log
            if not mirror.apply(replica.replica_id, log.drain(), log.next_seq):
                mirror.resync(replica.replica_id, log.snapshot())
            replica.load.kv_usage = replica.pool.usage
            start_step(replica, now)
    wall = time.perf_counter() - began
    if info:
        raise RuntimeError(f"{len(info)} requests never finished (N={num_replicas}, {policy_name})")

    query = sum(r.kv.num_query_tokens for r in replicas)
    hit = sum(r.kv.num_hit_tokens for r in replicas)
    per_replica_requests = [r.num_requests for r in replicas]
    seconds = sum(decision_us) / 1e6
    oracle_report = oracle.report()
    row = {
        "replicas": num_replicas, "policy": policy_name, "requests": len(decision_us),
        "conversations": len(workload.conversations), "blocks_per_replica": per_replica,
        "prompt_tokens": prompt_tokens, "mean_prompt_tokens": prompt_tokens / max(len(decision_us), 1),
        "decisions_per_s": len(decision_us) / seconds if seconds else None,
        "decision_us_p50": percentile(decision_us, 0.5), "decision_us_p99": percentile(decision_us, 0.99),
        "decision_hash_share": hash_seconds / seconds if seconds else None,
        "hit_rate": hit / query if query else 0.0, "looked_up_tokens": query, "hit_tokens": hit,
        "prefill_tokens": query - hit,
        "predicted_hit_tokens": predicted_hit_tokens,
        "oracle_hit_rate": oracle_report["hit_rate"], "oracle_prefill_tokens": oracle_report["prefill_tokens"],
        "oracle_unplaced_requests": oracle_report["unplaced_requests"],
        "hit_rate_vs_oracle": (hit / query) / oracle_report["hit_rate"] if query and oracle_report["hit_rate"] else None,
        "preemptions": sum(r.scheduler.num_preemptions for r in replicas),
        "evictions": sum(r.pool.num_evictions for r in replicas),
        "requests_per_replica_min_max": [min(per_replica_requests), max(per_replica_requests)],
        "mean_live_requests_per_replica_at_arrival": live_at_arrivals / max(len(decision_us), 1) / num_replicas,
        "sim_seconds": finished_at, "sim_output_tokens_per_s": output_tokens / finished_at if finished_at else None,
        "sim_ttft_s_mean": statistics.fmean(ttft) if ttft else None, "sim_ttft_s_p50": percentile(ttft, 0.5),
        "sim_ttft_s_p90": percentile(ttft, 0.9),
        "steps": sum(r.num_steps for r in replicas), "wall_seconds": wall,
    }
    return row, (replicas, mirror, policy, hasher)


def decision_bench(workload: Workload, state, num_samples: int, prompt_len: int, seed: int, repeats: int) -> dict:
    """Time hash + choose for `num_samples` prompts of exactly `prompt_len` tokens (a tenant's
    system prompt, cut or extended by random tokens) against the replicas' state at the end
    of a run, `repeats` times (hashing all prompts, then choosing for all). Nothing is
    routed: the state stays as it is. `decisions_per_s`: the median repeat's."""
    replicas, mirror, policy, hasher = state
    loads, size = [r.load for r in replicas], workload.block_size
    rng = random.Random(f"decisions/{seed}")
    prompts = []
    for _ in range(num_samples):
        tenant = rng.randrange(len(workload.system_prompts))
        head = workload.system_prompts[tenant][:max(prompt_len - 64, 0)]
        prompts.append((head + [rng.randrange(TOKEN_LOW, TOKEN_HIGH) for _ in range(prompt_len - len(head))],
                        workload.salt(tenant)))
    max_blocks = (prompt_len - 1) // size
    rows = []
    for _ in range(repeats):
        started = time.perf_counter()
        chains = [hasher.prefix_hashes(prompt, salt, max_blocks) for prompt, salt in prompts]
        hashed = time.perf_counter()
        cached = sum(policy.choose(loads, hashes, prompt_len, size, mirror).cached_blocks for hashes in chains)
        chosen = time.perf_counter()
        rows.append({"hash_us": (hashed - started) / num_samples * 1e6, "choose_us": (chosen - hashed) / num_samples * 1e6,
                     "decisions_per_s": num_samples / (chosen - started)})
    rates = [row["decisions_per_s"] for row in rows]
    middle = sorted(rows, key=lambda row: row["decisions_per_s"])[len(rows) // 2]
    return {"decisions": num_samples, "prompt_tokens": prompt_len, "blocks_hashed": max_blocks, "repeats": repeats,
            "decisions_per_s": statistics.median(rates), "decisions_per_s_quickest": max(rates),
            "hash_us_per_decision": middle["hash_us"], "choose_us_per_decision": middle["choose_us"],
            "mean_cached_blocks": cached / num_samples, "runs": rows}
