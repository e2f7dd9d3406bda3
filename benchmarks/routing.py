#!/usr/bin/env python
"""Data-parallel routing: what each routing policy saves on a multi-tenant, multi-turn workload.

The workload (seeded, the same for every policy): `--tenants` system prompts of
`--system-len` random tokens, each tenant its own cache salt; conversations start at Poisson
times, each picks a tenant uniformly and runs `--turns MIN:MAX` turns. A turn's prompt is
the conversation so far (system prompt, earlier user turns and the answers the model gave)
plus a new user turn of `--user-len MIN:MAX` tokens; the answer has `--output-len MIN:MAX`
tokens (EOS ignored). The next turn comes an exponential think time (mean `--think-s`)
after the answer ends (closed loop: a turn needs the answer before it).

Two parts, one JSON report (`<out>/routing.json`) and one chart (`<out>/routing.png`):

* **simulated** (no model): the router alone, in front of N simulated replicas, N in
  `--replicas` (1 to 64). Each replica is a real `BlockPool` (publishing KV events), a real
  `KVCacheManager` sharing the deployment's hash seed and a real `Scheduler`; a small
  simulated worker answers each plan with the conversation's predetermined answer tokens.
  Time is simulated: a step lasts `--sim-step-ms` plus `--sim-token-us` per scheduled
  token, replicas step independently, and after every step a replica's drained KV events
  go to the router's `PrefixMirror`. The workload grows with N (`--sim-conversations-per-replica`
  conversations at `--sim-rate-per-replica` conversation starts per second per replica).
  Per arrival the router hashes the prompt's blocks (at most `(len - 1) // block_size`:
  the last prompt token is always computed) and calls the policy's `choose` on the
  replicas' loads (live requests and queued prefill as the router counts them, KV usage as
  last published); that hash + choose is one *decision*, timed. Per N and policy:
  decisions per second, prefix hit rate (hit tokens / prompt tokens looked up, from the
  managers' counters), prefill tokens computed (looked up - hit, recomputation after a
  preemption included), simulated TTFT and balance. The **oracle** is one cache holding
  all KV: one `KVCacheManager` over a pool of all N replicas' blocks together, fed every
  request of the same run at its arrival and its end (prefix hits need no queueing there);
  its hit rate is the best any routing could reach with that total capacity. Pools: the
  oracle's is `--pool-slack` times the workload's working set (every system prompt and
  every conversation's whole history, in blocks), each replica gets 1/N of it. After each
  run, `decision_1k` times `--decision-samples` decisions for prompts of exactly
  `--decision-prompt-len` tokens (a tenant's system prompt and a random tail) against the
  replicas' final state.
* **dp2** (a tiny model, 2 CPU replicas): the real `Router` in front of two in-process
  replicas (each an `Engine` publishing KV events, one hash seed), once per policy with
  fresh replicas, driven in real time by a smaller workload (`--dp-*` flags). Per policy:
  prefix hit rate and prefill tokens computed (the replicas' own counters, a warm-up
  excluded), TTFT (submit to the first delta with tokens; mean, p50, p90), output tokens
  per second over the run's wall time, and the oracle fed the same requests. One run per
  `--dp-pool-slack` (the KV blocks across the replicas, and the oracle's, over the working
  set): the goals are read at the first, 0.6 by default (a cache somewhat smaller than every
  conversation ever held, as in service: round_robin must keep every system prompt on every
  replica and evicts), and 1.1 shows the gap closing when everything fits anywhere (with
  two replicas the oracle itself then computes about half of round_robin's prefill).

Goals checked and printed: cache_aware computes at most half the prefill tokens of
round_robin (dp2) and reaches a hit rate within 5% (relative) of the oracle (dp2, and per N
in the simulation); the router makes >= 5,000 decisions per second for 1k-token prompts at
64 replicas (cache_aware, the policy doing the most work per decision).

Unless `--model` is given, a tiny random Llama (hidden 64, 2 layers, 4 heads, 2 KV heads,
4096 positions, the tiny random model's tokenizer) is built into a temp dir: the
routing does not depend on the weights. Examples:

    python benchmarks/routing.py --out routing-report          # a few minutes on 2 CPU cores
    python benchmarks/routing.py --quick --out routing-quick    # seconds: tiny sizes
    python benchmarks/routing.py --skip-dp --out sim-only       # the simulation alone
"""
from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from quire.cluster.core.block_hash import BlockHasher, new_hash_seed
from quire.cluster.core.block_pool import BlockPool
from quire.cluster.core.config import SchedulerConfig
from quire.cluster.core.kv_cache_manager import KVCacheManager
from quire.cluster.core.kv_events import KVEventLog
from quire.cluster.core.request import Request, RequestStatus
from quire.cluster.core.scheduler import Scheduler
from quire.cluster.serving.prefix_mirror import PrefixMirror
from quire.cluster.serving.routing import POLICIES, ReplicaLoad, make_policy
from quire.protos.step import SamplingParams, StepResult

TOKEN_LOW, TOKEN_HIGH = 3, 2000  # away from the special ids, inside any vocabulary quire's tests build
GOAL_PREFILL_RATIO = 0.5         # cache_aware prefill tokens / round_robin's, at most
GOAL_ORACLE_SHARE = 0.95         # cache_aware hit rate / the oracle's, at least ("within 5%")
GOAL_DECISIONS_PER_S = 5000.0    # at 64 replicas, 1k-token prompts
GOAL_REPLICAS = 64


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


def sim_workload(args, num_replicas: int) -> Workload:
    return make_workload(args.seed, args.tenants, args.system_len, args.sim_conversations_per_replica * num_replicas,
                         args.sim_rate_per_replica * num_replicas, args.turns, args.user_len, args.output_len,
                         args.think_s, args.block_size)


def run_simulated(args, seed: bytes) -> dict:
    runs: dict[str, dict[str, dict]] = {}
    decisions: dict[str, dict[str, dict]] = {}
    for n in args.replicas:
        workload = sim_workload(args, n)
        for name in args.policies:
            row, state = simulate(workload, n, name, args, seed)
            runs.setdefault(str(n), {})[name] = row
            decisions.setdefault(str(n), {})[name] = decision_bench(workload, state, args.decision_samples,
                                                                    args.decision_prompt_len, args.seed,
                                                                    args.decision_repeats)
            print(f"[routing] sim N={n:>2} {name:<13} hit {row['hit_rate']:6.1%} (oracle {row['oracle_hit_rate']:6.1%}) "
                  f"prefill {row['prefill_tokens']:>9,} decisions/s {row['decisions_per_s']:>9,.0f} "
                  f"(1k prompts {decisions[str(n)][name]['decisions_per_s']:>9,.0f}) "
                  f"preempt {row['preemptions']:>4} wall {row['wall_seconds']:5.1f}s", file=sys.stderr, flush=True)
    return {"runs": runs, "decision_1k": decisions}


# -- the real part: DP=2, a tiny model ------------------------------------------------------------
def build_tiny_llama(directory: Path, max_position_embeddings: int = 4096, tokenizer_dir: Path | None = None) -> Path:
    """A random tiny Llama (see `quire.cluster.tools.default_model.build_tiny_llama`)."""
    from quire.cluster.tools.default_model import build_tiny_llama as build

    return build(directory, max_position_embeddings, tokenizer_dir)


def dp_workload(args) -> Workload:
    return make_workload(args.seed + 1, args.tenants, args.system_len, args.dp_conversations, args.dp_rate,
                         args.dp_turns, args.user_len, args.dp_output_len, args.dp_think_s, args.block_size)


async def dp_run(args, model_path: str, policy_name: str, workload: Workload, pool_slack: float) -> dict:
    """The workload through the Router over `--dp-size` fresh in-process replicas, in real time,
    with `pool_slack` times the working set in KV blocks across them."""
    from quire.cluster.core.config import EngineConfig
    from quire.cluster.core.engine import Engine
    from quire.cluster.serving.replica import InprocReplica, ReplicaHost
    from quire.cluster.serving.router import Router, served_model

    seed = new_hash_seed()
    size = workload.block_size
    oracle_blocks = max(math.ceil(pool_slack * workload.working_set_blocks()), 1)
    per_replica = max(math.ceil(oracle_blocks / args.dp_size), 2 * -(-workload.max_len() // size))
    engine_kwargs = dict(model=model_path, dtype="float32", kv_events=True, hash_seed=seed, num_kv_blocks=per_replica,
                         block_size=size, max_model_len=args.dp_max_model_len,
                         max_num_batched_tokens=args.dp_max_num_batched_tokens, max_num_seqs=args.dp_max_num_seqs)
    replicas = [InprocReplica(f"r{i}", ReplicaHost.build(Engine(EngineConfig.from_kwargs(**engine_kwargs))))
                for i in range(args.dp_size)]
    model = served_model(engine_kwargs, per_replica)
    router = Router(replicas, model, seed, policy=policy_name)
    router.start()
    oracle = Oracle(per_replica * args.dp_size, size, bytes.fromhex(seed))
    ttft: list[float] = []
    output_tokens = 0
    try:
        # Warm-up (untimed, not counted): two short requests per replica, unrelated tokens and salts.
        rng = random.Random(f"warm-up/{args.seed}")
        warm = [([rng.randrange(TOKEN_LOW, TOKEN_HIGH) for _ in range(40)], f"warm-{i}") for i in range(2 * args.dp_size)]

        async def one(prompt, salt, request_id, max_tokens):
            async for _ in router.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                                           request_id, cache_salt=salt):
                pass

        await asyncio.gather(*(one(p, s, f"warm-{i}", 4) for i, (p, s) in enumerate(warm)))
        before = [await r.inspect() for r in replicas]

        async def conversation(conv: Conversation, origin: float) -> None:
            nonlocal output_tokens
            await asyncio.sleep(max(0.0, origin + conv.start_s - time.perf_counter()))
            history = list(workload.system_prompts[conv.tenant])
            salt = workload.salt(conv.tenant)
            for index, turn in enumerate(conv.turns):
                prompt = history + turn.user
                request_id = f"c{conv.cid}t{index}"
                params = SamplingParams(max_tokens=turn.output_len, temperature=0, ignore_eos=True)
                oracle.arrive(request_id, prompt, salt)
                submitted, first, tokens = time.perf_counter(), None, []
                async for delta in router.generate(prompt, params, request_id, cache_salt=salt):
                    new = [t for out in delta.outputs for t in out.token_ids]
                    if new and first is None:
                        first = time.perf_counter()
                        ttft.append(first - submitted)
                    tokens.extend(new)
                output_tokens += len(tokens)
                oracle.finish(request_id, tokens)
                history = prompt + tokens
                if index + 1 < len(conv.turns):
                    await asyncio.sleep(turn.think_s)

        origin = time.perf_counter()
        await asyncio.gather(*(conversation(c, origin) for c in workload.conversations))
        wall = time.perf_counter() - origin
        after = [await r.inspect() for r in replicas]
    finally:
        router.shutdown()
        for replica in replicas:
            await replica.shutdown()
    query = sum(a.num_query_tokens - b.num_query_tokens for a, b in zip(after, before))
    hit = sum(a.num_hit_tokens - b.num_hit_tokens for a, b in zip(after, before))
    per_replica_query = [a.num_query_tokens - b.num_query_tokens for a, b in zip(after, before)]
    oracle_report = oracle.report()
    return {
        "policy": policy_name, "requests": workload.num_requests, "blocks_per_replica": per_replica,
        "hit_rate": hit / query if query else 0.0, "looked_up_tokens": query, "hit_tokens": hit,
        "prefill_tokens": query - hit, "looked_up_tokens_per_replica": per_replica_query,
        "oracle_hit_rate": oracle_report["hit_rate"], "oracle_prefill_tokens": oracle_report["prefill_tokens"],
        "hit_rate_vs_oracle": (hit / query) / oracle_report["hit_rate"] if query and oracle_report["hit_rate"] else None,
        "ttft_s_mean": statistics.fmean(ttft) if ttft else None, "ttft_s_p50": percentile(ttft, 0.5),
        "ttft_s_p90": percentile(ttft, 0.9), "output_tokens": output_tokens, "wall_seconds": wall,
        "output_tokens_per_s": output_tokens / wall if wall else None,
        "router_predicted_cached_tokens": getattr(getattr(router, "counters", None), "predicted_cached_tokens", None),
    }


def run_dp(args, model_path: str) -> dict:
    workload = dp_workload(args)
    if workload.max_len() > args.dp_max_model_len:
        raise SystemExit(f"the dp workload's longest conversation has {workload.max_len()} tokens, over "
                         f"--dp-max-model-len {args.dp_max_model_len}")
    by_slack: dict[str, dict] = {}
    for slack in args.dp_pool_slack:
        results = by_slack[str(slack)] = {}
        for name in args.policies:
            results[name] = asyncio.run(dp_run(args, model_path, name, workload, slack))
            row = results[name]
            print(f"[routing] dp{args.dp_size} slack {slack} {name:<13} hit {row['hit_rate']:6.1%} "
                  f"(oracle {row['oracle_hit_rate']:6.1%}) prefill {row['prefill_tokens']:>8,} "
                  f"TTFT p50 {row['ttft_s_p50']:.3f}s {row['output_tokens_per_s']:.1f} tok/s "
                  f"wall {row['wall_seconds']:.1f}s", file=sys.stderr, flush=True)
    results = by_slack[str(args.dp_pool_slack[0])]
    return {"workload": {"conversations": len(workload.conversations), "requests": workload.num_requests,
                         "prompt_tokens": workload.prompt_tokens(),
                         "working_set_blocks": workload.working_set_blocks(), "max_len": workload.max_len(),
                         "note": (f"scaled down for a CPU run: {len(workload.conversations)} conversations of "
                                  f"{args.dp_turns[0]}-{args.dp_turns[1]} turns at {args.dp_rate}/s, answers of "
                                  f"{args.dp_output_len[0]}-{args.dp_output_len[1]} tokens, think {args.dp_think_s} s "
                                  f"(the simulation: {args.sim_conversations_per_replica} conversations per replica "
                                  f"of {args.turns[0]}-{args.turns[1]} turns, answers of {args.output_len[0]}-"
                                  f"{args.output_len[1]} tokens, think {args.think_s} s); same tenants, system "
                                  "prompts and user turn lengths"),
                         "pool_slack": args.dp_pool_slack[0]},
            "results": results, "by_pool_slack": by_slack}


# -- report -----------------------------------------------------------------------------------
def check_goals(report: dict) -> dict:
    goals: dict = {}
    dp = report.get("dp2", {}).get("results", {})
    if "cache_aware" in dp and "round_robin" in dp:
        ratio = dp["cache_aware"]["prefill_tokens"] / max(dp["round_robin"]["prefill_tokens"], 1)
        goals["dp2_prefill_ratio_cache_aware_over_round_robin"] = {
            "value": ratio, "goal": f"<= {GOAL_PREFILL_RATIO}", "met": ratio <= GOAL_PREFILL_RATIO}
    if "cache_aware" in dp:
        share = dp["cache_aware"]["hit_rate_vs_oracle"]
        goals["dp2_cache_aware_hit_rate_vs_oracle"] = {
            "value": share, "goal": f">= {GOAL_ORACLE_SHARE}", "met": share is not None and share >= GOAL_ORACLE_SHARE}
    sim = report.get("simulated", {})
    if sim:
        shares = {n: rows["cache_aware"]["hit_rate_vs_oracle"] for n, rows in sim["runs"].items() if "cache_aware" in rows}
        if shares:
            goals["sim_cache_aware_hit_rate_vs_oracle"] = {
                "value": shares, "goal": f">= {GOAL_ORACLE_SHARE} at every N",
                "met": all(v is not None and v >= GOAL_ORACLE_SHARE for v in shares.values())}
        ratios = {n: rows["cache_aware"]["prefill_tokens"] / max(rows["round_robin"]["prefill_tokens"], 1)
                  for n, rows in sim["runs"].items() if "cache_aware" in rows and "round_robin" in rows and n != "1"}
        if ratios:
            goals["sim_prefill_ratio_cache_aware_over_round_robin"] = {
                "value": ratios, "goal": f"<= {GOAL_PREFILL_RATIO} at every N > 1",
                "met": all(v <= GOAL_PREFILL_RATIO for v in ratios.values())}
        top = sim["decision_1k"].get(str(GOAL_REPLICAS), {}).get("cache_aware")
        if top is not None:
            goals[f"decisions_per_s_1k_prompts_{GOAL_REPLICAS}_replicas"] = {
                "value": top["decisions_per_s"], "goal": f">= {GOAL_DECISIONS_PER_S:.0f} (cache_aware)",
                "met": top["decisions_per_s"] >= GOAL_DECISIONS_PER_S}
        else:
            goals[f"decisions_per_s_1k_prompts_{GOAL_REPLICAS}_replicas"] = {
                "value": None, "goal": f">= {GOAL_DECISIONS_PER_S:.0f}", "met": None,
                "note": f"not measured: {GOAL_REPLICAS} replicas not in --replicas"}
    return goals


def format_summary(report: dict) -> str:
    lines = []
    sim = report.get("simulated")
    if sim:
        lines.append("simulated: hit rate (oracle) | prefill tokens | decisions/s in run | "
                     f"decisions/s {report['config']['decision_prompt_len']}-token prompts (us hash + choose)")
        for n, rows in sim["runs"].items():
            for name, row in rows.items():
                bench = sim["decision_1k"][n][name]
                lines.append(f"  N={n:>2} {name:<13} {row['hit_rate']:6.1%} ({row['oracle_hit_rate']:6.1%}) "
                             f"{row['prefill_tokens']:>10,} {row['decisions_per_s']:>10,.0f} {bench['decisions_per_s']:>10,.0f} "
                             f"({bench['hash_us_per_decision']:.0f} + {bench['choose_us_per_decision']:.0f})")
    dp = report.get("dp2")
    if dp and "results" in dp:
        lines.append("dp2 (tiny model, CPU): hit rate (oracle) | prefill tokens | TTFT mean / p50 / p90 s | output tok/s")
        for name, row in dp["results"].items():
            lines.append(f"  {name:<13} {row['hit_rate']:6.1%} ({row['oracle_hit_rate']:6.1%}) {row['prefill_tokens']:>9,} "
                         f"{row['ttft_s_mean']:.3f} / {row['ttft_s_p50']:.3f} / {row['ttft_s_p90']:.3f} "
                         f"{row['output_tokens_per_s']:8.1f}")
    elif dp:
        lines.append(f"dp2: skipped ({dp.get('skipped')})")
    for name, goal in report["goals"].items():
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[goal["met"]]
        value = goal["value"]
        shown = (", ".join(f"N={k}: {v:.3f}" if v is not None else f"N={k}: -" for k, v in value.items())
                 if isinstance(value, dict) else ("-" if value is None else f"{value:,.3f}"))
        lines.append(f"goal {name} {goal['goal']}: {shown} -> {verdict}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Hit rate vs N per policy with the oracle; decisions/s vs N; DP=2 prefill tokens per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    sim = report.get("simulated")
    colors = {name: f"C{i}" for i, name in enumerate(POLICIES)}
    if sim:
        ns = sorted(int(n) for n in sim["runs"])
        policies = list(sim["runs"][str(ns[0])])
        ax = axes[0]
        for name in policies:
            ax.plot(ns, [sim["runs"][str(n)][name]["hit_rate"] * 100 for n in ns], "o-", label=name, color=colors.get(name))
        anchor = "cache_aware" if "cache_aware" in policies else policies[0]
        ax.plot(ns, [sim["runs"][str(n)][anchor]["oracle_hit_rate"] * 100 for n in ns], "k--",
                label="oracle (one cache, all blocks)")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="replicas (simulated)", ylabel="prefix hit rate (% of prompt tokens)", ylim=(0, 105),
               title="Hit rate vs replicas (equal total KV blocks)")
        ax.legend(fontsize=8)
        ax = axes[1]
        for name in policies:
            ax.plot(ns, [sim["decision_1k"][str(n)][name]["decisions_per_s"] for n in ns], "o-", label=f"{name} (median)",
                    color=colors.get(name))
            ax.plot(ns, [sim["decision_1k"][str(n)][name]["decisions_per_s_quickest"] for n in ns], ":", lw=1,
                    color=colors.get(name))
        ax.axhline(GOAL_DECISIONS_PER_S, color="grey", ls="--", label=f"goal {GOAL_DECISIONS_PER_S:,.0f}/s (dotted: quickest)")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
        ax.set(xlabel="replicas (simulated)", ylabel="decisions per second (hash + choose)",
               title=f"Router decisions, {report['config']['decision_prompt_len']}-token prompts")
        ax.legend(fontsize=8)
        for ax in axes[:2]:
            ax.minorticks_off()
            ax.set_xticks(ns, [str(n) for n in ns])
    else:
        for ax in axes[:2]:
            ax.set_axis_off()
    ax = axes[2]
    dp = report.get("dp2", {}).get("results")
    if dp:
        names = list(dp)
        values = [dp[n]["prefill_tokens"] for n in names] + [dp[names[0]]["oracle_prefill_tokens"]]
        bars = ax.bar(names + ["oracle"], values, color=[colors.get(n, "grey") for n in names] + ["black"])
        ax.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=8)
        ax.bar_label(bars, labels=[f"hit {dp[n]['hit_rate']:.0%}" for n in names]
                     + [f"hit {dp[names[0]]['oracle_hit_rate']:.0%}"], label_type="center", fontsize=8, color="white")
        ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
        ax.set(ylabel="prefill tokens computed", title=f"DP={report['config']['dp_size']}, tiny model: prefill per policy")
    else:
        ax.set_axis_off()
        ax.set_title("DP run skipped")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- entry point ------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="directory for routing.json and routing.png (created)")
    p.add_argument("--model", help="checkpoint for the DP run (default: build a tiny random Llama)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: seconds (the smoke test)")
    p.add_argument("--skip-dp", action="store_true", help="the simulation only")
    p.add_argument("--skip-sim", action="store_true", help="the DP run only")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of " + ",".join(POLICIES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--pool-slack", type=float, default=1.1, help="the oracle's blocks over the working set")
    # The workload (both parts).
    p.add_argument("--tenants", type=int, default=16, help="system prompts (one cache salt each)")
    p.add_argument("--system-len", type=int, default=1000, help="tokens of each system prompt")
    p.add_argument("--turns", type=span, default=(2, 4), help="turns per conversation MIN:MAX (simulation)")
    p.add_argument("--user-len", type=span, default=(32, 128), help="tokens of a user turn MIN:MAX")
    p.add_argument("--output-len", type=span, default=(32, 128), help="tokens of an answer MIN:MAX (simulation)")
    p.add_argument("--think-s", type=float, default=2.0, help="mean pause between an answer and the next turn (simulation)")
    # The simulation.
    p.add_argument("--replicas", default="1,2,4,8,16,32,64", help="comma-separated replica counts to simulate")
    p.add_argument("--sim-conversations-per-replica", type=int, default=16)
    p.add_argument("--sim-rate-per-replica", type=float, default=0.5, help="conversation starts per second per replica")
    p.add_argument("--sim-step-ms", type=float, default=15.0, help="simulated step time: fixed part")
    p.add_argument("--sim-token-us", type=float, default=40.0, help="simulated step time: per scheduled token")
    p.add_argument("--sim-max-num-seqs", type=int, default=64)
    p.add_argument("--sim-max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--decision-samples", type=int, default=2000, help="decisions timed per N and policy")
    p.add_argument("--decision-prompt-len", type=int, default=1024)
    p.add_argument("--decision-repeats", type=int, default=3, help="timed passes over the samples (median reported)")
    # The real DP run.
    p.add_argument("--dp-size", type=int, default=2)
    p.add_argument("--dp-conversations", type=int, default=64)
    p.add_argument("--dp-rate", type=float, default=4.0, help="conversation starts per second")
    p.add_argument("--dp-turns", type=span, default=(2, 4))
    p.add_argument("--dp-output-len", type=span, default=(32, 128))
    p.add_argument("--dp-pool-slack", default="0.6,1.1",
                   help="KV blocks across the replicas (and the oracle's) over the working set, one run per value; "
                        "the goals are checked at the first (a cache a little smaller than every conversation ever "
                        "held, as in service), the others show how the gap closes when everything fits")
    p.add_argument("--dp-think-s", type=float, default=0.2)
    p.add_argument("--dp-max-model-len", type=int, default=2048)
    p.add_argument("--dp-max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--dp-max-num-seqs", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the DP run")
    args = p.parse_args(argv)
    if args.quick:
        args.replicas = "1,2,4"
        args.tenants, args.system_len, args.block_size = 4, 96, 16
        args.user_len, args.output_len, args.turns = (8, 24), (4, 12), (2, 3)
        args.sim_conversations_per_replica, args.decision_samples, args.decision_prompt_len = 6, 100, 128
        args.decision_repeats = 1
        args.dp_conversations, args.dp_rate, args.dp_turns, args.dp_output_len = 8, 50.0, (2, 2), (2, 4)
        args.dp_think_s, args.dp_max_model_len, args.dp_pool_slack = 0.0, 512, "1.1"
    args.replicas = sorted({int(n) for n in str(args.replicas).split(",") if n.strip()})
    args.dp_pool_slack = [float(v) for v in str(args.dp_pool_slack).split(",") if v.strip()]
    if not args.dp_pool_slack or any(v <= 0 for v in args.dp_pool_slack):
        p.error("--dp-pool-slack takes positive numbers")
    args.policies = [name.strip() for name in args.policies.split(",") if name.strip()]
    if unknown := set(args.policies) - set(POLICIES):
        p.error(f"unknown policies: {sorted(unknown)}")
    if any(n < 1 for n in args.replicas):
        p.error("replica counts must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "out"}
    config["argv"] = sys.argv[1:] if argv is None else list(argv)
    report: dict = {"config": config, "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()}}
    seed = bytes.fromhex(new_hash_seed())
    if not args.skip_sim:
        report["simulated"] = run_simulated(args, seed)
        report["simulated"]["step_model"] = (f"{args.sim_step_ms} ms + {args.sim_token_us} us per scheduled token "
                                             "(simulated time)")
    if args.skip_dp:
        report["dp2"] = {"skipped": "--skip-dp"}
    else:
        import torch

        torch.set_num_threads(args.threads)
        try:
            import quire.cluster.serving.router  # noqa: F401
        except ImportError as error:
            report["dp2"] = {"skipped": f"the router is not available: {error}"}
        else:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            with tempfile.TemporaryDirectory(prefix="quire-routing-") as tmp:
                model_path = args.model or str(build_tiny_llama(Path(tmp), max(args.dp_max_model_len, 4096)))
                report["dp2"] = run_dp(args, model_path)
            report["dp2"]["model"] = args.model or ("tiny random Llama built in a temp dir "
                                                     "(hidden 64, 2 layers, 4 heads, 2 KV heads)")
            report["dp2"]["torch_threads"] = torch.get_num_threads()
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["goals"] = check_goals(report)
    report["total_seconds"] = time.perf_counter() - started
    print(format_summary(report))
    print(f"total {report['total_seconds']:.1f}s; load average (1 min) {report['machine']['load_average_at_start'][0]:.1f} "
          f"at start, {report['machine']['load_average_at_end'][0]:.1f} at end on {os.cpu_count()} CPUs "
          "(decision rates are wall-clock timings: compare them on a quiet machine)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "routing.json").write_text(json.dumps(report, indent=1))
        plot(report, out / "routing.png")
    return report


if __name__ == "__main__":
    main()
