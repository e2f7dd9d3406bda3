"""Scheduler: token budget, max_num_seqs, chunked catch-up, recompute preemption, incremental plans."""
from quire.cluster.core.block_pool import BlockPool
from quire.cluster.core.config import SchedulerConfig
from quire.cluster.core.kv_cache_manager import KVCacheManager
from quire.cluster.core.request import Request, RequestStatus
from quire.cluster.core.scheduler import Scheduler
from quire.protos.step import PLACEHOLDER_TOKEN, SamplingParams, StepResult


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=16, prefix_caching=False, cpu_blocks=0,
                   preemption_mode="recompute", watermark=0.0):
    kv = KVCacheManager(BlockPool(num_blocks), block_size, enable_prefix_caching=prefix_caching,
                        cpu_pool=BlockPool(cpu_blocks) if cpu_blocks else None)
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                     admission_watermark=watermark), kv, preemption_mode=preemption_mode)


def add(scheduler, request_id, prompt_len, arrival, priority=0):
    request = Request(request_id, list(range(1, prompt_len + 1)), SamplingParams(temperature=0, max_tokens=100),
                      priority=priority, arrival_time=arrival)
    scheduler.add_request(request)
    return request


def scheduled(scheduler, plan):
    """The plan's tokens per request, by request id (the wire uses handles)."""
    return {scheduler.by_handle[h].request_id: n for h, n in plan.scheduled()}


def run_step(scheduler, token=7):
    """Schedule, then answer as rank 0 would: a token for each request that reached its end."""
    plan = scheduler.schedule()
    scheduler.check_integrity()
    sampled = [h for h, _ in plan.scheduled()
               if scheduler.by_handle[h].num_computed_tokens == scheduler.by_handle[h].num_tokens]
    scheduler.update_from_output(plan, StepResult(plan.step_id, sampled_handles=sampled,
                                                  sampled_token_ids=[token] * len(sampled)))
    scheduler.check_integrity()
    return plan


def test_budget_chunks_prompts_without_phases():
    s = make_scheduler(budget=16)
    add(s, "a", 10, 0.0)
    add(s, "b", 10, 1.0)
    add(s, "c", 10, 2.0)
    plan = run_step(s)
    assert scheduled(s, plan) == {"a": 10, "b": 6}
    assert [r.request_id for r in plan.new_requests] == ["a", "b"] and [r.handle for r in plan.new_requests] == [1, 2]
    assert plan.new_requests[0].block_ids == [0, 1, 2] and plan.new_requests[1].block_ids == [3, 4]
    # a decodes (1 token, a plain decode: its slot is in block 2) while b finishes its prompt (4)
    # and c starts (11 left in the budget → 10)
    plan = run_step(s)
    assert scheduled(s, plan) == {"a": 1, "b": 4, "c": 10}
    assert plan.decode_handles == [1] and plan.decode_token_ids == [7]
    assert [c.handle for c in plan.cached_requests] == [2]
    b_delta = plan.cached_requests[0]
    assert b_delta.new_token_ids == [] and b_delta.new_block_ids == [5] and b_delta.num_computed_tokens == 6
    assert s.requests["a"].output_token_ids == [7, 7] and s.requests["b"].output_token_ids == [7]


def test_max_num_seqs_caps_running_requests():
    s = make_scheduler(max_num_seqs=2, budget=100)
    for i in range(4):
        add(s, f"r{i}", 3, float(i))
    plan = run_step(s)
    assert list(scheduled(s, plan)) == ["r0", "r1"]
    r0 = s.requests["r0"].handle
    s.finish_request("r0", RequestStatus.FINISHED_STOPPED)
    s.check_integrity()
    plan = run_step(s)
    assert scheduled(s, plan) == {"r1": 1, "r2": 3}
    assert plan.finished_handles == [r0]


def test_preempts_latest_arrival_and_resumes_with_replaced_table():
    s = make_scheduler(num_blocks=4, block_size=4, budget=64)
    add(s, "old", 8, 0.0)
    add(s, "new", 8, 1.0)
    run_step(s)  # both prompts: 2 blocks each, the pool is full
    assert s.kv.pool.num_free_blocks == 0
    plan = run_step(s)  # tokens 9 fit in no block: "old" needs one, "new" (latest) is preempted
    assert scheduled(s, plan) == {"old": 1}
    assert s.requests["new"].status is RequestStatus.PREEMPTED and s.num_preemptions == 1
    assert s.kv.block_ids("old") == [0, 1, 3] and s.kv.block_ids("new") == []
    old = s.requests["old"].handle
    s.finish_request("old", RequestStatus.FINISHED_STOPPED)
    plan = run_step(s)
    delta = plan.cached_requests[0]
    assert delta.handle == s.requests["new"].handle and delta.replace_table
    assert delta.num_computed_tokens == 0 and scheduled(s, plan) == {"new": 9}
    assert delta.new_block_ids == s.kv.block_ids("new") and len(delta.new_block_ids) == 3
    assert delta.new_token_ids == [7], "the token sampled before preemption was never sent"
    assert plan.finished_handles == [old]


def test_lower_priority_value_is_served_first_and_preempted_last():
    s = make_scheduler(num_blocks=4, block_size=4, budget=64)
    add(s, "background", 8, 0.0, priority=5)
    add(s, "urgent", 8, 1.0, priority=0)
    plan = run_step(s)
    assert list(scheduled(s, plan)) == ["urgent", "background"]
    run_step(s)
    assert s.requests["background"].status is RequestStatus.PREEMPTED
    assert s.requests["urgent"].status is RequestStatus.RUNNING


def test_abort_frees_blocks_and_tells_workers_only_if_sent():
    s = make_scheduler(budget=4)
    add(s, "a", 4, 0.0)
    add(s, "b", 4, 1.0)
    run_step(s)
    a = s.requests["a"].handle
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    s.finish_request("b", RequestStatus.FINISHED_ABORTED)  # never scheduled, so workers never heard of it
    s.finish_request("b", RequestStatus.FINISHED_ABORTED)
    s.check_integrity()
    assert s.kv.num_used_blocks == 0
    plan = s.schedule()
    assert plan.finished_handles == [a] and not plan.num_scheduled_requests


def test_decode_plan_size_does_not_grow_with_context():
    def decode_plan_bytes(context):
        """Bytes of the decode step after which each of 256 requests holds `context` tokens."""
        s = make_scheduler(num_blocks=256 * (context // 16 + 2), block_size=16, max_num_seqs=256, budget=1 << 20)
        for i in range(256):
            add(s, f"request-{i:04d}", context - 1, float(i))
        run_step(s)  # prefill everything
        plan = run_step(s)
        assert plan.num_scheduled_requests == plan.total_num_scheduled_tokens == 256
        return len(plan.to_pb().SerializeToString())

    size = decode_plan_bytes(2000)
    assert decode_plan_bytes(100) == size
    assert size / 256 <= 32, f"{size / 256:.1f} bytes per running request in a decode plan"


def test_a_decode_planned_while_the_step_before_runs_names_its_token_in_one_byte():
    s = make_scheduler(num_blocks=256 * 8, block_size=16, max_num_seqs=256, budget=1 << 20)
    requests = [add(s, f"request-{i:04d}", 99, float(i)) for i in range(256)]
    prefill = s.schedule()
    decode = s.schedule()  # asynchronous scheduling: the prefill's tokens are still being sampled
    s.check_integrity()
    assert decode.decode_token_ids == [PLACEHOLDER_TOKEN] * 256 and not decode.cached_requests
    assert all(r.num_pending_tokens == 2 and r.num_computed_tokens == 100 for r in requests)
    assert len(decode.to_pb().SerializeToString()) / 256 <= 4  # zigzag varints: -1 is one byte
    for plan, token in ((prefill, 8), (decode, 9)):
        handles = [h for h, _ in plan.scheduled()]
        s.update_from_output(plan, StepResult(plan.step_id, sampled_handles=handles,
                                              sampled_token_ids=[token] * len(handles)))
        s.check_integrity()
    assert all(r.output_token_ids == [8, 9] and r.num_pending_tokens == 0 for r in requests)
    assert s.schedule().decode_token_ids == [9] * 256  # nothing in flight: the tokens are known


def test_plain_decode_that_starts_a_block_carries_only_that_block():
    s = make_scheduler(block_size=4)
    a = add(s, "a", 4, 0.0)
    add(s, "b", 2, 1.0)
    run_step(s)  # a fills block 0; b sits in block 1
    plan = run_step(s, token=9)  # a's 5th token starts a block, b's 3rd does not
    assert plan.decode_handles == [a.handle, a.handle + 1] and plan.decode_token_ids == [7, 7]
    assert plan.decode_block_handles == [a.handle] and plan.decode_block_ids == [2]
    assert not plan.cached_requests and not plan.new_requests and not plan.num_scheduled_tokens
    assert s.kv.block_ids("a") == [0, 2] and a.num_blocks_sent == 2 and a.output_token_ids == [7, 9]


def test_decode_gets_a_token_every_step_while_an_8k_prompt_prefills():
    s = make_scheduler(num_blocks=700, block_size=16, max_num_seqs=4, budget=512)
    chat = add(s, "chat", 20, 0.0)
    run_step(s)  # the chat request is decoding from now on
    add(s, "document", 8192, 1.0)
    steps = 0
    while s.requests["document"].num_computed_tokens < 8192:
        plan = run_step(s)
        steps += 1
        assert scheduled(s, plan)["chat"] == 1, f"step {steps}: the decode was starved"
        assert plan.total_num_scheduled_tokens <= 512
    assert steps == -(-8192 // 511), "the prompt took exactly the budget left after the decode, step by step"
    assert len(chat.output_token_ids) == steps + 1


def test_output_blocks_are_cached_for_a_later_turn_with_and_without_steps_in_flight():
    """A request's full blocks, outputs included, are found by the next request that repeats
    them (a chat's next turn): also the last one, which no later token opened a block after."""
    for depth in (1, 2):  # steps in flight: 1 synchronous, 2 asynchronous
        s = make_scheduler(block_size=4, prefix_caching=True)
        a = Request("a", [1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=13))
        s.add_request(a)
        in_flight, next_token = [], 100
        while s.requests:
            while len(in_flight) < depth and (plan := s.schedule()).has_work:
                in_flight.append(plan)
                s.check_integrity()
            plan = in_flight.pop(0)
            # Every plan computes up to a's last token (the prompt fits the budget): it samples.
            sampled = [h for h, _ in plan.scheduled()]
            for request in s.update_from_output(plan, StepResult(plan.step_id, sampled_handles=sampled,
                                                                 sampled_token_ids=[next_token] * len(sampled))):
                next_token += 1
                if len(request.output_token_ids) == 13:
                    s.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
            s.check_integrity()
        assert a.output_token_ids == list(range(100, 113))
        turn = Request("b", a.prompt_token_ids + a.output_token_ids + [5], SamplingParams(temperature=0, max_tokens=1))
        num_hit = s.kv.get_computed_blocks(turn).num_tokens
        # 16 tokens computed (the last sampled one never is): 4 full blocks, whatever was in flight.
        assert num_hit == 16, (depth, num_hit)


def test_admission_leaves_the_watermark_free_while_others_run():
    s = make_scheduler(num_blocks=20, block_size=4, budget=80, watermark=0.1)  # 2 blocks kept free
    a = add(s, "a", 24, 0.0)                    # alone: takes 6 blocks
    b = add(s, "b", 40, 1.0)                    # 10 blocks would leave 4 free: admitted
    c = add(s, "c", 9, 2.0)                     # 3 blocks would leave 1 < 2 free: waits
    run_step(s)
    assert s.kv.block_ids("a") == [0, 1, 2, 3, 4, 5] and s.kv.block_ids("b") == list(range(6, 16))
    assert s.running == [a, b] and s.waiting == [c] and s.kv.pool.num_free_blocks == 4
    run_step(s)
    assert s.waiting == [c] and s.num_preemptions == 0
    for request_id in ("a", "b", "c"):
        s.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
    s.check_integrity()
    d = add(s, "d", 80, 3.0)                    # all 20 blocks: admissible, nothing else running
    run_step(s)
    assert s.running == [d] and s.kv.pool.num_free_blocks == 0
