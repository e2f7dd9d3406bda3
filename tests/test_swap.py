"""Swap preemption's block moves (`KVPool.move_blocks`): a round trip device → CPU → device
preserves every layer's K and V, a swap-in in the same step as the swap-out that wrote its
CPU blocks reads them, and each operation builds its index tensors once, not per layer.
On CUDA (when present) the same, through the pinned CPU pool."""
import pytest
import torch

from quire.worker import kv_pool
from quire.worker.kv_pool import KVCacheSpec, KVPool

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def filled_pool(device: str, num_layers: int = 3, num_blocks: int = 8, num_cpu_blocks: int = 6) -> KVPool:
    spec = KVCacheSpec(num_layers=num_layers, num_kv_heads=2, head_size=8, dtype=torch.float16)
    pool = KVPool(spec, num_blocks=num_blocks, block_size=4, device=torch.device(device), num_cpu_blocks=num_cpu_blocks)
    generator = torch.Generator().manual_seed(0)
    for k_cache, v_cache in pool.caches:
        for cache in (k_cache, v_cache):
            cache.copy_(torch.randn(cache.shape, generator=generator).to(cache.dtype))
    return pool


def blocks(pool: KVPool, ids: list[int]) -> list[torch.Tensor]:
    """Every layer's K and V of `ids`, on the CPU."""
    return [cache[ids].cpu() for pair in pool.caches for cache in pair]


def cpu_blocks(pool: KVPool, ids: list[int]) -> list[torch.Tensor]:
    pool.synchronize()  # the host reads the CPU pool only once the swaps are done
    return [cache[ids].clone() for pair in pool.cpu_caches for cache in pair]


@pytest.mark.parametrize("device", DEVICES)
def test_a_round_trip_preserves_every_layers_blocks(device):
    pool = filled_pool(device)
    out = [(5, 0), (1, 1), (2, 2), (7, 4)]  # runs of consecutive CPU blocks and a gap
    before = blocks(pool, [s for s, _ in out])
    pool.move_blocks(out, [], [])
    assert all(torch.equal(a, b) for a, b in zip(cpu_blocks(pool, [d for _, d in out]), before))
    for k_cache, v_cache in pool.caches:  # the freed device blocks get reused
        k_cache.zero_()
        v_cache.zero_()
    back = [(4, 6), (0, 0), (1, 3), (2, 2)]  # CPU → device, in another order
    pool.move_blocks([], back, [])
    expected = [t[[3, 0, 1, 2]] for t in before]  # CPU blocks 4, 0, 1, 2 held device blocks 7, 5, 1, 2
    assert all(torch.equal(a, b) for a, b in zip(blocks(pool, [6, 0, 3, 2]), expected))
    untouched = blocks(pool, [1, 4, 5, 7])
    assert all(not t.any() for t in untouched), "only the destination blocks are written"


@pytest.mark.parametrize("device", DEVICES)
def test_a_swap_in_reads_what_the_same_steps_swap_out_wrote(device):
    pool = filled_pool(device)
    before = blocks(pool, [3, 4, 0])
    # Out of 3 and 4 into CPU 2 and 3, then in, crossed, from CPU 3 and 2 into 3 and 4 (which
    # the swap-out just read), then a device copy of 0 onto 5: the step's moves in their order.
    pool.move_blocks([(3, 2), (4, 3)], [(3, 3), (2, 4)], [(0, 5)])
    after = blocks(pool, [4, 3, 5])
    assert all(torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("device", DEVICES)
def test_index_tensors_are_built_once_per_operation_not_per_layer(device, monkeypatch):
    built = []
    original = kv_pool.index_tensor
    monkeypatch.setattr(kv_pool, "index_tensor", lambda ids, dev: built.append(list(ids)) or original(ids, dev))
    counts = {}
    for num_layers in (1, 4):
        pool = filled_pool(device, num_layers=num_layers)
        for name, move in [("out", ([(0, 0), (2, 1)], [], [])), ("in", ([], [(1, 3)], [])),
                           ("copy", ([], [], [(4, 5), (6, 7)]))]:
            built.clear()
            pool.move_blocks(*move)
            counts[name, num_layers] = len(built)
    for name in ("out", "in", "copy"):
        assert counts[name, 1] == counts[name, 4] <= 2, counts


def test_runs_of_consecutive_blocks():
    assert kv_pool._runs([0, 1, 2, 5, 6, 3]) == [(0, 0, 3), (3, 5, 2), (5, 3, 1)]
    assert kv_pool._runs([]) == []


def test_the_cpu_pool_is_pinned_only_on_cuda():
    assert not any(t.is_pinned() for pair in filled_pool("cpu").cpu_caches for t in pair)
    assert filled_pool("cpu").swap_done is None  # no event on the CPU
    if torch.cuda.is_available():
        pool = filled_pool("cuda")
        assert all(t.is_pinned() for pair in pool.cpu_caches for t in pair)
