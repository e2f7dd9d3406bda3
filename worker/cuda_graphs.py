"""Decode steps through static buffers, captured as CUDA graphs and replayed.

A decode step of a large model is a few thousand small kernel launches (about 42 per
layer); launched one by one from Python they cost more CPU time than the GPU needs to read
the weights. The common step — every scheduled request decodes exactly one token — has a
shape that depends only on its batch size, so it is captured once per size of a batch-size
ladder (`batch_size_ladder`) and replayed: one launch per step.

A graph reads fixed addresses, so the step's inputs are written into static buffers
preallocated at the ladder's largest size, and the batch is padded up to the next ladder
size. Padding row j (j = 0, 1, ... after the real rows) is a one-token request of its own
in scratch block `scratch_blocks[j]`, past the controller's blocks: it writes its K/V at
position 0 of that block and attends over that one slot (context length 1), so it neither
writes nor reads a real request's blocks; its logits are never computed (only the real
rows' hidden states are sampled from).

Graph safety of the attention: the plan of a captured size comes from the backend's
`static_decode_plan` (Triton: one tile per request, the split-K factor and chunk length
fixed from max_model_len, empty splits weighed 0 by the reduction), built once over the
static buffers; nothing inside the captured region reads host values. A backend without
a static plan (the torch reference) is never captured. A quantized KV pool's scale tensors,
like its codes, are allocated once and never move, so a captured graph reads and writes
both at fixed addresses.

Modes: "capture" (CUDA, a backend with static plans, NCCL or one rank) captures each size
once after a warm-up run, all sizes in one memory pool, the tensor-parallel all-reduce
inside the graphs. "replay" runs the very same static-buffer path eagerly (the CPU, gloo):
it is what the CPU tests exercise, and it builds a per-step plan over the static buffers
when the backend has no static one.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from quire.kernels.backend import AttentionBackend, AttentionPlan
from quire.worker.attention import AttentionMetadata
from quire.worker.block_table import DeviceBlockTable
from quire.worker.kv_pool import KVPool

logger = logging.getLogger(__name__)

CAPTURE, REPLAY = "capture", "replay"
# Off CUDA, "1" runs decode steps through the static buffers in eager replay (for tests: the
# CPU has no graphs to capture, and the static path costs copies there).
REPLAY_ENV = "QUIRE_DECODE_GRAPH_REPLAY"
# Device memory of one captured graph beyond its activations (the instantiated graph, its
# kernel parameters); an estimate for KV sizing, to be measured on a GPU.
PER_GRAPH_OVERHEAD_BYTES = 4 << 20


def batch_size_ladder(max_num_seqs: int) -> tuple[int, ...]:
    """Captured batch sizes: 1, 2, 4, 8, then multiples of 8, all below `max_num_seqs`, and
    `max_num_seqs` itself last (so any batch of 1..max_num_seqs pads by at most 7 rows). Empty
    for `max_num_seqs` < 1."""
    if max_num_seqs < 1:
        return ()
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return (*sizes, max_num_seqs)


def padded_size(ladder: tuple[int, ...], num_reqs: int) -> int | None:
    """The smallest ladder size holding `num_reqs` rows; None when none does."""
    return next((size for size in ladder if size >= num_reqs), None)


def max_padding(ladder: tuple[int, ...]) -> int:
    """The most padding rows any batch of 1..ladder[-1] rows gets (the scratch blocks it needs)."""
    return max((b - a - 1 for a, b in zip((0, *ladder), ladder)), default=0)


def graph_memory_reserve(peak_activation_bytes: int, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Bytes to keep free of the KV cache for captured decode graphs: their memory pool holds the
    activations of the largest captured batch (max_num_seqs tokens), estimated as the measured
    dummy step's activation peak (max_num_batched_tokens tokens) scaled by the token ratio, plus
    `PER_GRAPH_OVERHEAD_BYTES` per ladder size. The static buffers are a few KiB: left out."""
    ladder = batch_size_ladder(max_num_seqs)
    share = min(1.0, max_num_seqs / max(1, max_num_batched_tokens))
    return int(peak_activation_bytes * share) + len(ladder) * PER_GRAPH_OVERHEAD_BYTES


def decode_graph_mode(device: torch.device, enforce_eager: bool, attention: AttentionBackend,
                      distributed_backend: str | None) -> str | None:
    """How this worker runs decode steps: CAPTURE, REPLAY or None (eagerly, as any step).
    `distributed_backend` is the tensor-parallel group's ("nccl", "gloo"; None for one rank)."""
    if enforce_eager:
        return None
    if device.type != "cuda":
        return REPLAY if os.environ.get(REPLAY_ENV, "") == "1" else None
    has_static_plan = type(attention).static_decode_plan is not AttentionBackend.static_decode_plan
    if has_static_plan and distributed_backend in (None, "nccl"):
        return CAPTURE
    why = (f"the {attention.name} attention backend has no static plan" if not has_static_plan
           else f"a {distributed_backend} group cannot be captured")
    logger.info("decode steps run eagerly (no CUDA graphs): %s", why)
    return None


@dataclass(frozen=True)
class DecodeGraphSpec:
    """How a ModelRunner runs its decode steps through a DecodeGraphRunner: the `mode` (CAPTURE
    or REPLAY), the ladder's top (`max_num_seqs`), the longest context (`max_model_len`) and
    the KV pool's scratch blocks for padding rows (at least `max_padding` of the ladder; no
    request is ever given them)."""

    mode: str
    max_num_seqs: int
    max_model_len: int
    scratch_blocks: list[int]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # the graph's output, rewritten by each replay


class DecodeGraphRunner:
    """Owns the static decode buffers of one ModelRunner and, in CAPTURE mode, its graphs.

    Per step the runner calls `load` (device-side copies of the staged inputs into the static
    buffers, padding rows set) and then `forward`, which returns the `[size, hidden]` final
    hidden states (rows `num_reqs..size-1` are padding; a view valid until the next step).
    `capture` (CAPTURE mode, once, before serving, with no request holding KV blocks: its
    warm-up runs write real blocks) records one graph per ladder size.
    """

    def __init__(self, spec: DecodeGraphSpec, model, attention: AttentionBackend, kv_pool: KVPool,
                 block_table: DeviceBlockTable, device: torch.device, num_heads: int, num_kv_heads: int):
        self.model, self.attention, self.kv_pool, self.block_table = model, attention, kv_pool, block_table
        self.device, self.mode, self.max_model_len = device, spec.mode, spec.max_model_len
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.ladder = batch_size_ladder(spec.max_num_seqs)
        scratch_blocks = spec.scratch_blocks
        if not self.ladder:
            raise ValueError("decode graphs need max_num_seqs >= 1")
        if len(scratch_blocks) < max_padding(self.ladder):
            raise ValueError(f"{len(scratch_blocks)} scratch blocks for up to {max_padding(self.ladder)} padding rows")
        size, bs = self.ladder[-1], kv_pool.block_size
        self.width = -(-spec.max_model_len // bs)  # table columns a request of max_model_len tokens needs
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.long, device=device)  # noqa: E731
        self.input_ids, self.positions, self.slot_mapping = zeros(size), zeros(size), zeros(size)
        self.block_tables = zeros(size, self.width)
        self.seq_lens = torch.ones(size, dtype=torch.int32, device=device)
        pad_blocks = torch.tensor(scratch_blocks, dtype=torch.long, device=device)
        self._pad_blocks, self._pad_slots = pad_blocks, pad_blocks * bs  # padding row j: position 0 of its block
        self._seq_lens_host: list[int] = []  # the last loaded step's, padded (for a per-step plan in REPLAY)
        self._static_plans: dict[int, AttentionPlan | None] = {}
        self._graphs: dict[int, _Captured] = {}
        self.pool_bytes = 0  # measured by `capture`

    def static_buffers(self) -> list[torch.Tensor]:
        """Every device tensor the runner owns for good (what a test of host syncs marks as device data)."""
        return [self.input_ids, self.positions, self.slot_mapping, self.block_tables, self.seq_lens,
                self._pad_blocks, self._pad_slots]

    def padded_size(self, num_reqs: int) -> int | None:
        return padded_size(self.ladder, num_reqs)

    def load(self, size: int, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
             table_rows: torch.Tensor, seq_lens: torch.Tensor, seq_lens_host: np.ndarray) -> None:
        """Write a step into the static buffers: `input_ids`, `positions`, `seq_lens` (device,
        already padded to `size`: ids and positions 0, lengths 1), the real rows' `slots` and
        their rows of the block table (`table_rows`, device); padding rows get their scratch
        slots and blocks. `seq_lens_host` is the padded lengths on the host."""
        num_reqs = slots.numel()
        num_pad = size - num_reqs
        self.input_ids[:size].copy_(input_ids)
        self.positions[:size].copy_(positions)
        self.seq_lens[:size].copy_(seq_lens)
        self.slot_mapping[:num_reqs].copy_(slots)
        self.slot_mapping[num_reqs:size].copy_(self._pad_slots[:num_pad])
        table = self.block_table.table
        width = min(self.width, table.shape[1])
        # Columns past a row's context are never read: stale ids there (valid block ids) are harmless.
        self.block_tables[:num_reqs, :width].copy_(table[:, :width].index_select(0, table_rows))
        self.block_tables[num_reqs:size, 0].copy_(self._pad_blocks[:num_pad])
        self._seq_lens_host = seq_lens_host.tolist()

    def forward(self, size: int) -> torch.Tensor:
        """The loaded step's final hidden states `[size, hidden]`: a replay of the captured graph,
        or (REPLAY mode) the same model call on the static buffers."""
        captured = self._graphs.get(size)
        if captured is not None:
            captured.graph.replay()
            return captured.hidden
        return self._run_model(size, self._plan(size))

    def _metadata(self, size: int, plan: AttentionPlan, seq_lens: list[int]) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:size], block_tables=plan.block_tables,
                                 seq_lens=seq_lens, query_start_loc=list(range(size + 1)), backend=self.attention,
                                 kv_caches=self.kv_pool.caches, kv_scales=self.kv_pool.scales, plan=plan)

    def _plan(self, size: int) -> AttentionPlan:
        """The static plan of `size` (built once), else a plan of the loaded step's lengths."""
        if size not in self._static_plans:
            self._static_plans[size] = self.attention.static_decode_plan(
                self.block_tables[:size], self.seq_lens[:size], max_seq_len=self.max_model_len,
                block_size=self.kv_pool.block_size, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads)
        plan = self._static_plans[size]
        if plan is not None:
            return plan
        return self.attention.plan(self.block_tables[:size], self._seq_lens_host, list(range(size + 1)),
                                   block_size=self.kv_pool.block_size, num_heads=self.num_heads,
                                   num_kv_heads=self.num_kv_heads)

    def _run_model(self, size: int, plan: AttentionPlan) -> torch.Tensor:
        meta = self._metadata(size, plan, self._seq_lens_host)
        return self.model(self.input_ids[:size], self.positions[:size], meta)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every ladder size, largest first (smaller graphs reuse the pool's memory), each
        after one warm-up run; sets `pool_bytes` (device memory the graphs took, measured as the
        drop in free memory) and logs it. Row i writes flat slot i (wrapped to the pool) at its
        offset in its block and attends over its block up to there, so the warm-up runs write
        real blocks: no request may hold blocks yet."""
        if self.mode != CAPTURE:
            raise RuntimeError(f"capture in {self.mode!r} mode")
        size = self.ladder[-1]
        bs, real_slots = self.kv_pool.block_size, self.kv_pool.num_blocks * self.kv_pool.block_size
        rows = torch.arange(size, device=self.device)
        self.slot_mapping.copy_(rows % real_slots)
        self.block_tables.zero_()
        self.block_tables[:, 0].copy_(self.slot_mapping // bs)
        self.positions.copy_(self.slot_mapping % bs)  # each row's own slot is its position 0..bs-1
        self.seq_lens.copy_(self.positions + 1)
        self._seq_lens_host = []
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.ladder):
            plan = self._plan(size)
            self._run_model(size, plan)  # warm-up: lazy initialisations happen outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._run_model(size, plan)
            self._graphs[size] = _Captured(graph, hidden)
        torch.cuda.synchronize(self.device)
        self.pool_bytes = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info("captured %d decode graphs (batch sizes %d..%d): %.1f MiB of device memory",
                    len(self._graphs), self.ladder[0], self.ladder[-1], self.pool_bytes / 2**20)
