"""Counting the points where a step's host and device meet.

On an accelerator every blocking read of device data (`.tolist()`, `.item()`, `.cpu()`,
a `bool` of a device tensor) waits for all queued work, and every copy from pageable host
memory waits too; a step should have exactly one copy in (its staged inputs) and one read
out (its sampled tokens). The runner and the sampler count theirs here so that tests and
benchmarks can assert the number per step.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass

import torch


@dataclass
class HostSyncCounter:
    """Running totals of one component's host↔device crossings (never reset; compare snapshots).

    h2d_copies: host-to-device copies (non-blocking from pinned memory on CUDA);
    d2h_readbacks: blocking device-to-host reads; blocking_waits: other waits for the device
    (a stream synchronize, a wait for a staging buffer still being copied)."""

    h2d_copies: int = 0
    d2h_readbacks: int = 0
    blocking_waits: int = 0

    def snapshot(self) -> tuple[int, int, int]:
        return astuple(self)

    def read_back(self, tensor: torch.Tensor) -> list:
        """`tensor.tolist()`, counted: the one sanctioned way to read device data on the host."""
        self.d2h_readbacks += 1
        return tensor.tolist()
