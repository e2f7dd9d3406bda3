"""Memory profiling of a worker: the dummy step that stands for the heaviest step the
scheduler may plan, and the arithmetic that turns device measurements into a KV budget.

Both are pure (no device access), so their contracts are tested on the CPU with made-up
numbers; `Worker.profile_memory` runs the step and takes the measurements.
"""
from __future__ import annotations

from quire.protos.step import NewRequestData, SamplingSpec, StepPlan

# Every sampler feature on, so the dummy rows allocate the temporaries of the sampler's
# heaviest path (penalty grids, the top-k/top-p sort, min-p, the noise draw, logprobs).
# top_k=1 enables top-k for any vocabulary of 2 or more tokens.
WORST_CASE_SAMPLING = SamplingSpec(temperature=1.0, top_p=0.9, top_k=1, min_p=0.05, logprobs=20,
                                   presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1)


def dummy_request_lengths(max_num_batched_tokens: int, max_model_len: int, max_num_seqs: int) -> list[int]:
    """Prompt lengths of the dummy step's requests, each computed whole (so each is sampled).

    Contract: every length is in `[1, max_model_len]` (a longer request would run past the
    rotary table and the positions a real request can reach); there are
    `min(max_num_seqs, max_num_batched_tokens)` requests, the most rows a step can sample
    (a sampled request computes at least one token); the lengths sum to
    `min(max_num_batched_tokens, max_num_seqs * max_model_len)`, the most tokens a step can
    hold. The first request is as long as the rest allow (up to max_model_len), so the step
    also holds the longest prefill attention; the rest share the remainder evenly.
    `max_num_seqs == 0` (a controller that predates the field) counts as 1.
    """
    if max_num_batched_tokens < 1 or max_model_len < 1 or max_num_seqs < 0:
        raise ValueError(f"no dummy step for max_num_batched_tokens={max_num_batched_tokens}, "
                         f"max_model_len={max_model_len}, max_num_seqs={max_num_seqs}")
    max_num_seqs = max(1, max_num_seqs)
    num_tokens = min(max_num_batched_tokens, max_num_seqs * max_model_len)
    num_requests = min(max_num_seqs, num_tokens)
    first = min(max_model_len, num_tokens - (num_requests - 1))
    rest, extra = divmod(num_tokens - first, num_requests - 1) if num_requests > 1 else (0, 0)
    return [first] + [rest + 1] * extra + [rest] * (num_requests - 1 - extra)


def dummy_step_plan(lengths: list[int], block_size: int) -> tuple[StepPlan, int]:
    """A first step computing every prompt of `lengths` whole (token 0 throughout) with
    `WORST_CASE_SAMPLING`, each request in its own consecutive blocks; and the number of KV
    blocks the plan uses (blocks `0..n-1`). Handles are 1..len(lengths)."""
    plan, next_block = StepPlan(step_id=0), 0
    for handle, length in enumerate(lengths, start=1):
        num_blocks = -(-length // block_size)
        plan.new_requests.append(NewRequestData(handle, f"__profile_{handle}", [0] * length, WORST_CASE_SAMPLING,
                                                list(range(next_block, next_block + num_blocks)), 0))
        plan.num_scheduled_tokens[handle] = length
        next_block += num_blocks
    return plan, next_block


def kv_cache_budget(total: int, free: int, peak_allocated: int, current_allocated: int, utilization: float) -> int:
    """Bytes of device memory this rank may give its KV cache (never negative).

    quire may use `utilization * total` bytes of the device in all. Not available to the KV
    cache out of that: what is in use now by anyone (`total - free`, measured after the
    dummy step with the allocator's cache emptied: the CUDA context, weights, NCCL buffers,
    allocator fragmentation, other processes), and the transient activation memory the
    dummy step needed beyond what it left allocated (`peak_allocated - current_allocated`,
    both read from the allocator, current right after the step). So

        budget = utilization * total - (total - free) - (peak_allocated - current_allocated)

    Arguments in bytes, from `torch.cuda.mem_get_info()` (free, total) and
    `torch.cuda.max_memory_allocated()` / `memory_allocated()`. ValueError on inconsistent
    measurements (free outside [0, total], a peak below current) or utilization outside (0, 1].
    """
    if not 0 <= free <= total or not 0 <= current_allocated <= peak_allocated:
        raise ValueError(f"inconsistent memory measurements: total={total} free={free} "
                         f"peak_allocated={peak_allocated} current_allocated={current_allocated}")
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1] (got {utilization})")
    used_by_anyone = total - free
    activation = peak_allocated - current_allocated
    return max(0, int(total * utilization) - used_by_anyone - activation)
