"""This rank's shard of the paged KV cache (codes and, for a quantized cache, their scales),
its CPU pool, and the geometry that sizes them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quire.kernels import kv_quant
from quire.worker import huge_pages


@dataclass(frozen=True)
class KVCacheSpec:
    """What one rank's KV cache looks like, as the model states it (`kv_cache_spec()`): one K and
    one V per layer for `num_kv_heads` (this rank's share) heads of `head_size` values. `dtype`
    is the cache tensors' dtype: the model's, or a quantized one (`kv_quant.is_quantized`:
    int8, float8 e4m3) whose codes come with one `kv_quant.SCALE_DTYPE` scale per token and
    KV head."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype

    @property
    def quantized(self) -> bool:
        return kv_quant.is_quantized(self.dtype)

    def bytes_per_block(self, block_size: int) -> int:
        """K and V bytes of one block of `block_size` tokens across all layers on this rank, the
        scales of a quantized cache included (`kv_quant.bytes_per_token_head`)."""
        per_token_head = kv_quant.bytes_per_token_head(self.head_size, self.dtype)
        return 2 * self.num_layers * block_size * self.num_kv_heads * per_token_head


def index_tensor(ids: list[int], device: torch.device) -> torch.Tensor:
    """Block ids as a `long` index on `device`; built once per swap or copy operation and
    shared by every layer. On CUDA it goes up from pinned memory without blocking the host."""
    index = torch.tensor(ids, dtype=torch.long, pin_memory=device.type == "cuda")
    return index.to(device, non_blocking=True)


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """`(position in ids, first id, length)` of each run of consecutive ids: one copy each
    between the device and the CPU pool, whose blocks are contiguous slices."""
    runs: list[tuple[int, int, int]] = []
    for position, block in enumerate(ids):
        if runs and runs[-1][1] + runs[-1][2] == block:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((position, block, 1))
    return runs


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` seen as bytes (its last dimension times its element size). Blocks move as bytes:
    a move is exact whatever the dtype, and float8 tensors on the CPU have no `index_copy_`."""
    return tensor.view(torch.uint8)


class KVPool:
    """One K and one V tensor per layer (`caches`), each `[num_blocks, block_size, kv_heads,
    head_dim]` in the spec's dtype, where `kv_heads` is this rank's share of the KV heads. For a
    quantized spec, `scales` holds per layer a `(k_scale, v_scale)` pair `[num_blocks,
    block_size, kv_heads]` in `kv_quant.SCALE_DTYPE`, indexed like the codes (a slot never
    written has scale 0; a written one at least `kv_quant.MIN_SCALE`); for an unquantized spec
    `scales` is empty. Block ids are the controller's: block `b` of every layer belongs to the
    same request. `num_cpu_blocks` blocks of the same shapes in host memory (pinned on CUDA),
    `cpu_caches` and `cpu_scales` (empty without a CPU pool or, for scales, unquantized), hold
    blocks moved out of the device (swap preemption, the prefix cache's host tier). Every move
    of a block moves its scales with its codes, byte for byte.

    Ordering contract of `move_blocks` on CUDA: every copy is enqueued, without blocking
    the host, on the device's current stream (the one the forward pass runs on), in the
    order swap-out, swap-in, copies. Hence work enqueued after it (the step's forward, a
    later swap) sees its results and may overwrite the device blocks it read, and a swap-in
    reads CPU blocks only after the swap-out that wrote them. The host itself must not read
    or write `cpu_caches` or `cpu_scales` until `synchronize()`; `swap_done`, an event
    recorded after each swap, is what a swap-in waits on (and what work on another stream
    must wait on) before reading the CPU pool. On the CPU every copy is done when
    `move_blocks` returns and there is no event.
    """

    def __init__(self, spec: KVCacheSpec, num_blocks: int, block_size: int, device: torch.device,
                 num_cpu_blocks: int = 0):
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_size)
        self.spec = spec
        self.device = device
        self.num_blocks, self.block_size, self.num_cpu_blocks = num_blocks, block_size, num_cpu_blocks
        layers = range(spec.num_layers)
        scale_layers = layers if spec.quantized else range(0)
        # Pinned (page-locked) on CUDA so that transfers are DMA, asynchronous; pinning needs CUDA.
        pin = device.type == "cuda"

        def pair(shape, dtype, **where):
            return torch.zeros(shape, dtype=dtype, **where), torch.zeros(shape, dtype=dtype, **where)

        def device_pair(shape, dtype):
            # On the CPU the attention kernel reads blocks in place, scattered over the pool:
            # huge pages spare it the TLB misses of 4 KiB ones.
            if device.type == "cpu":
                return huge_pages.zeros(shape, dtype), huge_pages.zeros(shape, dtype)
            return pair(shape, dtype, device=device)

        self.caches = [device_pair(shape, spec.dtype) for _ in layers]
        self.scales = [device_pair(shape[:-1], kv_quant.SCALE_DTYPE) for _ in scale_layers]
        cpu_shape = (num_cpu_blocks, *shape[1:])
        with_cpu = num_cpu_blocks > 0
        self.cpu_caches = [pair(cpu_shape, spec.dtype, pin_memory=pin) for _ in (layers if with_cpu else ())]
        self.cpu_scales = [pair(cpu_shape[:-1], kv_quant.SCALE_DTYPE, pin_memory=pin)
                           for _ in (scale_layers if with_cpu else ())]
        # Every device tensor a block lives in, as bytes, and its CPU counterpart at the same index.
        self._device_bytes = [_bytes(t) for group in (self.caches, self.scales) for p in group for t in p]
        self._host_bytes = [_bytes(t) for group in (self.cpu_caches, self.cpu_scales) for p in group for t in p]
        self.swap_done = None  # torch.cuda.Event of the last swap on CUDA; None on the CPU or before any swap

    def _record_swap(self) -> None:
        if self.device.type == "cuda":
            self.swap_done = torch.cuda.Event()
            self.swap_done.record(torch.cuda.current_stream(self.device))

    def synchronize(self) -> None:
        """Block the host until the swaps enqueued so far are done: then the CPU pool may be read."""
        if self.swap_done is not None:
            self.swap_done.synchronize()

    def _swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Device blocks → CPU blocks: each tensor gathered on the device (one index for all),
        then copied into the pinned CPU pool, one asynchronous copy per run of consecutive CPU
        blocks (a host-side scatter would have to wait for the copy)."""
        src = index_tensor([s for s, _ in pairs], self.device)
        dst = [d for _, d in pairs]
        on_cpu = self.device.type == "cpu"
        dst_index, runs = (index_tensor(dst, self.device), None) if on_cpu else (None, _runs(dst))
        for cache, host in zip(self._device_bytes, self._host_bytes):
            gathered = cache.index_select(0, src)
            if on_cpu:
                host.index_copy_(0, dst_index, gathered)
                continue
            for position, block, length in runs:
                host[block:block + length].copy_(gathered[position:position + length], non_blocking=True)
        self._record_swap()

    def _swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """CPU blocks → device blocks: one asynchronous copy per run of consecutive CPU blocks
        into a device staging tensor, then one scatter per tensor (one index for all)."""
        if self.swap_done is not None:  # the CPU blocks may have been written by a swap-out still in flight
            torch.cuda.current_stream(self.device).wait_event(self.swap_done)
        src = [s for s, _ in pairs]
        dst = index_tensor([d for _, d in pairs], self.device)
        on_cpu = self.device.type == "cpu"
        src_index, runs = (index_tensor(src, self.device), None) if on_cpu else (None, _runs(src))
        for cache, host in zip(self._device_bytes, self._host_bytes):
            if on_cpu:
                cache.index_copy_(0, dst, host.index_select(0, src_index))
                continue
            staged = torch.empty((len(pairs), *cache.shape[1:]), dtype=cache.dtype, device=cache.device)
            for position, block, length in runs:
                staged[position:position + length].copy_(host[block:block + length], non_blocking=True)
            cache.index_copy_(0, dst, staged)
        self._record_swap()

    def _copy(self, pairs: list[tuple[int, int]]) -> None:
        """Device block → device block (copy-on-write), codes and scales of every layer; one pair
        of indices for all."""
        src = index_tensor([s for s, _ in pairs], self.device)
        dst = index_tensor([d for _, d in pairs], self.device)
        for cache in self._device_bytes:
            cache.index_copy_(0, dst, cache.index_select(0, src))

    def move_blocks(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]],
                    copies: list[tuple[int, int]]) -> None:
        """Device → CPU, then CPU → device, then device → device, every layer: in this order,
        because a block swapped out (or in) may be reused by a later move of the same step.
        Pairs are `(source block, destination block)`. See the class for the ordering on CUDA."""
        if (swap_out or swap_in) and not self.cpu_caches:
            raise ValueError("the plan swaps blocks but this rank has no CPU pool (swap_space_bytes = 0)")
        if swap_out:
            self._swap_out(swap_out)
        if swap_in:
            self._swap_in(swap_in)
        if copies:
            self._copy(copies)

    def check_integrity(self) -> None:
        """Raise AssertionError unless codes, scales and the CPU pool agree with the spec's geometry
        and dtypes (scales present exactly for a quantized spec) and every scale, on the device
        and in the CPU pool, is finite and either 0 (never written) or at least `kv_quant.MIN_SCALE`.
        Waits for swaps in flight; reads every scale (a device sync on CUDA): for tests and debugging."""
        self.synchronize()
        spec = self.spec
        shape = (self.num_blocks, self.block_size, spec.num_kv_heads, spec.head_size)
        cpu_shape = (self.num_cpu_blocks, *shape[1:])
        layers = spec.num_layers
        groups = [("caches", self.caches, shape, spec.dtype, self.device, layers),
                  ("scales", self.scales, shape[:-1], kv_quant.SCALE_DTYPE, self.device,
                   layers if spec.quantized else 0),
                  ("cpu_caches", self.cpu_caches, cpu_shape, spec.dtype, torch.device("cpu"),
                   layers if self.num_cpu_blocks else 0),
                  ("cpu_scales", self.cpu_scales, cpu_shape[:-1], kv_quant.SCALE_DTYPE, torch.device("cpu"),
                   layers if spec.quantized and self.num_cpu_blocks else 0)]
        for name, group, want_shape, want_dtype, device, count in groups:
            if len(group) != count:
                raise AssertionError(f"KVPool.{name} has {len(group)} layers, expected {count}")
            for layer, pair in enumerate(group):
                for which, tensor in zip("kv", pair):
                    where = f"KVPool.{name}[{layer}] ({which})"
                    if tuple(tensor.shape) != want_shape or tensor.dtype != want_dtype:
                        raise AssertionError(f"{where} is {tuple(tensor.shape)} {tensor.dtype}, expected "
                                             f"{want_shape} {want_dtype}")
                    if tensor.device.type != device.type:
                        raise AssertionError(f"{where} is on {tensor.device}, expected {device.type}")
                    if name.endswith("scales"):
                        scale = tensor.float()
                        bad = ~torch.isfinite(scale) | (scale < 0) | ((scale > 0) & (scale < kv_quant.MIN_SCALE))
                        if bool(bad.any()):
                            raise AssertionError(f"{where} holds {int(bad.sum())} scales that are not finite, "
                                                 f"negative, or between 0 and MIN_SCALE")
