"""Memory profiling: the KV budget formula on made-up device numbers (there is no GPU here),
the dummy step's shape (no request past max_model_len, max_num_seqs sampled rows), the dummy
step itself on the CPU, and an engine whose token budget exceeds max_model_len starting."""
import pytest
import torch

from quire.cluster import LLM, SamplingParams
from quire.cluster.executor.base import Executor, WorkerSetup
from quire.protos import worker_pb2 as pb
from quire.worker.memory_profile import dummy_request_lengths, dummy_step_plan, kv_cache_budget
from quire.worker.worker import DEFAULT_CPU_KV_CACHE_BYTES, Worker

GiB = 1 << 30


def test_budget_is_the_allowed_share_less_what_anyone_uses_less_the_activation_peak():
    # 80 GiB device, 90% allowed = 72 GiB; 20 GiB in use after the step (context, weights,
    # NCCL, another process); the step peaked 1.5 GiB above what it left allocated.
    budget = kv_cache_budget(total=80 * GiB, free=60 * GiB, peak_allocated=18 * GiB, current_allocated=33 * GiB // 2,
                             utilization=0.9)
    assert budget == 72 * GiB - 20 * GiB - 3 * GiB // 2


def test_memory_used_by_others_comes_out_of_the_budget_byte_for_byte():
    alone = kv_cache_budget(80 * GiB, 60 * GiB, 2 * GiB, GiB, 0.9)
    shared = kv_cache_budget(80 * GiB, 50 * GiB, 2 * GiB, GiB, 0.9)
    assert alone - shared == 10 * GiB


def test_budget_is_never_negative():
    assert kv_cache_budget(80 * GiB, 5 * GiB, 10 * GiB, GiB, 0.5) == 0


@pytest.mark.parametrize("total, free, peak, current, utilization", [
    (80, 81, 2, 1, 0.9),   # more free than the device has
    (80, -1, 2, 1, 0.9),
    (80, 60, 1, 2, 0.9),   # a peak below what is allocated
    (80, 60, 2, 1, 0.0),
    (80, 60, 2, 1, 1.5),
])
def test_inconsistent_measurements_are_refused(total, free, peak, current, utilization):
    with pytest.raises(ValueError):
        kv_cache_budget(total, free, peak, current, utilization)


@pytest.mark.parametrize("budget, max_model_len, max_num_seqs, expected", [
    (2048, 1024, 256, None),            # the case: budget above max_model_len
    (2048, 1024, 1, [1024]),            # one request can hold no more than max_model_len
    (8, 1024, 256, [1] * 8),            # a step samples at most one row per token
    (5000, 1024, 4, [1024] * 4),        # max_num_seqs full-length requests are the most a step holds
    (100, 64, 0, [64]),                 # an older controller (0) profiles one row
    (10, 4, 3, [4, 3, 3]),
])
def test_dummy_requests_fit_max_model_len_and_sample_max_num_seqs_rows(budget, max_model_len, max_num_seqs,
                                                                      expected):
    lengths = dummy_request_lengths(budget, max_model_len, max_num_seqs)
    if expected is not None:
        assert lengths == expected
    assert all(1 <= n <= max_model_len for n in lengths)
    assert len(lengths) == min(max(1, max_num_seqs), budget)
    assert sum(lengths) == min(budget, max(1, max_num_seqs) * max_model_len)


def test_dummy_request_contract_holds_over_a_grid():
    for budget in range(1, 40):
        for max_model_len in range(1, 12):
            for max_num_seqs in range(1, 12):
                lengths = dummy_request_lengths(budget, max_model_len, max_num_seqs)
                assert len(lengths) == min(max_num_seqs, budget)
                assert all(1 <= n <= max_model_len for n in lengths)
                assert sum(lengths) == min(budget, max_num_seqs * max_model_len)
                assert lengths[0] == max(lengths), "the longest prefill is in the step"


def test_dummy_plan_gives_each_request_its_own_blocks():
    plan, num_blocks = dummy_step_plan([5, 16, 1], block_size=4)
    tables = [new.block_ids for new in plan.new_requests]
    assert tables == [[0, 1], [2, 3, 4, 5], [6]] and num_blocks == 7
    assert [n for _, n in plan.scheduled()] == [5, 16, 1]
    assert all(new.num_computed_tokens == 0 for new in plan.new_requests)


@pytest.fixture(scope="module")
def cpu_worker(tiny_checkpoint):
    worker = Worker(torch.device("cpu"))
    worker.load_model(pb.LoadModelRequest(model_path=str(tiny_checkpoint("llama-gqa4")), dtype="float32", rank=0,
                                          world_size=1, max_model_len=64))
    return worker


def test_dummy_step_runs_a_budget_above_max_model_len_on_the_cpu(cpu_worker):
    lengths, sampled_rows, allocated_after = cpu_worker.dummy_step(block_size=16, max_num_batched_tokens=200,
                                                                   max_num_seqs=8)
    assert max(lengths) == 64 and sum(lengths) == 200 and len(lengths) == 8
    assert sampled_rows == 8 and allocated_after == 0
    assert cpu_worker.runner is None, "profiling leaves the serving state alone"


def test_cpu_profile_runs_the_dummy_step_and_keeps_the_default_budget(cpu_worker):
    request = pb.ProfileMemoryRequest(block_size=16, max_num_batched_tokens=300, max_num_seqs=5,
                                      gpu_memory_utilization=0.9)
    profile = cpu_worker.profile_memory(request)
    assert profile.num_blocks == DEFAULT_CPU_KV_CACHE_BYTES // profile.bytes_per_block
    assert profile.dummy_sampled_rows == 5 and profile.total_memory_bytes == 0


def test_an_explicit_budget_skips_the_dummy_step(cpu_worker, monkeypatch):
    monkeypatch.setattr(cpu_worker, "dummy_step", lambda *args: pytest.fail("the dummy step ran"))
    profile = cpu_worker.profile_memory(pb.ProfileMemoryRequest(block_size=16, max_num_batched_tokens=300,
                                                                max_num_seqs=5, kv_cache_memory_bytes=4 << 20))
    assert profile.num_blocks == (4 << 20) // profile.bytes_per_block


class RecordingExecutor(Executor):
    """Answers every call with a default response and keeps the requests."""

    def __init__(self):
        super().__init__()
        self.requests: dict[str, list] = {}

    def _call_all(self, method, requests):
        self.requests[method] = requests
        if method == "ProfileMemory":
            return [pb.ProfileMemoryResponse(num_blocks=10, bytes_per_block=1)]
        return [getattr(pb, f"{method}Response")()]


def test_the_executor_sends_max_num_seqs_to_the_profiling_workers():
    executor = RecordingExecutor()
    executor.start(WorkerSetup(model_path="m", dtype="float32", seed=0, max_model_len=64, block_size=16,
                               max_num_batched_tokens=256, kv_cache_memory=0, gpu_memory_utilization=0.9,
                               num_kv_blocks=None, max_num_seqs=7))
    [profile] = executor.requests["ProfileMemory"]
    assert profile.max_num_seqs == 7 and profile.max_num_batched_tokens == 256


def test_an_engine_with_a_token_budget_above_max_model_len_starts_and_serves(tiny_checkpoint):
    llm = LLM(model=str(tiny_checkpoint("llama-gqa4")), dtype="float32", max_model_len=64,
              max_num_batched_tokens=256, max_num_seqs=16)
    [output] = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                            use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 4


@pytest.mark.parametrize("name, dtype", [("", torch.float32), ("auto", torch.float32), ("int8", torch.int8),
                                         ("fp8_e4m3", torch.float8_e4m3fn)])
def test_load_model_takes_the_kv_cache_dtype_and_profiling_sizes_blocks_by_it(name, dtype, tiny_checkpoint):
    worker = Worker(torch.device("cpu"))
    worker.load_model(pb.LoadModelRequest(model_path=str(tiny_checkpoint("llama-gqa4")), dtype="float32", rank=0,
                                          world_size=1, max_model_len=64, kv_cache_dtype=name))
    spec = worker.kv_spec
    assert spec.dtype == dtype
    profile = worker.profile_memory(pb.ProfileMemoryRequest(block_size=16, max_num_batched_tokens=64,
                                                            max_num_seqs=2, kv_cache_memory_bytes=4 << 20))
    per_value = 4 if dtype == torch.float32 else 1
    scale = 0 if dtype == torch.float32 else 2
    assert profile.bytes_per_block == 2 * spec.num_layers * 16 * spec.num_kv_heads * (spec.head_size * per_value
                                                                                         + scale)
    assert profile.num_blocks == (4 << 20) // profile.bytes_per_block


def test_load_model_refuses_an_unknown_kv_cache_dtype_before_loading(tiny_checkpoint):
    worker = Worker(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"`kv_cache_dtype` must be one of auto, int8, fp8_e4m3 \(got 'fp8'\)"):
        worker.load_model(pb.LoadModelRequest(model_path=str(tiny_checkpoint("llama-gqa4")), dtype="float32",
                                              rank=0, world_size=1, max_model_len=64, kv_cache_dtype="fp8"))
    assert worker.model is None


@pytest.mark.parametrize("mode, kv_host_memory, host_bytes", [
    ("recompute", 0, 0), ("swap", 0, 3 << 20), ("recompute", 5 << 20, 5 << 20), ("swap", 5 << 20, 8 << 20)])
def test_the_engine_sends_the_cache_dtype_and_one_host_pool(mode, kv_host_memory, host_bytes, tiny_checkpoint):
    """The host pool the workers allocate is the swap space (in swap mode) plus the host tier's."""
    from quire.cluster.core.config import EngineConfig
    from quire.cluster.core.engine import Engine

    class HostPoolExecutor(RecordingExecutor):
        def _call_all(self, method, requests):
            responses = super()._call_all(method, requests)
            if method == "AllocateKVCache":  # a few host blocks when any host memory is asked for
                return [pb.AllocateKVCacheResponse(num_cpu_blocks=4 if requests[0].swap_space_bytes else 0)]
            return responses

    executor = HostPoolExecutor()
    config = EngineConfig.from_kwargs(model=str(tiny_checkpoint("llama-gqa4")), dtype="float32", max_model_len=64,
                                      kv_cache_dtype="int8", preemption_mode=mode, swap_space=3 << 20,
                                      kv_host_memory=kv_host_memory)
    engine = Engine(config, executor=executor)
    [load] = executor.requests["LoadModel"]
    [allocate] = executor.requests["AllocateKVCache"]
    assert load.kv_cache_dtype == "int8" and allocate.swap_space_bytes == host_bytes
    assert (engine.kv.cpu_pool is not None) == (host_bytes > 0)
    assert engine.kv.host_tier == (kv_host_memory > 0)


def test_a_host_tier_too_small_for_one_block_is_refused(tiny_checkpoint):
    from quire.cluster.core.config import EngineConfig
    from quire.cluster.core.engine import Engine

    executor = RecordingExecutor()  # every rank answers: no host block fits
    config = EngineConfig.from_kwargs(model=str(tiny_checkpoint("llama-gqa4")), dtype="float32", max_model_len=64,
                                      kv_host_memory=100)
    with pytest.raises(ValueError, match="`kv_host_memory` \\(100 bytes\\) holds no KV block"):
        Engine(config, executor=executor)
    assert "Shutdown" in executor.requests, "the workers are shut down"
