"""Per-request block tables on top of the BlockPool: prefix caching (device and host tiers),
forks with copy-on-write, and swapping to a host block pool."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from quire.cluster.core.block_hash import ROOT_HASH, BlockHasher
from quire.cluster.core.block_pool import BlockPool
from quire.cluster.core.kv_events import HOST

Transfer = tuple[int, int]  # (source block, destination block) of a copy between the tiers


@dataclass(frozen=True)
class PrefixHit:
    """The longest cached prefix of a request's tokens (`KVCacheManager.get_computed_blocks`):
    `blocks[i]` holds the request's block i: a device block id, except at `host_positions`,
    where it is a host-tier block id whose content `allocate_slots` copies back. Valid until
    either pool next changes."""

    blocks: list[int]
    num_tokens: int
    host_positions: tuple[int, ...] = ()
    num_host_tokens: int = 0


NO_HIT = PrefixHit([], 0)


class KVCacheManager:
    """Maps each request id to its block table: block `i` holds tokens
    `[i*block_size, (i+1)*block_size)` of the request.

    Prefix caching: full blocks are keyed by `BlockHasher`'s chained hashes (the request's
    cache salt in the first, a secret seed: per manager, or `hash_seed` shared by the
    replicas of one deployment), so only equal salts share prefixes. Full blocks are registered in the
    pool as soon as they are scheduled: each layer writes every token's K/V before any
    attention reads, so even a request scheduled later in the same step may share them.

    Host tier (`host_tier`, with a `cpu_pool`): the host pool is one allocator for two uses,
    swapped-out requests' tables and the prefix cache's second tier. A cached block evicted
    from the device pool has its content copied to a host block (evicting the host's least
    recently used cached block when none is free; skipped when every host block is held),
    registered under the same hash; a lookup that misses on the device continues on the host,
    and `allocate_slots` copies those blocks back into fresh device blocks (the host copy
    stays cached). So the two pools hold one LRU order: device first, then host.

    Steps: the copies are gathered while a step is planned and handed to the plan by
    `end_step` (device → host with the swap-outs, host → device with the swap-ins; the
    workers run every swap-out before any swap-in, both before the forward pass). Host blocks
    a step reads or writes (a hit's source, an offload's destination, a swapped-in request's
    old table) stay held until `end_step`, so no block is written twice or overwritten
    before it is read within one step.

    Contracts: methods that return None on failure change nothing; tables, CPU tables and
    the pools' ref counts always agree (`check_integrity`).
    """

    def __init__(self, pool: BlockPool, block_size: int, enable_prefix_caching: bool = True,
                 cpu_pool: BlockPool | None = None, hash_seed: bytes | None = None, host_tier: bool = False):
        if host_tier and cpu_pool is None:
            raise ValueError("a host tier needs a host block pool (kv_host_memory > 0)")
        self.pool, self.block_size, self.cpu_pool = pool, block_size, cpu_pool
        self.enable_prefix_caching = enable_prefix_caching
        self.host_tier = host_tier and enable_prefix_caching
        if self.host_tier:
            self._adopt_host_pool()
        self.tables: dict[str, list[int]] = {}
        self.cpu_tables: dict[str, list[int]] = {}  # swapped-out requests' blocks in cpu_pool
        self._hashes: dict[str, list[bytes]] = {}   # full-block hashes per request, as far as computed
        self._num_registered: dict[str, int] = {}   # leading blocks of the table registered in the pool
        self._held_host: list[int] = []             # host blocks this step reads or writes (see the class)
        self._offloads: list[Transfer] = []         # (device, host) copies planned this step
        self._loads: list[Transfer] = []            # (host, device) copies planned this step
        self.hasher = BlockHasher(block_size, hash_seed)
        self.num_query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0    # of which found cached (either tier)
        self.num_host_hit_tokens = 0  # of which found on the host tier
        self.num_offloaded_blocks = 0  # device blocks copied to the host tier
        self.num_loaded_blocks = 0     # host-tier blocks copied back to the device

    def _adopt_host_pool(self) -> None:
        """The device pool records its evictions (to offload them); the host pool publishes
        into the device pool's event log, as the host medium. Both pools must be empty."""
        self.pool.evictions = []
        self.cpu_pool.medium = HOST
        self.cpu_pool.events = self.pool.events

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        """The request's table (the live list: valid until the next change of it)."""
        return self.tables.get(request_id, [])

    # -- prefix caching ----------------------------------------------------------------------
    def block_hashes(self, request, num_tokens: int) -> list[bytes]:
        """Hashes of the request's full blocks within its first `num_tokens` tokens (cached per request)."""
        hashes = self._hashes.setdefault(request.request_id, [])
        for index in range(len(hashes), num_tokens // self.block_size):
            hashes.append(self._hash_block(request, index, hashes[-1] if hashes else ROOT_HASH))
        return hashes

    def _hash_block(self, request, index: int, parent_hash: bytes) -> bytes:
        size = self.block_size
        return self.hasher.hash_block(parent_hash, request.token_slice(index * size, (index + 1) * size),
                                      request.cache_salt)

    def get_computed_blocks(self, request) -> PrefixHit:
        """The longest prefix of the request's tokens cached in either tier, block by block
        (device first). Never all its tokens: the last one must be computed to sample."""
        if not self.enable_prefix_caching:
            return NO_HIT
        host = None
        if self.host_tier:
            self._offload_evictions()  # what the device evicted so far this step is findable on the host
            host = self.cpu_pool
        blocks, host_positions = [], []
        for index, block_hash in enumerate(self.block_hashes(request, request.num_tokens - 1)):
            block = self.pool.lookup(block_hash)
            if block is None and host is not None:
                block = host.lookup(block_hash)
                if block is not None:
                    host_positions.append(index)
            if block is None:
                break
            blocks.append(block)
        if not blocks:
            return NO_HIT
        return PrefixHit(blocks, len(blocks) * self.block_size, tuple(host_positions),
                         len(host_positions) * self.block_size)

    def record_lookup(self, num_query_tokens: int, hit: PrefixHit | int) -> None:
        """Count a lookup of `num_query_tokens` prompt tokens that found `hit` (a PrefixHit, or a token count)."""
        self.num_query_tokens += num_query_tokens
        if isinstance(hit, PrefixHit):
            self.num_hit_tokens += hit.num_tokens
            self.num_host_hit_tokens += hit.num_host_tokens
        else:
            self.num_hit_tokens += hit

    # -- the host tier -------------------------------------------------------------------------
    def _offload_evictions(self) -> None:
        """Copy each cached block the device pool evicted since the last call to the host tier
        (its hash refreshed there if already held). Needs `host_tier`."""
        evicted = self.pool.evictions
        if not evicted:
            return
        host = self.cpu_pool
        for device_block, block_hash, parent_hash in evicted:
            held = host.lookup(block_hash)
            if held is not None:
                host.refresh(held)
                continue
            host_block = host.allocate_one()
            if host_block is None:
                continue  # every host block is a swapped-out request's or held this step: the content is lost
            host.cache(host_block, block_hash, parent_hash)
            self._held_host.append(host_block)
            self._offloads.append((device_block, host_block))
        evicted.clear()

    def end_step(self) -> tuple[list[Transfer], list[Transfer]]:
        """Close the step being planned: its (device, host) offload copies and its (host,
        device) load copies for the plan's swap-outs and swap-ins; releases the host blocks
        held for the step (they may be reused from the next step on)."""
        if self.host_tier:
            self._offload_evictions()
        offloads, loads = self._offloads, self._loads
        self._offloads, self._loads = [], []
        self.num_offloaded_blocks += len(offloads)
        self.num_loaded_blocks += len(loads)
        if self._held_host:
            self.cpu_pool.free(reversed(self._held_host))
            self._held_host = []
        return offloads, loads

    # -- allocation ----------------------------------------------------------------------------
    def allocate_slots(self, request, num_tokens: int, computed_blocks: Sequence[int] | PrefixHit = (),
                       write_from: int | None = None, copies: list[tuple[int, int]] | None = None,
                       keep_free: int = 0) -> list[int] | None:
        """Grow the table so it covers `num_tokens` tokens: first `computed_blocks` (prefix
        hits, for a request without a table: device block ids, or a PrefixHit whose host-tier
        blocks each get a new device block and a load copy for `end_step`), then new blocks. With `write_from`, the blocks
        holding positions `write_from..num_tokens-1` that others share are first replaced by
        fresh copies (copy-on-write; the (source, copy) pairs are appended to `copies` for the
        workers to copy before the step). Registers the full blocks among the first
        `num_tokens` tokens in the prefix cache. Returns the new block ids (possibly empty),
        or None, changing nothing, when the pool lacks blocks or would keep fewer than
        `keep_free` free."""
        request_id = request.request_id
        table = self.tables.get(request_id, [])
        host_hits: dict[int, int] = {}  # position in the table → host block
        if isinstance(computed_blocks, PrefixHit):
            host_hits = {position: computed_blocks.blocks[position] for position in computed_blocks.host_positions}
            computed_blocks = computed_blocks.blocks
        device_hits = [b for i, b in enumerate(computed_blocks) if i not in host_hits] if host_hits else computed_blocks
        needed = max(0, self.blocks_for(num_tokens) - len(table) - len(device_hits))
        revived = sum(1 for block in device_hits if self.pool.ref_counts[block] == 0) if device_hits else 0
        shared = []
        if write_from is not None:
            last = min(self.blocks_for(num_tokens), len(table))
            shared = [i for i in range(write_from // self.block_size, last) if self.pool.ref_counts[table[i]] > 1]
        if needed + revived + len(shared) + keep_free > self.pool.num_free_blocks:
            return None
        for index, copy in zip(shared, self.pool.allocate(len(shared))):
            copies.append((table[index], copy))
            self.pool.free([table[index]])  # still referenced by the others
            table[index] = copy
        if shared:
            self._num_registered[request_id] = min(self._num_registered.get(request_id, 0), shared[0])
        self.pool.touch(device_hits)  # before allocating, which would evict them
        new_blocks = self.pool.allocate(needed) if needed else []
        table = self.tables.setdefault(request_id, table)
        if host_hits:
            self.cpu_pool.touch(host_hits.values())  # held until end_step: read by this step's loads
            self._held_host.extend(host_hits.values())
            fresh = iter(new_blocks)
            for position, block in enumerate(computed_blocks):
                if position in host_hits:
                    block = next(fresh)
                    self._loads.append((host_hits[position], block))
                table.append(block)
            table.extend(fresh)
        else:
            table.extend(computed_blocks)
            table.extend(new_blocks)
        if self.enable_prefix_caching:
            self._register(request, table, num_tokens)
        return new_blocks

    def append_block(self, request) -> int | None:
        """One more block at the end of a running request's table, for the decode token that
        opens it; the block the earlier tokens filled is registered in the prefix cache (once
        its tokens are all known).
        Returns the block id, or None, changing nothing, when no block is free. (The decode
        step's fast path: `allocate_slots` does the same, for any request, at more cost.)"""
        block = self.pool.allocate_one()
        if block is None:
            return None
        request_id = request.request_id
        table = self.tables[request_id]
        table.append(block)
        if self.enable_prefix_caching:
            filled, hashes = len(table) - 2, self._hashes.get(request_id)
            if (hashes and len(hashes) == filled == self._num_registered.get(request_id)
                    and request.num_tokens >= (filled + 1) * self.block_size):
                # `_register`'s work for the one block a decode fills, at a fifth less scheduling
                # cost per step: the blocks before it are registered and hashed, its tokens known.
                hashes.append(self._hash_block(request, filled, hashes[-1]))
                self.pool.cache(table[filled], hashes[filled], hashes[filled - 1])
                self._num_registered[request_id] = filled + 1
            else:
                self._register(request, table, (len(table) - 1) * self.block_size)
        return block

    def cache_computed_blocks(self, request) -> None:
        """Register every full block of the request's computed tokens (those steps in flight
        compute included: they run before any later step reads the blocks) whose tokens are
        all known, before the request frees its table: a block whose last token was still
        being sampled when the next block opened has not been registered yet."""
        table = self.tables.get(request.request_id)
        if table and self.enable_prefix_caching:
            self._register(request, table, request.num_computed_tokens)

    def _register(self, request, table: list[int], num_tokens: int) -> None:
        """Register the table's full blocks within the first `num_tokens` tokens whose tokens
        are all known: a block ending in a token a step in flight still samples waits."""
        request_id = request.request_id
        start = self._num_registered.get(request_id, 0)
        full = min(num_tokens, request.num_tokens, len(table) * self.block_size) // self.block_size
        if full > start:
            hashes = self.block_hashes(request, full * self.block_size)
            for index in range(start, full):
                self.pool.cache(table[index], hashes[index], hashes[index - 1] if index else None)
            self._num_registered[request_id] = full

    def fork(self, request_id: str, source_id: str, num_tokens: int) -> list[int]:
        """Give a request without a table the source's blocks covering `num_tokens` tokens,
        shared (one more reference each). Returns the new table."""
        table = self.tables[source_id][:self.blocks_for(num_tokens)]
        self.pool.touch(table)
        self.tables[request_id] = list(table)
        self._num_registered[request_id] = min(self._num_registered.get(source_id, 0), len(table))
        return self.tables[request_id]

    def free(self, request_id: str, forget: bool = True) -> None:
        """Release every block of the request (tail first), device and CPU, and its tables;
        its hashes too unless `forget` is False (a preempted request that will be back)."""
        self._release_device_table(request_id)
        if self.cpu_pool is not None:
            self.cpu_pool.free(reversed(self.cpu_tables.pop(request_id, [])))
        if forget:
            self._hashes.pop(request_id, None)

    def _release_device_table(self, request_id: str) -> list[int]:
        table = self.tables.pop(request_id, [])
        self.pool.free(reversed(table))
        self._num_registered.pop(request_id, None)
        return table

    # -- swapping ------------------------------------------------------------------------------
    def swap_out(self, request_id: str) -> list[tuple[int, int]] | None:
        """Move the request's blocks to the CPU pool: returns (device block, CPU block) pairs for
        the workers to copy before the step (the device blocks are free from then on), or
        None, changing nothing, when there is no CPU pool or it lacks blocks."""
        table = self.tables.get(request_id, [])
        if self.cpu_pool is None or not table:
            return None
        cpu_blocks = self.cpu_pool.allocate(len(table))
        if cpu_blocks is None:
            return None
        self._release_device_table(request_id)
        self.cpu_tables[request_id] = cpu_blocks
        return list(zip(table, cpu_blocks))

    def swap_in(self, request, num_tokens: int) -> list[tuple[int, int]] | None:
        """Bring a swapped-out request's blocks back, plus new ones to cover `num_tokens`:
        returns (CPU block, device block) pairs for the workers to copy before the step, or
        None, changing nothing, when the device pool lacks blocks."""
        cpu_blocks = self.cpu_tables[request.request_id]
        blocks = self.pool.allocate(max(len(cpu_blocks), self.blocks_for(num_tokens)))
        if blocks is None:
            return None
        self.tables[request.request_id] = blocks
        # Held, not freed, until end_step: a host-tier offload planned later in this step must
        # not overwrite them before the workers read them.
        self._held_host.extend(self.cpu_tables.pop(request.request_id))
        return list(zip(cpu_blocks, blocks))

    def reset(self) -> None:
        """Forget every table, CPU table and cached block (the workers' pools were replaced).
        The pool's event log, if any, moves to the new pool and publishes CacheCleared when
        the old pool cached anything."""
        events = self.pool.events
        had_cached = bool(self.pool.cached) or (self.host_tier and bool(self.cpu_pool.cached))
        self.pool = BlockPool(self.pool.num_blocks, events=events)
        if events is not None and had_cached:
            events.cleared()
        if self.cpu_pool is not None:
            self.cpu_pool = BlockPool(self.cpu_pool.num_blocks)
        if self.host_tier:
            self._adopt_host_pool()
        self._held_host, self._offloads, self._loads = [], [], []
        self.tables.clear()
        self.cpu_tables.clear()
        self._hashes.clear()
        self._num_registered.clear()

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free_blocks

    def check_integrity(self) -> None:
        """Assert both pools' invariants against the tables (host blocks held for the step count
        as one more table), the host tier's planned copies against the holds, and the tiers apart."""
        self.pool.check_integrity(self.tables.values())
        if self.cpu_pool is not None:
            self.cpu_pool.check_integrity([*self.cpu_tables.values(), self._held_host])
            held = set(self._held_host)
            assert len(held) == len(self._held_host), "a host block is held twice in one step"
            assert all(host in held for _, host in self._offloads), "an offload writes a host block not held"
            assert all(host in held for host, _ in self._loads), "a load reads a host block not held"
            assert not held & {b for table in self.cpu_tables.values() for b in table}, \
                "a held host block is also a swapped-out request's"
        else:
            assert not self._held_host and not self._offloads and not self._loads, "host copies without a host pool"
        if not self.host_tier:
            assert not self._offloads and not self._loads, "host-tier copies without a host tier"
            assert self.cpu_pool is None or not self.cpu_pool.cached, "the swap pool caches content without a host tier"
        assert not set(self.tables) & set(self.cpu_tables), "a request holds device and CPU blocks at once"
