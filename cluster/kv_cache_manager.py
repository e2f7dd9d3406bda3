"""Per-request block tables on top of the BlockPool."""
from __future__ import annotations

from quire.cluster.block_pool import BlockPool


class KVCacheManager:
    """Maps each request id to its block table: block `i` holds tokens
    `[i*block_size, (i+1)*block_size)` of the request."""

    def __init__(self, pool: BlockPool, block_size: int):
        self.pool, self.block_size = pool, block_size
        self.tables: dict[str, list[int]] = {}

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        """The request's table (the live list: valid until the next allocate/free of it)."""
        return self.tables.get(request_id, [])

    def allocate_slots(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Grow the table so it covers `num_tokens` tokens. Returns the newly added block ids
        (possibly empty), or None, changing nothing, when the pool lacks blocks."""
        table = self.tables.get(request_id, [])
        needed = self.blocks_for(num_tokens) - len(table)
        if needed <= 0:
            return []
        new_blocks = self.pool.allocate(needed)
        if new_blocks is None:
            return None
        self.tables.setdefault(request_id, table).extend(new_blocks)
        return new_blocks

    def free(self, request_id: str) -> None:
        """Release every block of the request (tail first) and forget its table."""
        table = self.tables.pop(request_id, [])
        self.pool.free(reversed(table))

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free_blocks

    def check_integrity(self) -> None:
        self.pool.check_integrity(self.tables.values())
