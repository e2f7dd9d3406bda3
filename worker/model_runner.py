"""Per-request state on a worker, and one forward pass per StepPlan over a flat batch.

Host and device meet at fixed points per step (counted in `host_syncs`): the step's small
integer inputs go over in one staging copy (`StagingBuffer`), block tables live on the
device across steps and change by the plan's deltas (`DeviceBlockTable`), and the sampled
tokens come back in the sampler's one read. On CUDA nothing else in a step waits for the
device; a step that samples nothing ends with one stream synchronize instead."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from quire.kernels.backend import AttentionBackend
from quire.protos.step import (PLACEHOLDER_TOKEN, NewRequestData, SampledLogprobs, SamplingSpec, StepPlan, StepResult,
                               TokenSequence)
from quire.worker.attention import AttentionMetadata
from quire.worker.block_table import DeviceBlockTable
from quire.worker.cuda_graphs import DecodeGraphRunner, DecodeGraphSpec
from quire.worker.host_sync import HostSyncCounter
from quire.worker.kv_pool import KVPool
from quire.worker.parallel import ParallelContext
from quire.worker.sampler import Sampler, SamplingRow
from quire.worker.step_inputs import StagingBuffer


SCRATCH_HANDLE = 2**64 - 1  # and downwards: handles of the runner's own scratch requests


@dataclass
class RequestState(TokenSequence):
    """What a worker remembers of a request between steps; the controller's plan deltas keep it current."""

    handle: int
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingSpec
    block_ids: list[int]
    num_computed_tokens: int
    last_sampled: int | None = None  # what a PLACEHOLDER_TOKEN in the next plan stands for
    table_row: int = -1  # its row of the runner's DeviceBlockTable


@dataclass
class PreparedStep:
    """One step's flat inputs on the device, and the host facts that go with them: the
    scheduled `states` in batch order, their `seq_lens` after the step (numpy), the batch
    indexes of the requests that sample (`to_sample`, host list) and the hidden-state rows
    they sample from (`sample_rows`, device). A decode step loaded into the graph runner's
    static buffers has `graph_size` (its padded batch size) set and no inputs or metadata of
    its own."""

    input_ids: torch.Tensor | None
    positions: torch.Tensor | None
    meta: AttentionMetadata | None
    states: list[RequestState]
    seq_lens: np.ndarray
    to_sample: list[int]
    sample_rows: torch.Tensor
    graph_size: int = 0


class ModelRunner:
    """Applies StepPlans to per-request state and runs the model on one flat batch.

    `execute` mutates the request states (new, resumed, finished requests, computed
    token counts) and this rank's KV pool. Only rank 0 samples; other ranks return an
    empty StepResult. A request that cannot run (a delta that does not fit its state, its
    row of the sampler failing) is reported in the result's `errors` and the step goes on
    without it; only a failure of the whole batch (the forward pass, the device) raises.

    `attention` is the worker's attention backend, chosen once at setup; every step's
    metadata hands it to the layers. `backend` is its name ("torch", "triton").

    With `decode_graphs` set, a step in which every scheduled request computes one token and
    which fits the ladder runs through a DecodeGraphRunner (static buffers, padded; captured
    CUDA graphs once `graphs.capture()` ran); any other step runs eagerly. Results are the same.
    """

    def __init__(self, model, ctx: ParallelContext, device: torch.device, kv_pool: KVPool,
                 attention: AttentionBackend, sampler: Sampler, decode_graphs: DecodeGraphSpec | None = None):
        self.model, self.ctx, self.device = model, ctx, device
        self.kv_pool, self.attention, self.sampler = kv_pool, attention, sampler
        self.backend = attention.name
        self.block_size = kv_pool.block_size
        # This rank's heads, for the attention plan: query heads split evenly, KV heads as the pool's spec states.
        self.num_heads = model.config.num_attention_heads // ctx.world_size
        self.num_kv_heads = kv_pool.spec.num_kv_heads
        self.requests: dict[int, RequestState] = {}  # by handle
        self.host_syncs = HostSyncCounter()  # this runner's; the sampler counts its own
        self.stager = StagingBuffer(device, self.host_syncs)
        self.block_table = DeviceBlockTable(device)
        self.graphs = None if decode_graphs is None else DecodeGraphRunner(
            decode_graphs, model, attention, kv_pool, self.block_table, device, self.num_heads, self.num_kv_heads)

    def _add(self, state: RequestState) -> None:
        """Hold a request's state, with a block-table row of its own."""
        self._drop(state.handle)
        state.table_row = self.block_table.acquire()
        self.block_table.assign(state.table_row, state.block_ids)
        self.requests[state.handle] = state

    def _drop(self, handle: int) -> None:
        """Forget a request, if held, and free its block-table row."""
        state = self.requests.pop(handle, None)
        if state is not None:
            self.block_table.release(state.table_row)

    def _apply_plan(self, plan: StepPlan, failed: dict[int, str]) -> None:
        """Bring the request states up to date with the plan's deltas. A delta that does not fit
        its request's state fails that request alone: its state is dropped and the reason goes
        into `failed` (by handle); every rank applies the same plan to the same states, so every
        rank drops the same requests and the batch stays the same on all."""
        for handle in plan.finished_handles:
            self._drop(handle)
        requests, table = self.requests, self.block_table
        for new in plan.new_requests:
            self._add(RequestState(
                new.handle, new.request_id, list(new.prompt_token_ids), list(new.output_token_ids), new.sampling_spec,
                list(new.block_ids), new.num_computed_tokens))
        for delta in plan.cached_requests:
            state = self._state(delta.handle, "cached_requests", plan, failed)
            if state is None:
                continue
            state.output_token_ids.extend(delta.new_token_ids)
            if delta.new_token_ids and delta.new_token_ids[-1] == PLACEHOLDER_TOKEN:
                if not self._resolve_placeholder(state, plan, failed):
                    continue
            if delta.replace_table:
                state.block_ids = list(delta.new_block_ids)
                table.assign(state.table_row, state.block_ids)
            elif delta.new_block_ids:
                state.block_ids.extend(delta.new_block_ids)
                table.extend(state.table_row, delta.new_block_ids)
            state.num_computed_tokens = delta.num_computed_tokens
        for handle, token_id in zip(plan.decode_handles, plan.decode_token_ids):
            # The hot loop (every running request, every step): a plain lookup, the report only on a miss.
            state = requests.get(handle) or self._state(handle, "decode_handles", plan, failed)
            if state is None:
                continue
            state.output_token_ids.append(token_id)
            if token_id == PLACEHOLDER_TOKEN and not self._resolve_placeholder(state, plan, failed):
                continue
            if state.num_computed_tokens != state.num_tokens - 1:
                self._fail(state.handle, f"step {plan.step_id}: decode of {state.request_id!r} with "
                                         f"{state.num_tokens - state.num_computed_tokens} tokens not computed", failed)
        for handle, block_id in zip(plan.decode_block_handles, plan.decode_block_ids):
            if (state := self._state(handle, "decode_block_handles", plan, failed)) is not None:
                state.block_ids.append(block_id)
                table.extend(state.table_row, [block_id])

    def _state(self, handle: int, where: str, plan: StepPlan, failed: dict[int, str]) -> RequestState | None:
        state = self.requests.get(handle)
        if state is None and handle not in failed:
            failed[handle] = f"step {plan.step_id}: unknown request handle {handle} in {where}"
        return state

    def _fail(self, handle: int, error: str, failed: dict[int, str]) -> None:
        """Drop a request that cannot run (the controller ends it on hearing why)."""
        self._drop(handle)
        failed.setdefault(handle, error)

    def _resolve_placeholder(self, state: RequestState, plan: StepPlan, failed: dict[int, str]) -> bool:
        """Replace the last output token, a placeholder, by the token sampled for the request
        last step; False (failing it) when it has none."""
        if state.last_sampled is None:
            self._fail(state.handle, f"step {plan.step_id}: a placeholder token for {state.request_id!r}, "
                                     "which has no sampled token", failed)
            return False
        state.output_token_ids[-1], state.last_sampled = state.last_sampled, None
        return True

    def _prepare(self, plan: StepPlan, failed: dict[int, str]) -> PreparedStep | None:
        """Flat input tensors and attention metadata for the scheduled requests, in plan order
        (those in `failed` left out, and any scheduled past its tokens or blocks failed too);
        None when no request is left. Every integer input, the block table's deltas included,
        goes to the device in one staging copy; nothing is read back."""
        states, query_lens, token_ids = [], [], []
        for handle, num_tokens in plan.scheduled():
            state = self._state(handle, "the scheduled requests", plan, failed)
            if state is None:
                continue
            end = state.num_computed_tokens + num_tokens
            if end > state.num_tokens or end > len(state.block_ids) * self.block_size:
                self._fail(handle, f"step {plan.step_id}: request {state.request_id!r} scheduled past its tokens "
                                   "or blocks", failed)
                continue
            states.append(state)
            query_lens.append(num_tokens)
            token_ids.extend(state.token_slice(state.num_computed_tokens, end))
        if not states:
            return None
        num_reqs, num_tokens = len(states), len(token_ids)
        query_lens_np = np.asarray(query_lens, dtype=np.int64)
        query_start_loc = np.zeros(num_reqs + 1, dtype=np.int64)
        np.cumsum(query_lens_np, out=query_start_loc[1:])
        computed = np.fromiter((s.num_computed_tokens for s in states), dtype=np.int64, count=num_reqs)
        seq_lens = computed + query_lens_np
        table_rows = np.fromiter((s.table_row for s in states), dtype=np.int64, count=num_reqs)
        max_blocks = max(len(s.block_ids) for s in states)
        # positions[t] = computed tokens of t's request + t's offset within its query rows
        req_of_token = np.repeat(np.arange(num_reqs), query_lens_np)
        positions = computed[req_of_token] + np.arange(num_tokens) - query_start_loc[:-1][req_of_token]
        # A request samples when this step computes its last known token, from its last query row.
        to_sample = [i for i, s in enumerate(states) if seq_lens[i] == s.num_tokens]
        sample_rows = query_start_loc[1:][to_sample] - 1
        graph_size = self.graphs.padded_size(num_reqs) if self.graphs and num_tokens == num_reqs else None
        delta_index, delta_values = self.block_table.take_deltas()  # the width is final from here on
        table_index = table_rows[req_of_token] * self.block_table.width + positions // self.block_size
        if graph_size is not None:
            return self._prepare_graph_step(graph_size, states, token_ids, positions, seq_lens, table_index,
                                            table_rows, to_sample, sample_rows, delta_index, delta_values)
        (input_ids_d, positions_d, table_index_d, offset_d, table_rows_d, sample_rows_d, delta_index_d,
         delta_values_d) = self.stager.stage([
             np.asarray(token_ids, dtype=np.int64), positions, table_index, positions % self.block_size, table_rows,
             sample_rows, delta_index, delta_values])
        self.block_table.apply_deltas(delta_index_d, delta_values_d)
        meta = AttentionMetadata(
            slot_mapping=self.block_table.lookup(table_index_d) * self.block_size + offset_d,
            block_tables=self.block_table.gather(table_rows_d, max_blocks),
            seq_lens=seq_lens.tolist(),
            query_start_loc=query_start_loc.tolist(),
            backend=self.attention,
            kv_caches=self.kv_pool.caches,
            kv_scales=self.kv_pool.scales,
        )
        meta.plan = self.attention.plan(meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                        block_size=self.block_size, num_heads=self.num_heads,
                                        num_kv_heads=self.num_kv_heads)
        return PreparedStep(input_ids_d, positions_d, meta, states, seq_lens, to_sample, sample_rows_d)

    def _prepare_graph_step(self, size: int, states: list[RequestState], token_ids: list[int], positions: np.ndarray,
                            seq_lens: np.ndarray, table_index: np.ndarray, table_rows: np.ndarray, to_sample: list[int],
                            sample_rows: np.ndarray, delta_index: np.ndarray, delta_values: np.ndarray) -> PreparedStep:
        """`_prepare` for a decode step of `len(states)` rows padded to `size`: the same one staging
        copy (ids, positions and lengths already padded), then device-side copies into the graph
        runner's static buffers."""
        num_pad = size - len(states)
        padded_seq_lens = np.pad(seq_lens, (0, num_pad), constant_values=1)
        ids_d, positions_d, seq_lens_d, table_index_d, offset_d, table_rows_d, sample_rows_d, delta_index_d, \
            delta_values_d = self.stager.stage([
                np.pad(np.asarray(token_ids, dtype=np.int64), (0, num_pad)), np.pad(positions, (0, num_pad)),
                padded_seq_lens, table_index, positions % self.block_size,
                table_rows, sample_rows, delta_index, delta_values])
        self.block_table.apply_deltas(delta_index_d, delta_values_d)
        slots = self.block_table.lookup(table_index_d) * self.block_size + offset_d
        self.graphs.load(size, ids_d, positions_d, slots, table_rows_d, seq_lens_d, padded_seq_lens)
        return PreparedStep(None, None, None, states, seq_lens, to_sample, sample_rows_d, graph_size=size)

    def _forward(self, prepared: PreparedStep) -> torch.Tensor:
        """The step's final hidden states (a graph step's padded to its size: rows past the
        batch are padding, never sampled)."""
        if prepared.graph_size:
            return self.graphs.forward(prepared.graph_size)
        return self.model(prepared.input_ids, prepared.positions, prepared.meta)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        started = time.perf_counter()
        result = StepResult(step_id=plan.step_id, rank=self.ctx.rank)
        self._apply_plan(plan, result.errors)
        if plan.moves_blocks:
            self.kv_pool.move_blocks(plan.swap_out, plan.swap_in, plan.block_copies)
        prepared = self._prepare(plan, result.errors) if plan.num_scheduled_requests else None
        if prepared is None:
            return result
        states, to_sample = prepared.states, prepared.to_sample
        hidden = self._forward(prepared)
        for state, seq_len in zip(states, prepared.seq_lens.tolist()):
            state.num_computed_tokens = seq_len
        read_back = False
        if to_sample:
            logits = self.model.compute_logits(hidden.index_select(0, prepared.sample_rows))
            if logits is not None:  # rank 0
                rows = [SamplingRow(states[i].params, states[i].prompt_token_ids, states[i].output_token_ids)
                        for i in to_sample]
                out = self.sampler(logits, rows)  # the step's one read back
                read_back = True
                sampled = out.token_ids
                for j, i in enumerate(to_sample):
                    if out.errors[j] is not None:
                        result.errors[states[i].handle] = out.errors[j]
                    else:
                        result.sampled_handles.append(states[i].handle)
                        result.sampled_token_ids.append(sampled[j])
                result.logprobs = {states[i].handle: SampledLogprobs(out.logprobs[j], out.top_logprobs[j])
                                   for j, i in enumerate(to_sample) if out.logprobs[j] is not None}
            if self.ctx.world_size > 1:
                sampled = self._share_sampled(out if logits is not None else None, len(to_sample))
                read_back = True
            # A failed row's stand-in token too: a step already sent may name it by placeholder;
            # that step's result for the request is ignored, the controller having ended it.
            for i, token_id in zip(to_sample, sampled):
                states[i].last_sampled = token_id
        if not read_back and self.device.type == "cuda":
            # Nothing was read back: wait here, so forward_seconds covers the work and errors surface now.
            self.host_syncs.blocking_waits += 1
            torch.cuda.synchronize(self.device)
        result.forward_seconds = time.perf_counter() - started
        return result

    def _share_sampled(self, out, num_rows: int) -> list[int]:
        """Every rank must know the sampled tokens: the next plan may name them by placeholder.
        Rank 0 (`out` set) broadcasts its tokens from the device; the others read theirs back
        (their step's one read). Rank 0's stand-in tokens of failed rows are broadcast too."""
        if out is None:
            shared = torch.empty(num_rows, dtype=torch.long, device=self.device)
        elif out.device_token_ids is not None:
            shared = out.device_token_ids
        else:  # the sampler fell back to row by row: only the host list holds every row's token
            self.host_syncs.h2d_copies += 1
            shared = torch.tensor(out.token_ids, dtype=torch.long, device=self.device)
        shared = self.ctx.broadcast_from_first(shared)
        return out.token_ids if out is not None else self.host_syncs.read_back(shared)

    @torch.inference_mode()
    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Logits at every position of each prompt (`[len, vocab]` fp32, rank 0; None elsewhere),
        computed through the paged KV pool with scratch blocks; for parity tests and scoring.
        Uses blocks `0..` of the pool, so it must not run while requests hold blocks."""
        total_blocks = sum(-(-len(p) // self.block_size) for p in prompts)
        if total_blocks > self.kv_pool.num_blocks:
            raise ValueError(f"prompts need {total_blocks} KV blocks, the pool has {self.kv_pool.num_blocks}")
        plan, next_block = StepPlan(step_id=0), 0
        for i, prompt in enumerate(prompts):
            n = -(-len(prompt) // self.block_size)
            # One extra phantom token so no request reaches its end: nothing is sampled.
            # Handles from the top of the range never meet the controller's.
            handle = SCRATCH_HANDLE - i
            plan.new_requests.append(NewRequestData(handle, f"__logits_{i}", prompt + [0],
                                                    SamplingSpec(temperature=0),
                                                    list(range(next_block, next_block + n)), 0))
            plan.num_scheduled_tokens[handle] = len(prompt)
            next_block += n
        failed: dict[int, str] = {}
        self._apply_plan(plan, failed)
        try:
            prepared = self._prepare(plan, failed)
            hidden = self._forward(prepared)[:sum(len(p) for p in prompts)]  # a graph step's padding cut off
            logits = self.model.compute_logits(hidden)
        finally:
            for i in range(len(prompts)):
                self._drop(SCRATCH_HANDLE - i)
        if logits is None:
            return None
        return list(logits.split([len(p) for p in prompts]))
