"""Per-request state on a worker, and one forward pass per StepPlan over a flat batch."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from quire.kernels.backend import AttentionBackend
from quire.protos.step import (PLACEHOLDER_TOKEN, NewRequestData, SampledLogprobs, SamplingSpec, StepPlan, StepResult,
                               TokenSequence)
from quire.worker.attention import AttentionMetadata
from quire.worker.kv_pool import KVPool
from quire.worker.parallel import ParallelContext
from quire.worker.sampler import Sampler, SamplingRow


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


class ModelRunner:
    """Applies StepPlans to per-request state and runs the model on one flat batch.

    `execute` mutates the request states (new, resumed, finished requests, computed
    token counts) and this rank's KV pool. Only rank 0 samples; other ranks return an
    empty StepResult. A request that cannot run (a delta that does not fit its state, its
    row of the sampler failing) is reported in the result's `errors` and the step goes on
    without it; only a failure of the whole batch (the forward pass, the device) raises.

    `attention` is the worker's attention backend, chosen once at setup; every step's
    metadata hands it to the layers. `backend` is its name ("torch", "triton").
    """

    def __init__(self, model, ctx: ParallelContext, device: torch.device, kv_pool: KVPool,
                 attention: AttentionBackend, sampler: Sampler):
        self.model, self.ctx, self.device = model, ctx, device
        self.kv_pool, self.attention, self.sampler = kv_pool, attention, sampler
        self.backend = attention.name
        self.block_size = kv_pool.block_size
        # This rank's heads, for the attention plan: query heads split evenly, KV heads as the pool's spec states.
        self.num_heads = model.config.num_attention_heads // ctx.world_size
        self.num_kv_heads = kv_pool.spec.num_kv_heads
        self.requests: dict[int, RequestState] = {}  # by handle

    def _apply_plan(self, plan: StepPlan, failed: dict[int, str]) -> None:
        """Bring the request states up to date with the plan's deltas. A delta that does not fit
        its request's state fails that request alone: its state is dropped and the reason goes
        into `failed` (by handle); every rank applies the same plan to the same states, so every
        rank drops the same requests and the batch stays the same on all."""
        for handle in plan.finished_handles:
            self.requests.pop(handle, None)
        requests = self.requests
        for new in plan.new_requests:
            requests[new.handle] = RequestState(
                new.handle, new.request_id, list(new.prompt_token_ids), list(new.output_token_ids), new.sampling_spec,
                list(new.block_ids), new.num_computed_tokens)
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
            else:
                state.block_ids.extend(delta.new_block_ids)
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

    def _state(self, handle: int, where: str, plan: StepPlan, failed: dict[int, str]) -> RequestState | None:
        state = self.requests.get(handle)
        if state is None and handle not in failed:
            failed[handle] = f"step {plan.step_id}: unknown request handle {handle} in {where}"
        return state

    def _fail(self, handle: int, error: str, failed: dict[int, str]) -> None:
        """Drop a request that cannot run (the controller ends it on hearing why)."""
        self.requests.pop(handle, None)
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

    def _prepare(self, plan: StepPlan, failed: dict[int, str]):
        """Flat input tensors and attention metadata for the scheduled requests, in plan order
        (those in `failed` left out, and any scheduled past its tokens or blocks failed too);
        None when no request is left."""
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
        num_reqs = len(states)
        query_lens_np = np.asarray(query_lens, dtype=np.int64)
        query_start_loc = np.zeros(num_reqs + 1, dtype=np.int64)
        np.cumsum(query_lens_np, out=query_start_loc[1:])
        computed = np.asarray([s.num_computed_tokens for s in states], dtype=np.int64)
        seq_lens = computed + query_lens_np
        max_blocks = max(len(s.block_ids) for s in states)
        block_tables = np.zeros((num_reqs, max_blocks), dtype=np.int64)
        for row, state in enumerate(states):
            block_tables[row, :len(state.block_ids)] = state.block_ids
        # positions[t] = computed tokens of t's request + t's offset within its query rows
        req_of_token = np.repeat(np.arange(num_reqs), query_lens_np)
        positions = computed[req_of_token] + np.arange(len(token_ids)) - query_start_loc[:-1][req_of_token]
        slots = block_tables[req_of_token, positions // self.block_size] * self.block_size + positions % self.block_size
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(self.device),
            block_tables=torch.from_numpy(block_tables).to(self.device),
            seq_lens=seq_lens.tolist(),
            query_start_loc=query_start_loc.tolist(),
            backend=self.attention,
            kv_caches=self.kv_pool.caches,
        )
        meta.plan = self.attention.plan(meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                        block_size=self.block_size, num_heads=self.num_heads,
                                        num_kv_heads=self.num_kv_heads)
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        # A request samples when this step computes its last known token.
        to_sample = [i for i, s in enumerate(states) if seq_lens[i] == s.num_tokens]
        return input_ids, torch.from_numpy(positions).to(self.device), meta, states, seq_lens, to_sample

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
        input_ids, positions, meta, states, seq_lens, to_sample = prepared
        hidden = self.model(input_ids, positions, meta)
        for state, seq_len in zip(states, seq_lens.tolist()):
            state.num_computed_tokens = seq_len
        if to_sample:
            last_rows = torch.tensor([meta.query_start_loc[i + 1] - 1 for i in to_sample], device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, last_rows))
            if logits is not None:  # rank 0
                rows = [SamplingRow(states[i].params, states[i].prompt_token_ids, states[i].output_token_ids)
                        for i in to_sample]
                out = self.sampler(logits, rows)
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
                # Every rank must know the sampled tokens: the next plan may name them by placeholder.
                shared = torch.tensor(sampled if logits is not None else [0] * len(to_sample), device=self.device)
                sampled = self.ctx.broadcast_from_first(shared).tolist()
            # A failed row's stand-in token too: a step already sent may name it by placeholder;
            # that step's result for the request is ignored, the controller having ended it.
            for i, token_id in zip(to_sample, sampled):
                states[i].last_sampled = token_id
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        result.forward_seconds = time.perf_counter() - started
        return result

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
            input_ids, positions, meta, _, _, _ = self._prepare(plan, failed)
            hidden = self.model(input_ids, positions, meta)
            logits = self.model.compute_logits(hidden)
        finally:
            for i in range(len(prompts)):
                self.requests.pop(SCRATCH_HANDLE - i, None)
        if logits is None:
            return None
        return list(logits.split([len(p) for p in prompts]))
