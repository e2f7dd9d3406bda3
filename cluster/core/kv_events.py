"""KV events: a replica's prefix cache as a stream of changes, for a router that mirrors the
caches of every data-parallel replica exactly.

A BlockPool built with a `KVEventLog` publishes one event per change of its hash map
(content hash → block): `BlockStored` when a hash enters it, `BlockRemoved` when one leaves
it (its block reused for other content), `CacheCleared` when the whole cache is dropped (the
workers were replaced). Nothing else publishes: sharing, freeing or reviving a cached block
changes no hash, so the set of hashes a consumer rebuilds from the stream is exactly the
pool's `cached` keys, free cached blocks included (they can still be hit).

A replica with a host-memory tier has two pools, the device's and the host's, publishing
into one log: every stored or removed event names its `medium` ("device" or "host"), and
the log keeps one view per medium. A hash may be held by both at once (a block brought back
from the host keeps its host copy), so the two views are independent sets.

Each log numbers its events 0, 1, 2, ... (`seq`, per replica, with no gaps), so a consumer
can tell a lost event (a gap) or a restarted stream (the number going back) and then
resynchronise from `snapshot()`. Without a log (the default) a pool publishes nothing and
pays one `is None` test per hash map change.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

DEVICE, HOST = "device", "host"
MEDIA = (DEVICE, HOST)


@dataclass(frozen=True, slots=True)
class BlockStored:
    """`block_hash` entered the replica's cache, held by `block_id`. `parent_hash` is the hash
    of the block before it in the prefix (None for a prompt's first block): the hash chains
    it, so the router can rebuild the prefix tree. Hashes are the pool's own values.
    `medium`: the tier whose pool holds it, DEVICE or HOST (`block_id` is that pool's)."""
    seq: int
    block_hash: Hashable
    parent_hash: Hashable | None
    block_id: int
    medium: str = DEVICE


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """`block_hash` left the `medium` tier of the replica's cache: `block_id` was reused for other content."""
    seq: int
    block_hash: Hashable
    block_id: int
    medium: str = DEVICE


@dataclass(frozen=True, slots=True)
class CacheCleared:
    """Every hash left the replica's cache, both tiers, at once (its pools were replaced)."""
    seq: int


KVEvent = BlockStored | BlockRemoved | CacheCleared


@dataclass(frozen=True, slots=True)
class KVSnapshot:
    """A replica's whole cache: `blocks` maps each hash cached on the device to its parent
    hash (None for a first block), `host_blocks` those of the host tier; it reflects every
    event numbered below `next_seq` and none after."""
    next_seq: int
    blocks: dict
    host_blocks: dict = field(default_factory=dict)


class KVEventLog:
    """The ordered, bounded buffer of one pool's events, for one consumer.

    Publishing is O(1): the event is appended to a deque and the log's own view of the
    cache (hash → parent, what `snapshot` returns) is updated. When more than `capacity`
    events wait undrained, the oldest are dropped (counted in `num_dropped`); the consumer
    then sees a gap in `seq` and resynchronises. Attach a log when the pool is built (an
    empty pool), so the log's view starts equal to the pool's cache.
    """

    def __init__(self, capacity: int = 1 << 16):
        if capacity < 1:
            raise ValueError(f"a KV event log needs room for at least one event (got {capacity})")
        self._pending: deque[KVEvent] = deque(maxlen=capacity)
        # Per medium, cached hash → parent hash: the state the events so far describe.
        self._media: dict[str, dict] = {medium: {} for medium in MEDIA}
        self._next_seq = 0
        self.num_dropped = 0

    @property
    def next_seq(self) -> int:
        """The number the next event will get: every event below it was published. Pass it
        with a drained batch so the consumer sees a loss at the tail of the stream too."""
        return self._next_seq

    def cached_hashes(self, medium: str = DEVICE):
        """The hashes the events published so far leave cached in `medium` (a live view: valid
        until the next event). A pool's integrity check compares it with its hash map."""
        return self._media[medium].keys()

    def _publish(self, event: KVEvent) -> None:
        if len(self._pending) == self._pending.maxlen:
            self.num_dropped += 1  # the deque drops the oldest: the consumer will see the gap
        self._pending.append(event)
        self._next_seq += 1

    def stored(self, block_hash, parent_hash, block_id: int, medium: str = DEVICE) -> None:
        """Publish that `block_hash` (child of `parent_hash`) entered `medium`'s cache in `block_id`."""
        self._media[medium][block_hash] = parent_hash
        self._publish(BlockStored(self._next_seq, block_hash, parent_hash, block_id, medium))

    def removed(self, block_hash, block_id: int, medium: str = DEVICE) -> None:
        """Publish that `block_hash` left `medium`'s cache (`block_id` is reused)."""
        del self._media[medium][block_hash]
        self._publish(BlockRemoved(self._next_seq, block_hash, block_id, medium))

    def cleared(self) -> None:
        """Publish that the whole cache, every medium, was dropped."""
        for blocks in self._media.values():
            blocks.clear()
        self._publish(CacheCleared(self._next_seq))

    def drain(self) -> list[KVEvent]:
        """The events published since the last drain (or snapshot), oldest first, less any
        dropped for lack of room; empties the buffer."""
        events = list(self._pending)
        self._pending.clear()
        return events

    def snapshot(self) -> KVSnapshot:
        """The whole cache as the events so far describe it (a copy, O(cached blocks)), for a
        consumer to resynchronise. Discards the undrained events: the snapshot already
        reflects them, so the next drain starts at its `next_seq`."""
        self._pending.clear()
        return KVSnapshot(self._next_seq, dict(self._media[DEVICE]), dict(self._media[HOST]))
