"""All physical KV blocks of the cluster (every rank holds the same block ids)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


class BlockPool:
    """Owns the free queue and the reference counts of blocks `0 .. num_blocks-1`.

    The free queue is an insertion-ordered dict: allocation pops from its head in O(1),
    and a block can be taken out of the middle in O(1) (for prefix-cache revival).
    Freed blocks join the tail, so the least recently freed is reused first.
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block (got {num_blocks})")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: dict[int, None] = dict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of blocks in use, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, count: int) -> list[int] | None:
        """Take `count` blocks with ref count 1, or return None (taking nothing) if too few are free."""
        if count > len(self._free):
            return None
        blocks = []
        for _ in range(count):
            block = next(iter(self._free))
            del self._free[block]
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """Add a reference to each (in-use) block."""
        for block in blocks:
            if self.ref_counts[block] < 1:
                raise ValueError(f"block {block} is free and cannot be shared")
            self.ref_counts[block] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; a block whose count reaches zero joins the free queue.
        Pass a table tail-first so its tail blocks are reused before its head."""
        for block in blocks:
            if self.ref_counts[block] < 1:
                raise ValueError(f"block {block} freed more often than allocated")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None

    def check_integrity(self, tables: Iterable[list[int]] | None = None) -> None:
        """Assert the pool's invariants; with `tables`, also that ref counts match them exactly."""
        in_use = [b for b in range(self.num_blocks) if self.ref_counts[b] > 0]
        assert len(in_use) + len(self._free) == self.num_blocks, "free + in use != total"
        assert all(self.ref_counts[b] == 0 for b in self._free), "a free block has references"
        assert all(c >= 0 for c in self.ref_counts), "negative ref count"
        if tables is not None:
            counts = Counter(b for table in tables for b in table)
            mismatched = {b: (self.ref_counts[b], counts.get(b, 0)) for b in range(self.num_blocks)
                          if self.ref_counts[b] != counts.get(b, 0)}
            assert not mismatched, f"ref counts disagree with block tables (block: (count, tables)): {mismatched}"
