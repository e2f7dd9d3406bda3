"""Tensor parallelism across worker processes: parity with HF at tp 1/2/4 through Ray and
through standalone gRPC workers (gloo on the CPU), and a killed worker failing requests
fast instead of hanging them."""
import contextlib
import os
import signal
import threading
import time
from contextlib import contextmanager

import pytest
import torch
import transformers

from quire.cluster import LLM, SamplingParams
from quire.cluster.executor.base import WorkerFailure
from quire.cluster.executor.local_launcher import LocalWorkerLauncher

PROMPTS = [[(13 * i + 3 * j) % 2000 + 3 for j in range(2 + 9 * i)] for i in range(6)]
NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def tp_checkpoint(tiny_checkpoint):
    """2 KV heads (replicated at tp=4) and a vocabulary of 2051 (not divisible by 4)."""
    return tiny_checkpoint("llama-tp")


@pytest.fixture(scope="module")
def hf_tokens(tp_checkpoint):
    model = transformers.AutoModelForCausalLM.from_pretrained(tp_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@contextmanager
def llm_on_local_workers(checkpoint, tp, **kwargs):
    """An LLM over `tp` worker processes started apart from it (as `quire worker` would be
    by hand): the controller knows only their addresses and the rendezvous URL."""
    launcher = LocalWorkerLauncher(tp)
    try:
        llm = LLM(model=str(checkpoint), tensor_parallel_size=tp, executor="workers",
                  worker_addresses=launcher.addresses, dist_init_method=launcher.dist_init_method,
                  dtype="float32", **kwargs)
        yield llm, launcher
        llm.shutdown()
    finally:
        launcher.stop()


def generate_and_check(llm, hf_tokens):
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_tokens
    assert llm.engine.kv.num_used_blocks == 0


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_parity_through_ray(tp, tp_checkpoint, hf_tokens, ray_session):
    llm = LLM(model=str(tp_checkpoint), tensor_parallel_size=tp, executor="ray", dtype="float32",
              num_kv_blocks=64)
    try:
        assert llm.engine.executor.world_size == tp
        generate_and_check(llm, hf_tokens)
    finally:
        llm.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_parity_through_standalone_workers(tp, tp_checkpoint, hf_tokens):
    with llm_on_local_workers(tp_checkpoint, tp, kv_cache_memory=4 << 20) as (llm, _):
        generate_and_check(llm, hf_tokens)


@pytest.mark.slow
def test_killed_worker_fails_requests_fast(tp_checkpoint):
    with llm_on_local_workers(tp_checkpoint, 2, num_kv_blocks=64) as (llm, launcher):
        victim = launcher.processes[1]
        threading.Timer(1.0, lambda: os.kill(victim.pid, signal.SIGKILL)).start()
        started = time.monotonic()
        with pytest.raises(WorkerFailure, match="rank 1"):
            llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True), use_tqdm=False)
        assert time.monotonic() - started < 15, "the failure must surface within seconds"
        engine = llm.engine
        assert not engine.has_unfinished() and engine.kv.num_used_blocks == 0
        with pytest.raises(WorkerFailure):
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)


@pytest.mark.slow
def test_idle_server_turns_unhealthy_when_a_worker_dies(tp_checkpoint):
    from quire.cluster.serving.async_engine import AsyncEngine

    with llm_on_local_workers(tp_checkpoint, 2, num_kv_blocks=16) as (llm, launcher):
        server_engine = AsyncEngine(llm.engine)
        server_engine.start()
        assert server_engine.healthy
        launcher.processes[0].kill()
        deadline = time.monotonic() + 10
        while server_engine.healthy and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not server_engine.healthy, "no step ran, yet the health watch must notice the dead rank"
        assert "rank 0" in str(llm.engine.executor.failure)
        server_engine.shutdown()


def test_too_few_gpus_is_an_error_not_a_silent_cpu_fallback(ray_session, monkeypatch):
    from quire.cluster.executor.ray_launcher import RayWorkerGroup

    monkeypatch.setattr(ray_session, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    with pytest.raises(RuntimeError, match="has 2 GPUs; tensor_parallel_size=4 needs 4"):
        RayWorkerGroup(4)


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_every_request_replayed(tp_checkpoint, hf_tokens):
    llm = LLM(model=str(tp_checkpoint), tensor_parallel_size=2, executor="workers", dtype="float32",
              num_kv_blocks=64, max_worker_restarts=1)
    engine = llm.engine
    first_workers = engine.executor._on_shutdown.__self__.processes  # the launcher's processes
    real_step, steps = engine.step, [0]

    def step():
        steps[0] += 1
        if steps[0] == 4:  # mid-generation: some outputs streamed, every request still running
            first_workers[1].kill()
            first_workers[1].wait()
        return real_step()

    engine.step = step
    try:
        generate_and_check(llm, hf_tokens)  # identical to HF, as if nothing happened
        assert engine.num_worker_restarts == 1 and engine.failure is None
        assert engine.executor._on_shutdown.__self__.processes is not first_workers
        assert all(p.poll() is not None for p in first_workers), "the old workers are all gone"
        engine.scheduler.check_integrity()
    finally:
        llm.shutdown()


def test_a_failed_step_ends_the_stream_and_the_steps_queued_behind_it_never_run(tp_checkpoint):
    """Steps sent ahead (asynchronous scheduling) queue on the worker's device thread; a request
    the worker cannot run fails alone, a step that fails as a whole ends the stream with the
    error naming the rank, and those behind it do not run."""
    from quire.cluster.executor.base import WorkerSetup
    from quire.cluster.executor.grpc_executor import GrpcExecutor
    from quire.protos.step import NewRequestData, StepPlan
    from quire.worker.server import start_server

    server, address, servicer = start_server(0, 1, "127.0.0.1:0")
    executor = GrpcExecutor([address])
    try:
        executor.start(WorkerSetup(model_path=str(tp_checkpoint), dtype="float32", seed=0, max_model_len=128,
                                   block_size=16, max_num_batched_tokens=64, kv_cache_memory=0,
                                   gpu_memory_utilization=0.9, num_kv_blocks=8))
        greedy = SamplingParams(temperature=0, max_tokens=4)
        executor.submit(StepPlan(1, new_requests=[NewRequestData(1, "a", [5, 6, 7], greedy, [0], 0)],
                                 num_scheduled_tokens={1: 3}))
        # A handle never sent fails that request alone: the step goes on and says why.
        executor.submit(StepPlan(2, decode_handles=[99, 1], decode_token_ids=[5, -1]))
        executor.submit(StepPlan(3, block_copies=[(0, 999)]))  # a block outside the pool: the whole step fails
        executor.submit(StepPlan(4, new_requests=[NewRequestData(4, "c", [5, 6], greedy, [1], 0)],
                                 num_scheduled_tokens={4: 2}))
        assert executor.collect().sampled_handles == [1]
        second = executor.collect()
        assert second.sampled_handles == [1] and "unknown request handle 99" in second.errors[99]
        with pytest.raises(WorkerFailure, match=r"rank 0 .*INTERNAL.*999"):
            executor.collect()
        time.sleep(0.5)  # what the device thread would still do, it would have done by now
        assert set(servicer.worker.runner.requests) == {1}, "step 4 ran after step 3 failed"
    finally:
        executor.close()
        server.stop(0)


def test_cores_are_partitioned_between_ranks_leaving_one_to_the_controller():
    from quire.cluster.executor.local_launcher import partition_cores
    from quire.worker.server import bind_to_cores, parse_cores

    assert partition_cores(range(2), 1) == [[1]]
    assert partition_cores(range(16), 4) == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
    assert partition_cores({8, 0, 4, 2, 6}, 2) == [[2, 4], [6, 8]]  # the cores this process may use
    assert partition_cores(range(3), 2) == [[1], [2]]
    assert partition_cores(range(2), 2) is None  # the controller would have no core of its own
    assert parse_cores("1,4-6") == [1, 4, 5, 6]
    with pytest.raises(ValueError, match="`cpu_cores`"):
        bind_to_cores(0, [max(os.sched_getaffinity(0)) + 1])


def thread_affinities(pid: int) -> dict[int, set[int]]:
    affinities = {}
    for thread_id in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # the thread ended since the listing
            affinities[int(thread_id)] = os.sched_getaffinity(int(thread_id))
    return affinities


@pytest.mark.parametrize("bind", [True, False])
def test_a_cpu_worker_runs_every_thread_on_its_own_cores(tp_checkpoint, hf_tokens, bind):
    """Bound, every thread of the worker (those it starts for gRPC, the forward pass and
    torch's thread team too) stays on the cores given to its rank, off the controller's."""
    launcher = LocalWorkerLauncher(1, bind_cpu_cores=bind)
    try:
        cores = launcher.cpu_cores[0]
        if bind and cores is None:
            pytest.skip("binding needs at least two cores (one stays with the controller)")
        llm = LLM(model=str(tp_checkpoint), executor="workers", worker_addresses=launcher.addresses,
                  dtype="float32", num_kv_blocks=64)
        generate_and_check(llm, hf_tokens)
        affinities = thread_affinities(launcher.processes[0].pid)
        llm.shutdown()
    finally:
        launcher.stop()
    expected = set(cores) if bind else os.sched_getaffinity(0)
    assert len(affinities) > 3 and all(a == expected for a in affinities.values()), affinities
