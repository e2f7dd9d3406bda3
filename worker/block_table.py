"""Every live request's KV block ids, kept on the device across steps and updated by deltas."""
from __future__ import annotations

import numpy as np
import torch


class DeviceBlockTable:
    """One persistent `[rows, width]` int64 device tensor: row r holds the block ids of the
    request that owns it (padding 0). Rebuilding a table from Python lists every step costs
    in proportion to all blocks of all requests; here a step pays only for what its plan
    changes: new rows, appended blocks, replaced tables, rows released.

    Host side, a request `acquire`s a row, its ids are set with `assign`/`extend`, and it
    `release`s the row when it ends (the row is zeroed). Those calls only record deltas;
    `take_deltas` hands them over (flat indices and values, for the step's staging copy)
    and grows the device tensor when rows or columns ran out; `apply_deltas` writes them on
    the device. Flat indices are `row * width` + column with the width after growth, so they
    must be taken after every change of the step and before `lookup`/`gather`.
    """

    def __init__(self, device: torch.device, rows: int = 64, width: int = 16):
        self.device = device
        self.table = torch.zeros((rows, width), dtype=torch.long, device=device)
        self._lengths: list[int] = [0] * rows  # ids written per row (what a release must zero)
        self._free = list(range(rows - 1, -1, -1))  # a stack: low rows first
        self._pending: dict[tuple[int, int], int] = {}  # (row, column) → value; later writes win
        self._needed_width = width

    @property
    def width(self) -> int:
        return self.table.shape[1]

    def acquire(self) -> int:
        """A free row (all zeros) for a new request."""
        if not self._free:
            old = len(self._lengths)
            self._lengths += [0] * old
            self._free = list(range(2 * old - 1, old - 1, -1))
        return self._free.pop()

    def release(self, row: int) -> None:
        """Zero `row` and make it free again."""
        self._write(row, 0, [0] * self._lengths[row])
        self._lengths[row] = 0
        self._free.append(row)

    def assign(self, row: int, block_ids: list[int]) -> None:
        """Replace the row's ids with `block_ids` (a shorter table's old tail is zeroed)."""
        tail = max(0, self._lengths[row] - len(block_ids))
        self._write(row, 0, list(block_ids) + [0] * tail)
        self._lengths[row] = len(block_ids)

    def extend(self, row: int, block_ids: list[int]) -> None:
        """Append `block_ids` to the row's ids."""
        self._write(row, self._lengths[row], block_ids)
        self._lengths[row] += len(block_ids)

    def _write(self, row: int, start: int, values: list[int]) -> None:
        pending = self._pending
        for column, value in enumerate(values, start):
            pending[row, column] = value
        self._needed_width = max(self._needed_width, start + len(values))

    def take_deltas(self) -> tuple[np.ndarray, np.ndarray]:
        """The recorded writes as (flat indices, values), forgotten here; grows the device
        tensor first (a device-side copy) when a row or a column is missing."""
        self._grow(len(self._lengths), self._needed_width)
        pending, self._pending = self._pending, {}
        if not pending:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty
        keys = np.array(list(pending), dtype=np.int64).reshape(-1, 2)
        values = np.fromiter(pending.values(), dtype=np.int64, count=len(pending))
        return keys[:, 0] * self.width + keys[:, 1], values

    def apply_deltas(self, flat_index: torch.Tensor, values: torch.Tensor) -> None:
        """Write the taken deltas (now on the device); indices are distinct."""
        if flat_index.numel():
            self.table.view(-1).index_copy_(0, flat_index, values)

    def lookup(self, flat_index: torch.Tensor) -> torch.Tensor:
        """Block ids at flat positions `row * width + column`."""
        return self.table.view(-1).index_select(0, flat_index)

    def gather(self, rows: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """The `[len(rows), num_blocks]` table of the given rows, in their order (a new tensor)."""
        return self.table[:, :num_blocks].index_select(0, rows)

    def _grow(self, rows: int, width: int) -> None:
        old_rows, old_width = self.table.shape
        if rows <= old_rows and width <= old_width:
            return
        grown = torch.zeros((max(rows, old_rows), max(width, 2 * old_width) if width > old_width else old_width),
                            dtype=torch.long, device=self.device)
        grown[:old_rows, :old_width] = self.table
        self.table = grown
