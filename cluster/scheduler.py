"""Continuous batching with a token budget: no prefill/decode phases.

Each step every scheduled request's `num_computed_tokens` catches up toward its
`num_tokens` by as many tokens as the budget allows: a waiting prompt gets a chunk
(chunked prefill falls out), a running request gets its one new token. Running
requests go first, in order of service; waiting ones are admitted while the budget,
`max_num_seqs` and free blocks allow. When a running request cannot get a block, the
lowest-priority, latest-arrived running request is preempted by recompute: its blocks
are freed and it returns to the head of the waiting queue.
"""
from __future__ import annotations

import bisect
import logging

from quire.cluster.config import SchedulerConfig
from quire.cluster.kv_cache_manager import KVCacheManager
from quire.cluster.request import Request, RequestStatus
from quire.protos.step import CachedRequestData, NewRequestData, StepPlan, StepResult

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config, self.kv = config, kv
        self.waiting: list[Request] = []  # sorted by Request.sort_key
        self.running: list[Request] = []  # sorted by Request.sort_key; the tail is preempted first
        self.requests: dict[str, Request] = {}
        self.by_handle: dict[int, Request] = {}
        self._next_handle = 1
        self._finished_handles: list[int] = []  # to tell the workers in the next plan
        self._step_id = 0
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add_request(self, request: Request) -> None:
        """Queue a request and give it its wire handle (unique while the scheduler lives)."""
        request.handle, self._next_handle = self._next_handle, self._next_handle + 1
        self.requests[request.request_id] = request
        self.by_handle[request.handle] = request
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request (stop, length, abort): free its blocks and tell the workers. Idempotent."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        del self.by_handle[request.handle]
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request_id)
        if request.num_tokens_sent:
            self._finished_handles.append(request.handle)
        return request

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_blocks_sent = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)
        logger.debug("preempted %s (recompute)", request.request_id)

    def _add_to_plan(self, plan: StepPlan, request: Request, num_new_tokens: int) -> None:
        table = self.kv.block_ids(request.request_id)
        if request.num_tokens_sent == 0:
            plan.new_requests.append(NewRequestData(
                request.handle, request.request_id, request.prompt_token_ids, request.sampling_params, list(table),
                request.num_computed_tokens, list(request.output_token_ids)))
        else:
            plan.cached_requests.append(CachedRequestData(
                request.handle, request.tokens_from(request.num_tokens_sent), table[request.num_blocks_sent:],
                request.num_computed_tokens, resumed_from_preemption=request.num_blocks_sent == 0))
        request.num_tokens_sent = request.num_tokens
        request.num_blocks_sent = len(table)
        plan.num_scheduled_tokens[request.handle] = num_new_tokens
        request.num_computed_tokens += num_new_tokens

    def schedule(self) -> StepPlan:
        """Choose this step's tokens and allocate their blocks. Mutates queues, block tables,
        and `num_computed_tokens` (advanced as if the step succeeds)."""
        self._step_id += 1
        plan = StepPlan(step_id=self._step_id, finished_handles=self._finished_handles)
        self._finished_handles = []
        budget = self.config.max_num_batched_tokens
        block_size = self.kv.block_size
        decode_handles, decode_token_ids = plan.decode_handles, plan.decode_token_ids
        preempted = False
        # Preemption pops from the tail, which this iteration has not reached (or is at: then it stops).
        for request in self.running:
            if budget <= 0:
                break
            num_tokens = len(request.prompt_token_ids) + len(request.output_token_ids)  # hot loop: no property call
            num_computed = request.num_computed_tokens
            num_new = num_tokens - num_computed
            if num_new > budget:
                num_new = budget
            elif num_new <= 0:
                continue
            # A running request's table is exactly what the workers hold (num_blocks_sent
            # blocks), so most steps need no allocation at all.
            new_blocks = None
            if num_computed + num_new > request.num_blocks_sent * block_size:
                while (new_blocks := self.kv.allocate_slots(request.request_id, num_computed + num_new)) is None:
                    victim = self.running.pop()
                    self._preempt(victim)
                    preempted = True
                    if victim is request:
                        break
                if request.status is RequestStatus.PREEMPTED:
                    break
            if num_new == 1 and num_computed == request.num_tokens_sent == num_tokens - 1 and request.num_blocks_sent:
                # The plain decode: the workers know every token but the last sampled one.
                decode_handles.append(request.handle)
                decode_token_ids.append(request.output_token_ids[-1])
                if new_blocks:
                    plan.decode_block_handles.append(request.handle)
                    plan.decode_block_ids.extend(new_blocks)  # one token needs at most one new block
                    request.num_blocks_sent += 1
                request.num_tokens_sent = request.num_computed_tokens = num_tokens
            else:
                self._add_to_plan(plan, request, num_new)
            budget -= num_new

        # Admitting new work while blocks are so short that a running request was just
        # preempted would only thrash.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if self.kv.allocate_slots(request.request_id, request.num_computed_tokens + num_new) is None:
                break
            self.waiting.pop(0)
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=lambda r: r.sort_key)
            self._add_to_plan(plan, request, num_new)
            budget -= num_new
        return plan

    def update_from_output(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Append each sampled token (and its logprobs) to its request, for those still alive.
        Returns the updated requests, whose last output token is the new one, for the engine's
        stop checks; requests that finished or were aborted meanwhile are skipped."""
        updated = []
        by_handle, running, logprobs = self.by_handle, RequestStatus.RUNNING, result.logprobs
        for handle, token_id in zip(result.sampled_handles, result.sampled_token_ids):
            request = by_handle.get(handle)
            if request is None or request.status is not running:
                continue
            if request.num_computed_tokens != len(request.prompt_token_ids) + len(request.output_token_ids):
                raise RuntimeError(f"step {plan.step_id}: worker sampled {request.request_id!r} mid-prompt")
            request.output_token_ids.append(token_id)
            if logprobs and handle in logprobs:
                sampled = logprobs[handle]
                request.output_logprobs.append({token_id: sampled.logprob, **sampled.top_logprobs})
            updated.append(request)
        return updated

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        live = {r.request_id for r in self.running} | {r.request_id for r in self.waiting}
        assert live == set(self.requests), "queues and request map disagree"
        assert {r.handle for r in self.requests.values()} == set(self.by_handle), "handles disagree"
        assert set(self.kv.tables) <= {r.request_id for r in self.running}, "a non-running request holds blocks"
        assert all(r.num_blocks_sent <= len(self.kv.block_ids(r.request_id)) for r in self.running), \
            "the workers were sent blocks the request no longer holds"
        assert len(self.running) <= self.config.max_num_seqs
