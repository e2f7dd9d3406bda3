"""Continuous batching with a token budget: no prefill/decode phases.

Each step every scheduled request's `num_computed_tokens` catches up toward its
`num_tokens` by as many tokens as the budget allows: a waiting prompt gets a chunk
(chunked prefill falls out), a running request gets its one new token. Running
requests go first, in order of service; waiting ones are admitted while the budget,
`max_num_seqs` and free blocks allow (leaving `admission_watermark` of the blocks free
while others run, for their next tokens). When a running request cannot get a block, the
lowest-priority, latest-arrived running request is preempted: by recompute (its blocks
are freed) or, in swap mode while the CPU pool has room, by swapping its blocks out to
the workers' CPU pool; either way it returns to the head of the waiting queue.

Admission looks up the longest cached prefix of a request's tokens first (prefix
caching, on the device and, with a host tier, in host memory: those blocks are copied back
by the step's swap-ins), so only the rest is computed. A sample of a parallel-sampling group (`fork_of`)
waits until its leader has computed the shared prompt, then forks the leader's blocks
(shared, ref-counted) and recomputes only the last prompt token, to sample its own
first token; the shared partial block is copied on first write (copy-on-write).

Asynchronous scheduling: `schedule` may be called again before the last plan's result
is in (`update_from_output`). Each request counts the tokens steps in flight will sample
for it (`num_pending_tokens`); their positions count as tokens to compute, and the
plan names a token not yet known by `PLACEHOLDER_TOKEN`. A request is never planned to
sample past its `max_num_tokens`, and a preempted request waits for its pending token
before it is admitted again.
"""
from __future__ import annotations

import bisect
import logging

from quire.cluster.core.config import SchedulerConfig
from quire.cluster.core.kv_cache_manager import KVCacheManager
from quire.cluster.core.request import Request, RequestStatus
from quire.protos.step import (PLACEHOLDER_TOKEN, CachedRequestData, NewRequestData, SamplingSpec, StepPlan,
                               StepResult)

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, preemption_mode: str = "recompute"):
        if preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"`preemption_mode` must be 'recompute' or 'swap' (got {preemption_mode!r})")
        self.config, self.kv, self.preemption_mode = config, kv, preemption_mode
        self.waiting: list[Request] = []  # sorted by Request.sort_key
        self.running: list[Request] = []  # sorted by Request.sort_key; the tail is preempted first
        self.requests: dict[str, Request] = {}
        self.by_handle: dict[int, Request] = {}
        self._next_handle = 1
        self._finished_handles: list[int] = []  # to tell the workers in the next plan
        self._step_id = 0
        self.num_preemptions = 0
        self.num_swapped_out = 0

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
        """End a request (stop, length, abort, error): free its blocks and tell the workers.
        Idempotent. The blocks of a request ended by an error are not offered to the prefix cache."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        del self.by_handle[request.handle]
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        if status is not RequestStatus.FINISHED_ERROR:  # a failed request's KV is not trusted
            self.kv.cache_computed_blocks(request)  # a later request may share its prefix (a chat's next turn)
        self.kv.free(request_id)
        if request.num_tokens_sent:
            self._finished_handles.append(request.handle)
        return request

    def forget_worker_state(self) -> None:
        """The workers were replaced and hold nothing: every live request goes back to the
        waiting queue to be recomputed from its tokens (prompt and outputs so far), as if
        preempted, and the KV cache manager starts empty. Mutates every request and queue."""
        self.kv.reset()
        self._finished_handles = []
        for request in self.running + self.waiting:
            request.status = RequestStatus.PREEMPTED
            request.num_computed_tokens = request.num_tokens_sent = request.num_blocks_sent = 0
            request.num_pending_tokens = 0  # the steps in flight are lost with the workers
            request.fork_of, request.cow_block = None, None
        self.waiting = sorted(self.running + self.waiting, key=lambda r: r.sort_key)
        self.running = []

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        swaps = self.kv.swap_out(request.request_id) if self.preemption_mode == "swap" else None
        if swaps is not None:
            plan.swap_out.extend(swaps)
            request.status = RequestStatus.SWAPPED
            self.num_swapped_out += 1
        else:  # recompute (also the fallback when the CPU pool is full)
            self.kv.cache_computed_blocks(request)  # what it finds again on resumption, unless evicted
            self.kv.free(request.request_id, forget=False)
            request.status = RequestStatus.PREEMPTED
            request.num_computed_tokens = 0
        request.num_blocks_sent = 0  # the workers get a whole new table on resumption
        request.fork_of, request.cow_block = None, None
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)
        logger.debug("preempted %s (%s)", request.request_id, request.status.value)

    def _add_to_plan(self, plan: StepPlan, request: Request, num_new_tokens: int) -> None:
        """Put the request in the plan with what the workers do not know yet: all of it the
        first time (it then has no pending token), else the tokens since the last plan, the
        pending one (at most one: the step in flight's) as a placeholder."""
        table = self.kv.block_ids(request.request_id)
        num_tokens = request.num_tokens + request.num_pending_tokens
        if request.num_tokens_sent == 0:
            plan.new_requests.append(NewRequestData(
                request.handle, request.request_id, request.prompt_token_ids,
                SamplingSpec.from_params(request.sampling_params), list(table), request.num_computed_tokens,
                list(request.output_token_ids)))
        else:
            new_tokens = request.tokens_from(request.num_tokens_sent) + [PLACEHOLDER_TOKEN] * request.num_pending_tokens
            plan.cached_requests.append(CachedRequestData(
                request.handle, new_tokens, table[request.num_blocks_sent:],
                request.num_computed_tokens, replace_table=request.num_blocks_sent == 0))
        request.num_tokens_sent = num_tokens
        request.num_blocks_sent = len(table)
        plan.num_scheduled_tokens[request.handle] = num_new_tokens
        request.num_computed_tokens += num_new_tokens
        if request.num_computed_tokens == num_tokens:
            request.num_pending_tokens += 1  # the step samples its next token

    def schedule(self) -> StepPlan:
        """Choose this step's tokens and allocate their blocks. Mutates queues, block tables,
        `num_computed_tokens` (advanced as if the step succeeds) and `num_pending_tokens`
        (one more for each request whose next token this step samples)."""
        self._step_id += 1
        plan = StepPlan(step_id=self._step_id, finished_handles=self._finished_handles)
        self._finished_handles = []
        budget = self.config.max_num_batched_tokens
        block_size = self.kv.block_size
        # Bound methods, looked up once: this loop runs for every running request every step.
        add_decode, add_decode_token = plan.decode_handles.append, plan.decode_token_ids.append
        preemptions_before = self.num_preemptions
        # Preemption pops from the tail, which this iteration has not reached (or is at: then it stops).
        for request in self.running:
            if budget <= 0:
                break
            pending = request.num_pending_tokens
            # Hot loop: no property calls. Pending tokens count: their KV can be computed now.
            num_tokens = len(request.prompt_token_ids) + len(request.output_token_ids) + pending
            num_computed = request.num_computed_tokens
            if num_computed == num_tokens - 1 == request.num_tokens_sent and request.cow_block is None:
                # The plain decode: the workers hold the request's whole table (num_blocks_sent
                # blocks) and every token but the last sampled one.
                if num_tokens >= request.max_num_tokens:
                    continue  # its last token is on its way: nothing is left to compute
                if num_tokens > request.num_blocks_sent * block_size:  # the token opens a block
                    block = self._allocate_preempting(request, plan, lambda: self.kv.append_block(request))
                    if block is None:
                        break
                    plan.decode_block_handles.append(request.handle)
                    plan.decode_block_ids.append(block)
                    request.num_blocks_sent += 1
                add_decode(request.handle)
                add_decode_token(PLACEHOLDER_TOKEN if pending else request.output_token_ids[-1])
                request.num_tokens_sent = request.num_computed_tokens = num_tokens
                request.num_pending_tokens = pending + 1
                budget -= 1
                continue
            num_new = min(num_tokens - num_computed, budget)
            if num_new <= 0 or (num_computed + num_new == num_tokens and num_tokens >= request.max_num_tokens):
                continue  # nothing to compute, or only a token past its limit to sample
            if num_computed + num_new > request.num_blocks_sent * block_size or request.cow_block is not None:
                cow = request.cow_block is not None
                copies: list[tuple[int, int]] = []
                if self._allocate_preempting(request, plan, lambda: self.kv.allocate_slots(
                        request, num_computed + num_new, write_from=num_computed if cow else None, copies=copies)) is None:
                    break
                if copies:  # a block in the middle of the table was replaced
                    plan.block_copies.extend(copies)
                    request.num_blocks_sent = 0
                if cow and num_computed + num_new > (request.cow_block + 1) * block_size:
                    request.cow_block = None  # writes moved past the block it shared
            self._add_to_plan(plan, request, num_new)
            budget -= num_new

        # Admitting new work while blocks are so short that a running request was just
        # preempted would only thrash.
        while (self.num_preemptions == preemptions_before and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            if request.num_pending_tokens:
                break  # preempted while a step sampled for it: resumes once that token is in
            if request.status is RequestStatus.SWAPPED:
                num_new = min(request.num_tokens - request.num_computed_tokens, budget)
                swaps = self.kv.swap_in(request, request.num_computed_tokens + num_new)
                if swaps is None:
                    break
                plan.swap_in.extend(swaps)
            elif request.fork_of is not None and self._can_fork(request, plan):
                if not self._fork(request, plan):
                    break
                num_new = 1
            else:
                if request.fork_of is not None:
                    if request.fork_of.status is RequestStatus.WAITING or request.fork_of.status is RequestStatus.RUNNING:
                        break  # its leader is still computing the shared prompt: wait for it
                    request.fork_of = None  # the leader is gone or preempted: start on its own
                hit = self.kv.get_computed_blocks(request)
                num_new = min(request.num_tokens - hit.num_tokens, budget)
                if self.kv.allocate_slots(request, hit.num_tokens + num_new, hit,
                                          keep_free=self._admission_watermark()) is None:
                    break
                self.kv.record_lookup(request.num_tokens, hit)
                request.num_computed_tokens = hit.num_tokens
            self.waiting.pop(0)
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=lambda r: r.sort_key)
            self._add_to_plan(plan, request, num_new)
            budget -= num_new
        offloads, loads = self.kv.end_step()  # the host tier's copies: before the forward pass, like swaps
        plan.swap_out.extend(offloads)
        plan.swap_in.extend(loads)
        return plan

    def _admission_watermark(self) -> int:
        """Blocks a new request must leave free, for the running requests' next tokens: admitting
        into the last blocks would only preempt someone a few steps later. 0 with nothing running."""
        return int(self.kv.pool.num_blocks * self.config.admission_watermark) if self.running else 0

    def _allocate_preempting(self, request: Request, plan: StepPlan, allocate):
        """`allocate()`'s result once it is not None, preempting the running request at the
        tail each time it is (a failed `allocate` changes nothing); None once `request`
        itself was the one preempted."""
        while (allocated := allocate()) is None:
            victim = self.running.pop()
            self._preempt(victim, plan)
            if victim is request:
                return None
        return allocated

    def _can_fork(self, request: Request, plan: StepPlan) -> bool:
        """Whether the leader holds its whole prompt's KV, computed by an earlier step (the
        copies of a fork run before this step's forward pass). A leader's plain decode this
        step is counted as one token, whether it got one or not: at worst the fork waits."""
        leader = request.fork_of
        if leader.status is not RequestStatus.RUNNING:
            return False
        computed_before = leader.num_computed_tokens - plan.num_scheduled_tokens.get(leader.handle, 1)
        return computed_before >= len(leader.prompt_token_ids)

    def _fork(self, request: Request, plan: StepPlan) -> bool:
        """Share the leader's prompt blocks; recompute the last prompt token (copying the block it
        lands in) to sample this request's own first token. False, changing nothing, without blocks."""
        leader, prompt_len = request.fork_of, len(request.prompt_token_ids)
        self.kv.fork(request.request_id, leader.request_id, prompt_len)
        copies: list[tuple[int, int]] = []
        if self.kv.allocate_slots(request, prompt_len, write_from=prompt_len - 1, copies=copies) is None:
            self.kv.free(request.request_id, forget=False)
            return False
        plan.block_copies.extend(copies)
        request.num_computed_tokens = prompt_len - 1
        request.fork_of = None
        if prompt_len % self.kv.block_size and leader.cow_block is None:
            leader.cow_block = (prompt_len - 1) // self.kv.block_size  # its next token lands in the shared block
        return True

    def update_from_output(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Append each sampled token to its request (its logprobs become the request's
        `latest_logprobs`), for those still alive (a request preempted meanwhile takes its
        token too: it was sampled from the right context). Returns the updated requests, whose last output token is the new one, for
        the engine's stop checks; requests that finished or were aborted meanwhile are skipped."""
        updated = []
        by_handle, logprobs = self.by_handle, result.logprobs
        for handle, token_id in zip(result.sampled_handles, result.sampled_token_ids):
            request = by_handle.get(handle)
            if request is None:
                continue
            if not request.num_pending_tokens:
                raise RuntimeError(f"step {plan.step_id}: worker sampled {request.request_id!r}, "
                                   "which awaits no token")
            request.num_pending_tokens -= 1
            request.output_token_ids.append(token_id)
            sampled = logprobs.get(handle) if logprobs else None
            request.latest_logprobs = None if sampled is None else {token_id: sampled.logprob, **sampled.top_logprobs}
            updated.append(request)
        return updated

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        live = {r.request_id for r in self.running} | {r.request_id for r in self.waiting}
        assert live == set(self.requests), "queues and request map disagree"
        assert {r.handle for r in self.requests.values()} == set(self.by_handle), "handles disagree"
        assert set(self.kv.tables) <= {r.request_id for r in self.running}, "a non-running request holds blocks"
        assert all(r.num_blocks_sent == len(self.kv.block_ids(r.request_id)) for r in self.running), \
            "the workers do not hold a running request's table as it is"
        swapped = {r.request_id for r in self.waiting if r.status is RequestStatus.SWAPPED}
        assert set(self.kv.cpu_tables) == swapped, "CPU blocks held by other than swapped-out requests"
        assert len(self.running) <= self.config.max_num_seqs
        assert all(0 <= r.num_pending_tokens <= 2 for r in self.running), "more tokens pending than steps in flight"
        assert all(0 <= r.num_pending_tokens <= 1 for r in self.waiting), "a waiting request awaits tokens"
