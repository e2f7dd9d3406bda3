"""Routing policies: which replica serves a request.

Every policy sees, per live replica, a `ReplicaLoad` (the router's own count of what it sent
there and is not finished, exact at the moment of the decision, plus the replica's last
published KV usage) and, for cache_aware, how many leading blocks of the prompt each replica
holds (from the router's exact `PrefixMirror`).

cache_aware: the replica of least *cost*, in tokens of work the request would wait for:

    cost(r) = (prompt_tokens - cached_tokens(r))        # prefill this request needs there
              + HOST_HIT_COST * host_cached_tokens(r)   # of the cached ones, those to copy back from host memory
              + queued_prefill_tokens(r)                # prefill routed there, not started yet
              + DECODE_TOKEN_COST * live_requests(r)    # each running stream's share of a step
    cost(r) *= KV_PRESSURE_FACTOR  when kv_usage(r) >= KV_PRESSURE_USAGE

among the replicas within the imbalance bound:

    live_requests(r) <= min_r' live_requests(r') + max(BALANCE_ABS, BALANCE_REL * min_r' live_requests(r'))

Why these terms and constants:
- Prefill is what a cache hit saves, and it is counted in the same unit as the queue ahead,
  so a long hit is worth a proportionally long queue: a 1,000-token cached system prompt
  outweighs a few hundred queued prompt tokens elsewhere, a 16-token hit does not.
- HOST_HIT_COST = 0.25: a hit in a replica's host tier is copied back over PCIe (a 70B
  shard's K/V, ~80 KiB a token at ~20 GB/s, is ~4 µs a token against ~250 µs to prefill it),
  so it is far cheaper than computing; the factor is set well above that ratio because the
  copy shares the link with other swaps and the host copy may be evicted before the request
  is admitted. It makes a device hit win over an equal host hit.
- DECODE_TOKEN_COST = 16: a decode step costs about as much as prefilling a few dozen
  tokens on a GPU (both are bound by reading the weights), so each running stream slows a
  new request like ~16 prompt tokens of queue; it makes ties between equally cached
  replicas go to the emptier one.
- KV pressure: above 90% usage a replica preempts soon, so its cost doubles.
- The bound keeps one hot prefix from piling every request onto one replica: once a
  replica runs BALANCE_ABS = 8 (or 50% of the least loaded one's count, whichever is
  more) more streams than the least loaded, it takes no more until the others catch up;
  the prefix is then computed on a second replica too, and both serve it from cache.
- Ties go to the replica with fewer live requests, then by replica order, so decisions
  are deterministic for a given state.

least_loaded: fewest live requests, then least queued prefill, then lowest KV usage.
round_robin: the next live replica in order.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from quire.cluster.serving.prefix_mirror import PrefixMirror

DECODE_TOKEN_COST = 16
HOST_HIT_COST = 0.25
KV_PRESSURE_USAGE = 0.9
KV_PRESSURE_FACTOR = 2.0
BALANCE_ABS = 8
BALANCE_REL = 0.5

POLICIES = ("cache_aware", "least_loaded", "round_robin")


@dataclass
class ReplicaLoad:
    """What a policy knows of a live replica's load (the router keeps it current)."""
    replica_id: Hashable
    live_requests: int = 0          # streams routed here and not finished
    queued_prefill_tokens: int = 0  # uncached prompt tokens routed here whose first token has not come
    kv_usage: float = 0.0           # last published share of KV blocks in use


@dataclass(frozen=True)
class Decision:
    replica_id: Hashable
    cached_blocks: int  # leading prompt blocks the mirror says the replica holds, either tier (the predicted hit)
    host_blocks: int = 0  # of which only its host tier holds


def matched_prefix_blocks(mirror: PrefixMirror, block_hashes: Sequence[Hashable]) -> dict[Hashable, tuple[int, int]]:
    """For every replica holding the prompt's first block (either tier), how many leading
    blocks it holds and how many of those only on its host tier. Walks the chain once,
    intersecting holder sets (C-speed), so the cost grows with the prompt's blocks, not with
    blocks × replicas (and the host tier costs nothing while no replica has one)."""
    counts: dict[Hashable, int] = {}
    host_counts: dict[Hashable, int] = {}
    alive: frozenset | set | None = None
    look_on_host = mirror.has_host_blocks
    for index, block_hash in enumerate(block_hashes):
        holders = mirror.holders_view(block_hash)
        host_only = None
        if look_on_host:
            host_holders = mirror.host_holders_view(block_hash)
            if host_holders:
                host_only = host_holders - holders
                holders = holders | host_only
        now = holders if alive is None else alive & holders
        if alive is not None:
            for replica in alive - now:
                counts[replica] = index
        alive = now
        if not alive:
            break
        if host_only:
            for replica in host_only & alive:
                host_counts[replica] = host_counts.get(replica, 0) + 1
    else:
        for replica in alive or ():
            counts[replica] = len(block_hashes)
    return {replica: (count, host_counts.get(replica, 0)) for replica, count in counts.items()}


class RoutingPolicy(ABC):
    """Chooses a replica among `loads` (non-empty, the live replicas in a stable order)."""

    name = ""

    @abstractmethod
    def choose(self, loads: Sequence[ReplicaLoad], block_hashes: Sequence[Hashable], num_prompt_tokens: int,
               block_size: int, mirror: PrefixMirror) -> Decision:
        """The replica for a request whose prompt has `num_prompt_tokens` tokens and these
        leading full-block hashes; changes nothing but the policy's own state."""


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self):
        self._next = 0

    def choose(self, loads, block_hashes, num_prompt_tokens, block_size, mirror) -> Decision:
        load = loads[self._next % len(loads)]
        self._next += 1
        return Decision(load.replica_id, *mirror.cached_prefix_tiers(load.replica_id, block_hashes))


class LeastLoaded(RoutingPolicy):
    name = "least_loaded"

    def choose(self, loads, block_hashes, num_prompt_tokens, block_size, mirror) -> Decision:
        load = min(loads, key=lambda l: (l.live_requests, l.queued_prefill_tokens, l.kv_usage))
        return Decision(load.replica_id, *mirror.cached_prefix_tiers(load.replica_id, block_hashes))


class CacheAware(RoutingPolicy):
    name = "cache_aware"

    def choose(self, loads, block_hashes, num_prompt_tokens, block_size, mirror) -> Decision:
        least = min(load.live_requests for load in loads)
        bound = least + max(BALANCE_ABS, BALANCE_REL * least)
        matched = matched_prefix_blocks(mirror, block_hashes) if block_hashes else {}
        best, best_key = None, None
        for order, load in enumerate(loads):
            if load.live_requests > bound:
                continue
            cached, host = matched.get(load.replica_id, (0, 0))
            cached_tokens = min(cached * block_size, num_prompt_tokens)
            host_tokens = min(host * block_size, cached_tokens)
            cost = (num_prompt_tokens - cached_tokens + HOST_HIT_COST * host_tokens + load.queued_prefill_tokens
                    + DECODE_TOKEN_COST * load.live_requests)
            if load.kv_usage >= KV_PRESSURE_USAGE:
                cost *= KV_PRESSURE_FACTOR
            key = (cost, load.live_requests, order)
            if best_key is None or key < best_key:
                best, best_key = load, key
        return Decision(best.replica_id, *matched.get(best.replica_id, (0, 0)))


def make_policy(name: str) -> RoutingPolicy:
    policies = {"cache_aware": CacheAware, "least_loaded": LeastLoaded, "round_robin": RoundRobin}
    if name not in policies:
        raise ValueError(f"`routing_policy` must be one of {', '.join(POLICIES)} (got {name!r})")
    return policies[name]()
