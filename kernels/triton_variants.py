"""Which compiled variants of the Triton kernels a worker launches, and their launch
configurations; pure Python (no Triton import), so the choice is testable anywhere.

Triton compiles one binary per distinct tuple of constexpr values, argument dtypes,
launch options (`num_warps`, `num_stages`) and specialisations of the remaining
arguments (integers `== 1` or divisible by 16, pointers aligned to 16 bytes). Every
compile costs a second or more, so a serving worker must launch few distinct tuples,
all known in advance and compiled at startup (`TritonAttentionBackend.warm_up`).
The rules that keep the set small and bounded:

- Everything that varies from step to step is a runtime argument that Triton does not
  specialise (`do_not_specialize` in triton_attention.py): token counts, split
  lengths, block-table widths, and token strides (the model decides those, e.g. when
  queries are a view of a fused QKV projection; warm-up cannot see them).
- Cache strides stay specialised: they follow from the KV-cache geometry, which is
  fixed per worker and which warm-up reproduces exactly. So does pointer alignment:
  warm-up's tensors are 16-byte aligned, as torch allocations and per-head views of a
  fused projection are (a misaligned view would compile one more variant, once).
- The split-K factor is a runtime argument, chosen from a small ladder of powers of
  two (`SPLIT_LADDER`); the kernels only know whether a launch is split (`SPLIT`).
- A launch uses one of two query tiles: the decode tile (one query per request) or the
  prefill tile (64 rows), and the tile fixes `BLOCK_N`, `num_warps` and `num_stages`
  through `tile_config`, a table keyed by head dim and GPU generation.

- A quantized KV cache (`kv_quant`: int8 or fp8 e4m3 codes with fp16 scales) is a
  constexpr of the attention kernel (`QUANT`) and selects the quantizing slot write;
  the activation dtype (queries, outputs, K/V to write) stays a separate key.

So per head geometry, block size, dtype AND cache dtype a worker launches at most 4
attention variants (tile x split), 1 reduction and 1 slot write: `compile_variants`
lists them, and `attention_variant` / `reduce_variant` / `write_kv_variant` are what the
launches use.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from quire.kernels import kv_quant

SPLIT_LADDER = (1, 2, 4, 8, 16)  # the only split-K factors the rule picks
MAX_SPLITS = SPLIT_LADDER[-1]     # also the reduction kernel's (fixed) padded width
MIN_SPLIT_LEN = 256               # never split into chunks shorter than this
# Split boundaries are multiples of this, itself a multiple of every BLOCK_N in the
# table, so an inner iteration never straddles two splits and (with power-of-two block
# sizes) a BLOCK_N tile is either inside one cache block or made of whole blocks.
SPLIT_ALIGN = 128
PREFILL_ROWS = 64                 # query rows of a prefill tile (tokens x grouped heads)
INTERPRETER_CAPACITY = 8          # programs "resident at once" in the interpreter: tests reach split-K cheaply

DECODE, PREFILL = "decode", "prefill"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class TileConfig:
    """Context positions per inner iteration, warps per program, software-pipeline depth."""

    block_n: int
    num_warps: int
    num_stages: int


# (generation, tile, padded head dim up to) -> config. Decode tiles are bandwidth-bound: a
# wide BLOCK_N and deep pipelining keep loads in flight. Prefill tiles hold a 64-row fp32
# accumulator plus Q: 4 warps spill registers at head dim 128, so they get 8.
# Generations: sm80 (A100, 164 KiB shared memory), sm86 (A10/L4/L40, ~100 KiB), sm90 (H100/H200
# and later, 228 KiB), sm75 (no async copies: one stage). Unmeasured on hardware: a starting point.
_TABLE: dict[tuple[str, str], tuple[tuple[int, TileConfig], ...]] = {
    ("sm90", DECODE): ((64, TileConfig(64, 4, 4)), (128, TileConfig(64, 4, 3)), (256, TileConfig(32, 4, 3))),
    ("sm90", PREFILL): ((64, TileConfig(64, 4, 3)), (128, TileConfig(64, 8, 3)), (256, TileConfig(32, 8, 2))),
    ("sm80", DECODE): ((64, TileConfig(64, 4, 3)), (128, TileConfig(64, 4, 3)), (256, TileConfig(32, 4, 2))),
    ("sm80", PREFILL): ((64, TileConfig(64, 4, 3)), (128, TileConfig(64, 8, 2)), (256, TileConfig(32, 8, 2))),
    ("sm86", DECODE): ((64, TileConfig(64, 4, 3)), (128, TileConfig(64, 4, 2)), (256, TileConfig(32, 4, 2))),
    ("sm86", PREFILL): ((64, TileConfig(64, 4, 2)), (128, TileConfig(32, 8, 2)), (256, TileConfig(32, 8, 1))),
    ("sm75", DECODE): ((64, TileConfig(64, 4, 1)), (128, TileConfig(32, 4, 1)), (256, TileConfig(32, 4, 1))),
    ("sm75", PREFILL): ((64, TileConfig(32, 4, 1)), (128, TileConfig(32, 8, 1)), (256, TileConfig(16, 8, 1))),
}
_SHARED_MEMORY = {"sm90": 227 << 10, "sm80": 163 << 10, "sm86": 99 << 10, "sm75": 64 << 10}


def generation(capability: tuple[int, int] | None) -> str:
    """The table's row for a CUDA compute capability; None (the interpreter) reads the sm80 row,
    so the tests run the BLOCK_N that A100-class GPUs compile."""
    if capability is None or capability == (8, 0):
        return "sm80"
    major, _ = capability
    return "sm90" if major >= 9 else "sm86" if major == 8 else "sm75"


def tile_config(tile: str, head_dim_pad: int, block_m: int, elem_size: int,
                capability: tuple[int, int] | None) -> TileConfig:
    """The launch configuration of a `tile` (DECODE or PREFILL) of `block_m` rows at padded
    head dim `head_dim_pad`; pipeline stages are cut until the K/V stages plus Q fit the
    generation's shared memory (fp32 caches need twice the bytes)."""
    gen = generation(capability)
    rows = _TABLE[(gen, tile)]
    config = next((c for limit, c in rows if head_dim_pad <= limit), rows[-1][1])
    stages = config.num_stages
    q_bytes = block_m * head_dim_pad * elem_size
    while stages > 1 and q_bytes + stages * 2 * config.block_n * head_dim_pad * elem_size > _SHARED_MEMORY[gen]:
        stages -= 1
    return TileConfig(config.block_n, config.num_warps, stages)


def tile_rows(group: int, decode_only: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_Q) for query heads in groups of `group` per KV head: a decode-only step
    needs one token per tile, so `group` rows (at least 16, for tl.dot); otherwise 64 rows."""
    rows = next_power_of_2(group) if decode_only else max(PREFILL_ROWS, next_power_of_2(group))
    block_m = max(16, rows)
    return block_m, max(1, block_m // group)


def ladder_splits(desired: int) -> int:
    """The largest split count of `SPLIT_LADDER` not above `desired` (1 when `desired` < 2)."""
    return max(s for s in SPLIT_LADDER if s <= max(1, desired))


def choose_num_splits(num_programs: int, max_seq_len: int, device: torch.device) -> int:
    """Split-K factor for a launch of `num_programs` (tile, KV head) programs: 1 when they fill
    the device (`2 * SMs` programs; `INTERPRETER_CAPACITY` off CUDA), else as many chunks as fill
    it, rounded down onto the ladder, never chunks shorter than `MIN_SPLIT_LEN` positions."""
    capacity = 2 * _sm_count(device) if device.type == "cuda" else INTERPRETER_CAPACITY
    if num_programs >= capacity:
        return 1
    return ladder_splits(min(MAX_SPLITS, -(-capacity // num_programs), max_seq_len // MIN_SPLIT_LEN))


def split_length(max_seq_len: int, num_splits: int) -> int:
    """Context positions per split: the longest context cut in `num_splits`, rounded up to `SPLIT_ALIGN`."""
    per_split = -(-max_seq_len // num_splits)
    return -(-per_split // SPLIT_ALIGN) * SPLIT_ALIGN


@dataclass(frozen=True)
class Variant:
    """One compiled kernel: what Triton keys its cache on, given the specialisation rules above."""

    kernel: str                                 # "paged_attention", "reduce", "write_kv" or "write_kv_quant"
    dtype: torch.dtype                          # of the query / K/V to write / output tensors
    constexprs: tuple[tuple[str, object], ...]  # (name, value), in signature order
    num_warps: int = 4
    num_stages: int = 3
    cache_dtype: torch.dtype | None = None      # of the KV cache; None for the reduction (reads no cache)

    def launch_kwargs(self) -> dict:
        """Keyword arguments of the launch: the constexprs and launch options."""
        return {**dict(self.constexprs), "num_warps": self.num_warps, "num_stages": self.num_stages}


@lru_cache(maxsize=None)  # memo of a pure function: launches ask it per layer and step
def attention_variant(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                      block_m: int, split: bool, capability: tuple[int, int] | None, interpret: bool,
                      cache_dtype: torch.dtype | None = None) -> Variant:
    """The paged-attention variant of a launch with `block_m`-row tiles (from `tile_rows`), queries
    in `dtype` and caches in `cache_dtype` (None: `dtype`)."""
    cache_dtype = cache_dtype or dtype
    group = num_heads // num_kv_heads
    head_dim_pad = max(16, next_power_of_2(head_dim))
    tile = DECODE if block_m < PREFILL_ROWS else PREFILL
    config = tile_config(tile, head_dim_pad, block_m, dtype.itemsize, capability)
    # How a BLOCK_N tile of positions maps onto cache blocks: 1 inside one block, 2 whole blocks, 0 general.
    paging = 1 if block_size % config.block_n == 0 else 2 if config.block_n % block_size == 0 else 0
    constexprs = (("NUM_HEADS", num_heads), ("GROUP", group), ("HEAD_DIM", head_dim), ("HEAD_DIM_PAD", head_dim_pad),
                  ("BLOCK_SIZE", block_size), ("BLOCK_M", block_m), ("BLOCK_Q", max(1, block_m // group)),
                  ("BLOCK_N", config.block_n), ("PAGING", paging), ("SPLIT", split),
                  ("IEEE_DOT", dtype == torch.float32),
                  # Triton's interpreter mis-computes bf16 dot products; it gets fp32 operands instead.
                  ("UPCAST", dtype == torch.bfloat16 and interpret),
                  ("QUANT", quant_kind(cache_dtype)))
    return Variant("paged_attention", dtype, constexprs, config.num_warps, config.num_stages, cache_dtype)


def quant_kind(cache_dtype: torch.dtype) -> int:
    """The kernels' `QUANT` constexpr: 0 for a cache of values, 1 for int8 codes, 2 for e4m3 codes."""
    return 0 if not kv_quant.is_quantized(cache_dtype) else 1 if cache_dtype == torch.int8 else 2


@lru_cache(maxsize=None)
def reduce_variant(num_heads: int, head_dim: int, dtype: torch.dtype) -> Variant:
    """The split-K reduction: one variant whatever the split count (padded to `MAX_SPLITS`)."""
    head_dim_pad = max(16, next_power_of_2(head_dim))
    return Variant("reduce", dtype, (("NUM_HEADS", num_heads), ("HEAD_DIM", head_dim), ("HEAD_DIM_PAD", head_dim_pad),
                                     ("SPLITS_PAD", MAX_SPLITS)), num_warps=4, num_stages=1)


@lru_cache(maxsize=None)
def write_kv_variant(num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                     cache_dtype: torch.dtype | None = None) -> Variant:
    """The slot write of one token's `num_kv_heads * head_dim` row in `dtype` into a cache of
    `cache_dtype` (None: `dtype`): a copy, or for a quantized cache the quantizing write."""
    cache_dtype = cache_dtype or dtype
    if kv_quant.is_quantized(cache_dtype):
        constexprs = (("HEADS", num_kv_heads), ("HEAD_DIM", head_dim), ("HEADS_PAD", next_power_of_2(num_kv_heads)),
                      ("HEAD_DIM_PAD", next_power_of_2(head_dim)), ("FP8", cache_dtype == torch.float8_e4m3fn))
        return Variant("write_kv_quant", dtype, constexprs, num_warps=4, num_stages=1, cache_dtype=cache_dtype)
    row = num_kv_heads * head_dim
    return Variant("write_kv", dtype, (("ROW", row), ("ROW_PAD", next_power_of_2(row))), num_warps=4, num_stages=1,
                   cache_dtype=cache_dtype)


def compile_variants(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                     capability: tuple[int, int] | None = None, interpret: bool = False,
                     cache_dtype: torch.dtype | None = None) -> frozenset[Variant]:
    """Every variant a worker with this geometry, activations in `dtype` and caches in `cache_dtype`
    (None: `dtype`) launches, whatever its batches and sequence lengths: at most 6 (4 attention,
    1 reduction, 1 slot write)."""
    group = num_heads // num_kv_heads
    tiles = {tile_rows(group, decode_only)[0] for decode_only in (True, False)}
    attention = {attention_variant(num_heads, num_kv_heads, head_dim, block_size, dtype, block_m, split,
                                   capability, interpret, cache_dtype) for block_m in tiles for split in (False, True)}
    return frozenset(attention | {reduce_variant(num_heads, head_dim, dtype),
                                  write_kv_variant(num_kv_heads, head_dim, dtype, cache_dtype)})


@lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@lru_cache(maxsize=None)
def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability that keys the table: None off CUDA (the interpreter)."""
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
