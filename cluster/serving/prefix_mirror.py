"""The router's mirror of every data-parallel replica's prefix cache, rebuilt from the
replicas' KV event streams (see `quire.cluster.core.kv_events`).

Exact while in sync: a replica's set here is the set of hashes in its pool's hash map as of
the last event applied. The mirror checks every event's sequence number against the one it
expects; a gap (events lost, or dropped by a full log) or a number going back (the replica's
stream restarted) marks the replica stale, and its events are then ignored until
`resync` with a fresh snapshot. A stale replica keeps its last known set (mostly right, no
longer exact): `is_exact` tells which replicas a router can trust fully.

A replica with a host-memory tier publishes its host pool's hashes as the host medium: the
mirror keeps them apart (a hash may be in both), so a router knows which tier would serve a
hit, and scores a host hit (a copy back to the device) below a device hit.

Replicas share one hash seed (the router computes a prompt's block hashes the same way), so
equal hashes on two replicas are the same prefix; different cache salts give different
first-block hashes, hence disjoint chains.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

from quire.cluster.core.kv_events import DEVICE, HOST, BlockRemoved, BlockStored, CacheCleared, KVEvent, KVSnapshot


_NONE: frozenset = frozenset()


class PrefixMirror:
    """Per tier (device, host), for every block hash, the replicas holding it, and per replica,
    its hashes (with their parents); per replica, the next sequence number expected from it,
    and whether it is stale."""

    def __init__(self):
        # Per medium: block hash → replica ids holding it; replica id → {block hash: parent hash}.
        self._holders_by: dict[str, dict[Hashable, set[Hashable]]] = {DEVICE: {}, HOST: {}}
        self._blocks_by: dict[str, dict[Hashable, dict]] = {DEVICE: {}, HOST: {}}
        self._holders, self._blocks = self._holders_by[DEVICE], self._blocks_by[DEVICE]
        self._host_holders = self._holders_by[HOST]
        self._next_seq: dict[Hashable, int] = {}  # replica id → seq of the next event expected
        self._stale: set[Hashable] = set()

    @property
    def replicas(self) -> list[Hashable]:
        return list(self._blocks)

    def is_exact(self, replica_id: Hashable) -> bool:
        """Whether the replica is known and in sync (no gap or restart seen since its last resync)."""
        return replica_id in self._blocks and replica_id not in self._stale

    def apply(self, replica_id: Hashable, events: Iterable[KVEvent], next_seq: int | None = None) -> bool:
        """Apply a replica's drained events in order (a new replica starts empty, expecting
        seq 0). With `next_seq` (the log's `next_seq` when drained) a loss at the tail of
        the stream is caught too. Returns True when the replica is in sync afterwards; False
        when it is, or becomes, stale: the events from the first out-of-sequence one on are
        ignored (those before it are applied) and the caller must `resync` it."""
        for by_replica in self._blocks_by.values():
            by_replica.setdefault(replica_id, {})
        expected = self._next_seq.setdefault(replica_id, 0)
        if replica_id in self._stale:
            return False
        for event in events:
            if event.seq != expected or not self._apply_one(replica_id, event):
                self._stale.add(replica_id)
                self._next_seq[replica_id] = expected
                return False
            expected += 1
        self._next_seq[replica_id] = expected
        if next_seq is not None and next_seq != expected:
            self._stale.add(replica_id)
            return False
        return True

    def _apply_one(self, replica_id: Hashable, event: KVEvent) -> bool:
        """Apply one in-sequence event; False (changing nothing) when it contradicts the mirror."""
        if isinstance(event, BlockStored):
            blocks = self._blocks_by[event.medium][replica_id]
            if event.block_hash in blocks:
                return False
            blocks[event.block_hash] = event.parent_hash
            self._holders_by[event.medium].setdefault(event.block_hash, set()).add(replica_id)
        elif isinstance(event, BlockRemoved):
            blocks = self._blocks_by[event.medium][replica_id]
            if event.block_hash not in blocks:
                return False
            del blocks[event.block_hash]
            self._drop_holder(self._holders_by[event.medium], event.block_hash, replica_id)
        elif isinstance(event, CacheCleared):
            self._forget_blocks(replica_id)
        else:
            raise TypeError(f"not a KV event: {event!r}")
        return True

    def resync(self, replica_id: Hashable, snapshot: KVSnapshot) -> None:
        """Replace the replica's set by the snapshot's; it is in sync again, expecting the
        snapshot's `next_seq` next."""
        self._forget_blocks(replica_id)
        for medium, blocks in ((DEVICE, snapshot.blocks), (HOST, snapshot.host_blocks)):
            self._blocks_by[medium][replica_id] = dict(blocks)
            holders = self._holders_by[medium]
            for block_hash in blocks:
                holders.setdefault(block_hash, set()).add(replica_id)
        self._next_seq[replica_id] = snapshot.next_seq
        self._stale.discard(replica_id)

    def remove_replica(self, replica_id: Hashable) -> None:
        """Forget the replica entirely (it left the pool of replicas)."""
        self._forget_blocks(replica_id)
        for by_replica in self._blocks_by.values():
            by_replica.pop(replica_id, None)
        self._next_seq.pop(replica_id, None)
        self._stale.discard(replica_id)

    def _forget_blocks(self, replica_id: Hashable) -> None:
        """Empty the replica's sets, both tiers, in place."""
        for medium, by_replica in self._blocks_by.items():
            blocks = by_replica.get(replica_id)
            if blocks:
                for block_hash in blocks:
                    self._drop_holder(self._holders_by[medium], block_hash, replica_id)
                blocks.clear()

    @staticmethod
    def _drop_holder(holders_of: dict, block_hash: Hashable, replica_id: Hashable) -> None:
        holders = holders_of[block_hash]
        holders.discard(replica_id)
        if not holders:
            del holders_of[block_hash]  # keeps the map as small as the union of the caches

    def cached_hashes(self, replica_id: Hashable, medium: str = DEVICE) -> set:
        """The replica's hashes in `medium` (a copy)."""
        return set(self._blocks_by[medium].get(replica_id, ()))

    def replicas_holding(self, block_hash: Hashable) -> frozenset:
        return frozenset(self._holders.get(block_hash, ()))

    def holders_view(self, block_hash: Hashable) -> set | frozenset:
        """The replicas holding `block_hash` on the device, without a copy: read it before the
        mirror next changes, never modify it (the router's hot path)."""
        return self._holders.get(block_hash, _NONE)

    def host_holders_view(self, block_hash: Hashable) -> set | frozenset:
        """As `holders_view`, for the host tier."""
        return self._host_holders.get(block_hash, _NONE)

    @property
    def has_host_blocks(self) -> bool:
        """Whether any replica's host tier holds anything (else routing skips looking there)."""
        return bool(self._host_holders)

    def cached_prefix_blocks(self, replica_id: Hashable, block_hashes: Sequence[Hashable]) -> int:
        """How many leading hashes of a prompt's chained block hashes the replica holds, in
        either tier: the blocks a prefix hit there would skip computing (the chain makes any
        later hash useless once one is missing)."""
        return self.cached_prefix_tiers(replica_id, block_hashes)[0]

    def cached_prefix_tiers(self, replica_id: Hashable, block_hashes: Sequence[Hashable]) -> tuple[int, int]:
        """(leading blocks the replica holds in either tier, how many of those only its host
        tier holds): the replica's engine looks on the device first, block by block."""
        device = self._blocks.get(replica_id, {})
        host = self._blocks_by[HOST].get(replica_id, {})
        count = host_count = 0
        for block_hash in block_hashes:
            if block_hash not in device:
                if block_hash not in host:
                    break
                host_count += 1
            count += 1
        return count, host_count
