"""One host-to-device copy for a step's small inputs.

A step needs a dozen small integer arrays on the device (token ids, positions, slot
lookups, offsets, sampling parameters). Copied one by one from pageable memory, each copy
would wait for the device; packed into one host buffer (pinned on CUDA) and copied once
without blocking, they cost one transfer, and the device side is split into views.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from quire.worker.host_sync import HostSyncCounter


def float_bits(values) -> np.ndarray:
    """Float values as int64 words (their float64 bits), to travel in an int64 staging buffer;
    `device_view.view(torch.float64)` reads them back exactly."""
    return np.asarray(values, dtype=np.float64).view(np.int64)


class StagingBuffer:
    """Sends int64 host arrays to `device` in one copy; one instance per device per component.

    On CUDA the host side is one pinned buffer, reused every call and grown as needed; the
    copy is non-blocking, and an event recorded after it guards the buffer: a call that
    finds the previous copy unfinished waits for it (normally it finished long ago, the step
    having read its results back). Elsewhere each call packs into a fresh host array, so
    the views returned never alias memory a later call rewrites (on the CPU the "copy" is
    that array itself)."""

    def __init__(self, device: torch.device, counter: HostSyncCounter):
        self.device, self.counter = device, counter
        self._pinned = device.type == "cuda"
        self._host: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def stage(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Device int64 views of `arrays` (1-D, any integer dtype), in order, from one copy;
        an empty list of views' worth (all arrays empty) copies nothing."""
        sizes = [int(a.size) for a in arrays]
        total = sum(sizes)
        if total == 0:
            empty = torch.empty(0, dtype=torch.long, device=self.device)
            return [empty] * len(arrays)
        host = self._host_words(total)
        np.concatenate(arrays, out=host.numpy()[:total], casting="unsafe")
        packed = host[:total].to(self.device, non_blocking=self._pinned)
        if self._pinned:
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.counter.h2d_copies += 1
        return list(packed.split(sizes))

    def _host_words(self, total: int) -> torch.Tensor:
        if not self._pinned:
            return torch.from_numpy(np.empty(total, dtype=np.int64))
        if self._copied is not None and not self._copied.query():
            self.counter.blocking_waits += 1
            self._copied.synchronize()
        if self._host is None or self._host.numel() < total:
            size = 1 << max(12, (total - 1).bit_length())
            self._host = torch.empty(size, dtype=torch.long, pin_memory=True)
        return self._host
