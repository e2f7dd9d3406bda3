"""All physical KV blocks of the cluster (every rank holds the same block ids), and the
prefix cache over them."""
from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable

from quire.cluster.core.kv_events import DEVICE, MEDIA, KVEventLog


class BlockPool:
    """Owns the free queue, the reference counts and the prefix cache's hash map of blocks
    `0 .. num_blocks-1`.

    The free queue is an OrderedDict: allocation pops from its head in O(1), and a block
    can be taken out of the middle in O(1) (a prefix hit reviving a cached free block).
    (Not a plain dict: popping a plain dict from the front leaves dead slots that every
    later `next(iter(...))` scans again, which made allocation O(pool size).) Freed blocks join the tail, so the least recently freed is reused first;
    a table is freed tail first, so its tail blocks are evicted before its head.

    A full block's content hash (see `KVCacheManager`) maps to the block holding it. A
    freed block keeps its hash while it waits in the free queue, so a later request with
    the same prefix can revive it; the hash is dropped only when the block is reused.

    With `events` (a log for a router mirroring this replica's cache; None, the default,
    publishes nothing) every change of the hash map is published: `cache` entering a hash
    publishes BlockStored, a reuse evicting one BlockRemoved (see `kv_events`), each naming
    the pool's `medium` ("device", or "host" for the host-memory pool).

    With `record_evictions`, each eviction of the block the hash map names is also appended
    to `evictions` as `(block, hash, parent hash)`, for the owner to move the content to
    another tier before the block is overwritten (`KVCacheManager`'s host tier); the owner
    empties the list.
    """

    def __init__(self, num_blocks: int, events: KVEventLog | None = None, medium: str = DEVICE,
                 record_evictions: bool = False):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block (got {num_blocks})")
        if medium not in MEDIA:
            raise ValueError(f"`medium` must be one of {MEDIA} (got {medium!r})")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.block_parent: list[bytes | None] = [None] * num_blocks  # the parent hash of what each block holds
        self.cached: dict[bytes, int] = {}  # content hash → block id
        self.num_evictions = 0
        self.events, self.medium = events, medium
        self.evictions: list[tuple[int, bytes, bytes | None]] | None = [] if record_evictions else None

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of blocks in use (referenced by a request), in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, count: int) -> list[int] | None:
        """Take `count` blocks with ref count 1, evicting the cached content of any it reuses,
        or return None (taking nothing) if too few are free."""
        if count > len(self._free):
            return None
        return [self.allocate_one() for _ in range(count)]

    def allocate_one(self) -> int | None:
        """Take the block at the head of the free queue (ref count 1, cached content evicted),
        or return None if none is free."""
        if not self._free:
            return None
        block, _ = self._free.popitem(last=False)
        if self.block_hash[block] is not None:
            self._evict(block)
        self.ref_counts[block] = 1
        return block

    def _evict(self, block: int) -> None:
        block_hash = self.block_hash[block]
        self.block_hash[block] = None
        if self.cached.get(block_hash) == block:
            del self.cached[block_hash]
            if self.events is not None:
                self.events.removed(block_hash, block, self.medium)
            if self.evictions is not None:
                self.evictions.append((block, block_hash, self.block_parent[block]))
        self.num_evictions += 1

    def lookup(self, block_hash: bytes) -> int | None:
        """The block holding this content, in use or cached free, or None."""
        return self.cached.get(block_hash)

    def touch(self, blocks: Iterable[int]) -> None:
        """Add a reference to each block, reviving cached free ones out of the free queue."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                if self.block_hash[block] is None:
                    raise ValueError(f"block {block} is free and holds no cached content")
                del self._free[block]
            self.ref_counts[block] += 1

    def refresh(self, block: int) -> None:
        """Make a free block the most recently freed (the last to be reused); no-op for one in use."""
        if self.ref_counts[block] == 0:
            self._free.move_to_end(block)

    def cache(self, block: int, block_hash: bytes, parent_hash: bytes | None = None) -> None:
        """Record that an in-use block holds the content `block_hash`, the block after
        `parent_hash` in its prefix (None for a first block; only the events carry it). A
        no-op, publishing nothing, when another block already holds it (both stay valid, the
        first one is what lookups find) or this block holds a hash already."""
        if self.ref_counts[block] < 1:
            raise ValueError(f"block {block} is free and cannot be cached")
        if self.block_hash[block] is None and block_hash not in self.cached:
            self.block_hash[block] = block_hash
            self.block_parent[block] = parent_hash
            self.cached[block_hash] = block
            if self.events is not None:
                self.events.stored(block_hash, parent_hash, block, self.medium)

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; a block whose count reaches zero joins the free
        queue (keeping its cached content). Pass a table tail-first."""
        for block in blocks:
            if self.ref_counts[block] < 1:
                raise ValueError(f"block {block} freed more often than allocated")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None

    def num_cached_free_blocks(self) -> int:
        return sum(1 for block in self._free if self.block_hash[block] is not None)

    def check_integrity(self, tables: Iterable[list[int]] | None = None) -> None:
        """Assert the pool's invariants; with `tables`, also that ref counts match them exactly."""
        in_use = [b for b in range(self.num_blocks) if self.ref_counts[b] > 0]
        assert len(in_use) + len(self._free) == self.num_blocks, "free + in use != total"
        assert all(self.ref_counts[b] == 0 for b in self._free), "a free block has references"
        assert all(c >= 0 for c in self.ref_counts), "negative ref count"
        assert all(self.block_hash[b] == h for h, b in self.cached.items()), "hash map and block hashes disagree"
        hashed = [b for b in range(self.num_blocks) if self.block_hash[b] is not None]
        assert len(hashed) == len(self.cached), "a block holds a hash the map does not know"
        if self.events is not None:
            assert self.events.cached_hashes(self.medium) == self.cached.keys(), \
                f"the KV events disagree with the {self.medium} hash map"
        if tables is not None:
            counts = Counter(b for table in tables for b in table)
            mismatched = {b: (self.ref_counts[b], counts.get(b, 0)) for b in range(self.num_blocks)
                          if self.ref_counts[b] != counts.get(b, 0)}
            assert not mismatched, f"ref counts disagree with block tables (block: (count, tables)): {mismatched}"
