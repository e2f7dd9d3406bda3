"""A quantized KV pool (int8, float8 e4m3): codes with one scale per token and KV head. Every
move of a block (swap-out, swap-in, copy-on-write) moves its scales with its codes, byte for
byte, and `check_integrity` holds the pool to its geometry and its scales to their range.
On CUDA (when present) the same, through the pinned CPU pool."""
import pytest
import torch

from quire.kernels import kv_quant
from quire.worker.kv_pool import KVCacheSpec, KVPool

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
QUANTIZED = [torch.int8, torch.float8_e4m3fn]


def quantized_pool(device: str, dtype: torch.dtype, num_layers: int = 2, num_blocks: int = 8,
                   num_cpu_blocks: int = 6) -> KVPool:
    """A pool whose every slot holds a quantized random K and V (codes and scales as written)."""
    spec = KVCacheSpec(num_layers=num_layers, num_kv_heads=2, head_size=8, dtype=dtype)
    pool = KVPool(spec, num_blocks=num_blocks, block_size=4, device=torch.device(device),
                  num_cpu_blocks=num_cpu_blocks)
    generator = torch.Generator().manual_seed(0)
    for caches, scales in zip(pool.caches, pool.scales):
        for cache, scale in zip(caches, scales):
            # Rows of very different magnitudes, so that the scales differ from slot to slot.
            values = torch.randn(cache.shape, generator=generator) * torch.rand(cache.shape[:-1] + (1,),
                                                                                  generator=generator) * 100
            codes, scale_values = kv_quant.quantize(values, dtype)
            cache.copy_(codes.to(cache.device))
            scale.copy_(scale_values.to(scale.device))
    return pool


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8).cpu()


def device_blocks(pool: KVPool, ids: list[int]) -> list[torch.Tensor]:
    """Every layer's K and V codes and scales of blocks `ids`, as bytes on the CPU."""
    return [as_bytes(t)[ids] for group in (pool.caches, pool.scales) for pair in group for t in pair]


def cpu_blocks(pool: KVPool, ids: list[int]) -> list[torch.Tensor]:
    pool.synchronize()  # the host reads the CPU pool only once the swaps are done
    return [as_bytes(t)[ids].clone() for group in (pool.cpu_caches, pool.cpu_scales) for pair in group for t in pair]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_a_quantized_pool_holds_scales_beside_its_codes(dtype):
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_size=8, dtype=dtype)
    pool = KVPool(spec, num_blocks=5, block_size=4, device=torch.device("cpu"), num_cpu_blocks=2)
    assert spec.quantized and len(pool.scales) == len(pool.cpu_scales) == 3
    assert all(t.shape == (5, 4, 2, 8) and t.dtype == dtype for pair in pool.caches for t in pair)
    assert all(t.shape == (5, 4, 2) and t.dtype == kv_quant.SCALE_DTYPE for pair in pool.scales for t in pair)
    assert all(t.shape == (2, 4, 2) and t.dtype == kv_quant.SCALE_DTYPE for pair in pool.cpu_scales for t in pair)
    device_bytes = sum(t.numel() * t.element_size() for group in (pool.caches, pool.scales) for p in group for t in p)
    assert spec.bytes_per_block(4) * 5 == device_bytes, "bytes_per_block counts codes and scales"
    pool.check_integrity()  # never-written scales are 0


def test_an_unquantized_pool_has_no_scales():
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_size=8, dtype=torch.bfloat16)
    pool = KVPool(spec, num_blocks=4, block_size=4, device=torch.device("cpu"), num_cpu_blocks=2)
    assert not spec.quantized and pool.scales == [] and pool.cpu_scales == []
    pool.check_integrity()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", QUANTIZED)
def test_a_round_trip_moves_codes_and_scales_exactly(device, dtype):
    pool = quantized_pool(device, dtype)
    pool.check_integrity()
    out = [(5, 0), (1, 1), (2, 2), (7, 4)]  # runs of consecutive CPU blocks and a gap
    before = device_blocks(pool, [s for s, _ in out])
    pool.move_blocks(out, [], [])
    assert same(cpu_blocks(pool, [d for _, d in out]), before)
    for group in (pool.caches, pool.scales):  # the freed device blocks get reused
        for pair in group:
            for t in pair:
                t.zero_()
    back = [(4, 6), (0, 0), (1, 3), (2, 2)]  # CPU → device, in another order
    pool.move_blocks([], back, [])
    expected = [t[[3, 0, 1, 2]] for t in before]  # CPU blocks 4, 0, 1, 2 held device blocks 7, 5, 1, 2
    assert same(device_blocks(pool, [6, 0, 3, 2]), expected)
    assert all(not t.any() for t in device_blocks(pool, [1, 4, 5, 7])), "only the destination blocks are written"
    pool.check_integrity()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", QUANTIZED)
def test_copy_on_write_copies_codes_and_scales(device, dtype):
    pool = quantized_pool(device, dtype, num_cpu_blocks=0)
    before = device_blocks(pool, list(range(pool.num_blocks)))
    pool.move_blocks([], [], [(1, 6), (3, 0)])
    after = device_blocks(pool, list(range(pool.num_blocks)))
    for old, new in zip(before, after):
        assert torch.equal(new[6], old[1]) and torch.equal(new[0], old[3])
        untouched = [b for b in range(pool.num_blocks) if b not in (0, 6)]
        assert torch.equal(new[untouched], old[untouched])
    pool.check_integrity()


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_a_swap_in_reads_the_swap_out_of_the_same_step(dtype):
    pool = quantized_pool("cpu", dtype)
    source = device_blocks(pool, [3])
    pool.move_blocks([(3, 5)], [(5, 7)], [(7, 2)])  # out to CPU 5, back in to 7, copied to 2
    assert same(device_blocks(pool, [7]), source) and same(device_blocks(pool, [2]), source)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), kv_quant.MIN_SCALE / 4])
def test_check_integrity_refuses_a_scale_out_of_range(bad):
    pool = quantized_pool("cpu", torch.int8)
    pool.scales[1][1][2, 3, 0] = bad
    with pytest.raises(AssertionError, match=r"scales\[1\] \(v\)"):
        pool.check_integrity()
    pool.scales[1][1][2, 3, 0] = 0.0  # a slot never written
    pool.check_integrity()
    pool.cpu_scales[0][0][1, 0, 1] = bad
    with pytest.raises(AssertionError, match=r"cpu_scales\[0\] \(k\)"):
        pool.check_integrity()


def test_check_integrity_refuses_mismatched_geometry_or_dtype():
    pool = quantized_pool("cpu", torch.float8_e4m3fn)
    k_scale, v_scale = pool.scales[0]
    pool.scales[0] = (k_scale.float(), v_scale)
    with pytest.raises(AssertionError, match="float32"):
        pool.check_integrity()
    pool.scales[0] = (k_scale, v_scale[:-1])
    with pytest.raises(AssertionError, match="expected"):
        pool.check_integrity()
    pool.scales[0] = (k_scale, v_scale)
    pool.cpu_scales.pop()
    with pytest.raises(AssertionError, match="cpu_scales has 1 layers, expected 2"):
        pool.check_integrity()
