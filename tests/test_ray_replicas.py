"""Replicas as Ray actors (a local Ray on the CPU): `LLM(data_parallel_size=2)` gives HF's
greedy tokens; a request through a `RayReplica` gives a plain engine's tokens, and a replica
over worker processes reports their pids; through the Router over two replica actors,
killing an actor mid-stream, or the only worker process of one, changes no token of any
stream (greedy and seeded), leaks no block, and the factory restarts the dead replica; a
replica not up in time is reported and its actor killed."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest
import torch
import transformers

from quire.cluster.core.block_hash import new_hash_seed
from quire.cluster.core.outputs import OutputAccumulator
from quire.cluster.serving.llm import LLM
from quire.cluster.serving.replica import ReplicaDeadError, ReplicaRequest
from quire.cluster.serving.router import Router, served_model
from quire.protos.step import SamplingParams

ray = pytest.importorskip("ray")

from quire.cluster.serving.ray_replicas import RayReplicaFactory, start_router  # noqa: E402 - needs Ray

PROMPTS = [[(13 * i + 5 * j) % 1900 + 3 for j in range(5 + 6 * i)] for i in range(4)]
# Long enough that a kill after the first dozen streamed tokens always finds both replicas'
# streams unfinished, however fast the engines run (at 10 tokens a fast replica could finish
# its share before the kill, leaving nothing to move).
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, seed=5, max_tokens=40, ignore_eos=True)
CASES = [(prompt, params) for prompt in PROMPTS for params in (GREEDY, SEEDED)]
ENGINE = dict(dtype="float32", num_kv_blocks=64, max_model_len=128)
# Replicas over one worker process each, which no restart replaces: its death kills the engine.
WORKER_ENGINE = dict(executor="workers", max_worker_restarts=0, **ENGINE)


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: the router's polls and the Ray futures live on it."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return str(tiny_checkpoint("llama-gqa4"))


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for this module (or the session's); 4 CPUs: one per replica actor, never
    more than 3 at once."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Token ids of every case through one plain engine."""
    llm = LLM(model=checkpoint, **ENGINE)
    try:
        outputs = llm.generate([p for p, _ in CASES], [params for _, params in CASES], use_tqdm=False)
        return [output.outputs[0].token_ids for output in outputs]
    finally:
        llm.shutdown()


def test_llm_over_two_ray_replicas_matches_hf(ray_local, checkpoint):
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_tokens = [model.generate(torch.tensor([p]), max_new_tokens=GREEDY.max_tokens, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    llm = LLM(model=checkpoint, data_parallel_size=2, routing_policy="round_robin", **ENGINE)
    try:
        assert llm.engine is None and llm.client.model.num_kv_blocks == ENGINE["num_kv_blocks"]
        outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == hf_tokens
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def factory(ray_local, checkpoint, loop):
    """Two replicas over worker processes, started concurrently, and the factory that restarts them."""
    factory = RayReplicaFactory(dict(model=checkpoint, **WORKER_ENGINE), new_hash_seed(), num_replicas=2)
    loop.run_until_complete(factory.start_all(["r0", "r1"]))
    yield factory
    loop.run_until_complete(factory.shutdown_all())


async def collect_replica(replica, cases):
    """Add the cases to one replica and poll until all finished: token ids per case."""
    tokens = [[] for _ in cases]
    for index, (prompt, params) in enumerate(cases):
        await replica.add(ReplicaRequest(str(index), None, prompt, params))
    finished = set()
    while len(finished) < len(cases):
        for news in (await replica.poll(1.0)).outputs:
            assert news.error is None, news.error
            tokens[int(news.request_id)] += news.output.outputs[0].token_ids
            if news.output.finished:
                finished.add(news.request_id)
    return tokens


def test_a_ray_replica_gives_the_plain_engines_tokens_and_its_worker_pids(loop, factory, reference):
    replica = factory.replicas["r0"]
    assert replica.facts.num_kv_blocks == ENGINE["num_kv_blocks"]
    assert loop.run_until_complete(collect_replica(replica, CASES[:4])) == reference[:4]
    inspection = loop.run_until_complete(replica.inspect())  # (checks the cache's integrity too)
    assert inspection.num_free_blocks == inspection.num_blocks and inspection.num_unfinished == 0
    pids = loop.run_until_complete(replica.worker_pids())
    assert len(pids) == 1 and pids[0] != loop.run_until_complete(replica.pid())


@pytest.fixture(scope="module")
def router(factory, checkpoint, loop):
    model = served_model(factory.engine_kwargs, ENGINE["num_kv_blocks"])
    router = Router([factory.replicas["r0"], factory.replicas["r1"]], model, factory.hash_seed, policy="round_robin",
                    replica_factory=factory.start, poll_seconds=0.05)
    yield router
    router.shutdown()


async def run_and_kill(router, kill, after_tokens):
    """Stream every case through the router; call `kill()` once `after_tokens` tokens have
    reached the clients. Token ids per case."""
    seen = {"tokens": 0, "killed": False}

    async def one(prompt, params):
        accumulator = OutputAccumulator()
        async for delta in router.generate(prompt, params):
            accumulator.add(delta)
            seen["tokens"] += sum(len(c.token_ids) for c in delta.outputs)
            if seen["tokens"] >= after_tokens and not seen["killed"]:
                seen["killed"] = True
                kill()
        return accumulator.result()

    router.start()
    results = await asyncio.gather(*(one(prompt, params) for prompt, params in CASES))
    assert seen["killed"]
    assert all(r.outputs[0].finish_reason == "length" for r in results)
    return [r.outputs[0].token_ids for r in results]


async def wait_serving(router, replica_ids, timeout=120.0):
    """Wait until exactly `replica_ids` serve (a dead one restarted by the factory)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while router.replica_ids() != replica_ids:
        assert asyncio.get_running_loop().time() < deadline, f"serving: {router.replica_ids()}"
        await asyncio.sleep(0.1)


async def check_survivor(router, replica_id):
    inspection = await router.handle(replica_id).inspect()  # (checks the cache's integrity too)
    assert inspection.num_free_blocks == inspection.num_blocks and inspection.num_unfinished == 0


def test_a_replica_actor_killed_mid_stream_changes_no_token(loop, router, reference):
    victim = router.handle("r0")
    migrations = router.counters.migrations
    tokens = loop.run_until_complete(run_and_kill(router, lambda: ray.kill(victim.actor, no_restart=True), 12))
    assert tokens == reference
    assert router.healthy and router.counters.migrations > migrations
    loop.run_until_complete(check_survivor(router, "r1"))
    with pytest.raises(ReplicaDeadError):  # the dead actor's handle, as the router saw it
        loop.run_until_complete(victim.poll(0.1))
    loop.run_until_complete(wait_serving(router, ["r0", "r1"]))
    assert router.handle("r0") is not victim and router.counters.replica_restarts == 1


def test_a_replica_whose_only_worker_is_killed_mid_stream_changes_no_token(loop, router, reference):
    victim = router.handle("r1")
    (pid,) = loop.run_until_complete(victim.worker_pids())
    migrations = router.counters.migrations
    tokens = loop.run_until_complete(run_and_kill(router, lambda: os.kill(pid, signal.SIGKILL), 12))
    assert tokens == reference
    assert router.healthy and router.counters.migrations > migrations
    loop.run_until_complete(check_survivor(router, "r0"))
    with pytest.raises(ReplicaDeadError):  # its engine stopped for good (and the factory is replacing it)
        loop.run_until_complete(victim.poll(0.1))


def test_a_replica_that_does_not_come_up_in_time_is_reported_and_killed(loop, ray_local, checkpoint):
    factory = RayReplicaFactory(dict(model=checkpoint, **ENGINE), new_hash_seed(), ready_timeout=0.01)
    with pytest.raises(RuntimeError, match="replica slow did not start within"):
        loop.run_until_complete(factory.start("slow"))
    assert factory.replicas == {}


def test_bad_data_parallel_settings_fail_before_anything_starts(checkpoint):
    with pytest.raises(ValueError, match="data_parallel_size"):
        LLM(model=checkpoint, data_parallel_size=0)
    with pytest.raises(ValueError, match="routing_policy"):
        asyncio.run(start_router(dict(model=checkpoint), 2, policy="fastest"))
    with pytest.raises(ValueError, match="worker_addresses"):
        RayReplicaFactory(dict(model=checkpoint, executor="workers", worker_addresses=["127.0.0.1:1"]),
                          new_hash_seed())


def test_a_load_step_grows_and_shrinks_the_ray_replicas(loop, ray_local, checkpoint, reference):
    """Autoscaling through Ray: under a load step a second replica actor starts (warmed up
    before it takes a request), serves, and is drained once the load ends; every request
    completes with the plain engine's tokens."""
    from quire.cluster.serving.autoscaler import AutoscaleConfig

    config = AutoscaleConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=2, scale_up_seconds=0.2,
                             scale_down_seconds=1.0, tick_seconds=0.05)
    router, replicas = loop.run_until_complete(start_router(
        dict(model=checkpoint, **ENGINE), 1, policy="round_robin", max_replicas=2, autoscale=config,
        poll_seconds=0.05))

    async def main():
        router.start()
        clock, peak, results = asyncio.get_running_loop(), [1], []
        deadline = clock.time() + 180

        def second_served() -> bool:
            infos = router.list_replicas()
            peak.append(sum(i.state == "serving" for i in infos))
            return any(i.name != "replica-0" and i.state == "serving" and i.cached_blocks for i in infos)

        async def client(offset):
            turn = 0
            while not second_served() and clock.time() < deadline:
                index = (offset + turn) % len(CASES)
                accumulator = OutputAccumulator()
                async for delta in router.generate(*CASES[index]):
                    accumulator.add(delta)
                results.append((index, accumulator.result().outputs[0].token_ids))
                turn += 1

        await asyncio.gather(*(client(i) for i in range(4)))
        while len(router.list_replicas()) > 1 and clock.time() < deadline:
            await asyncio.sleep(0.1)
        return max(peak), router.list_replicas(), results

    try:
        peak, final, results = loop.run_until_complete(main())
    finally:
        router.shutdown()
        loop.run_until_complete(replicas.shutdown_all())
    assert peak == 2 and [(i.name, i.state) for i in final] == [("replica-0", "serving")]
    assert all(tokens == reference[index] for index, tokens in results)


def test_quire_serve_with_replicas_end_to_end(tiny_checkpoint):
    """`quire serve -dp 2 --max-replicas 3` as a user runs it (its own local Ray): both
    frontends answer through the router, the replicas and admin listings agree, a replica is
    added through the admin API, and Ctrl-C stops everything (exit status 130, as for any
    program Ctrl-C ends; no traceback) with no Ray process of its own left."""
    import grpc
    import httpx
    from serve_process import ServeProcess

    from quire.protos import generate_pb2 as pb
    from quire.protos import generate_pb2_grpc

    args = ["--model", str(tiny_checkpoint("llama-gqa4")), "-dp", "2", "--max-replicas", "3",
            "--num-kv-blocks", "64", "--max-model-len", "128", "--dtype", "float32"]
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}  # a Ray of its own
    with ServeProcess(args, env, start_timeout=180) as server, httpx.Client(base_url=server.http_url,
                                                                           timeout=120) as http:
        body = {"prompt": "Hello there", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        completion = http.post("/v1/completions", json=body).json()
        assert completion["usage"]["completion_tokens"] == 6
        with grpc.insecure_channel(server.grpc_target) as channel:
            info = generate_pb2_grpc.GenerateStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
        assert info.healthy and sorted(r.name for r in info.replicas) == ["replica-0", "replica-1"]
        assert http.post("/admin/replicas").json() == {"name": "replica-2"}
        listed = http.get("/admin/replicas").json()["data"]
        assert sorted((r["name"], r["state"]) for r in listed) == [
            ("replica-0", "serving"), ("replica-1", "serving"), ("replica-2", "serving")]
        assert http.get("/health").json()["status"] == "ok"
        code = server.stop()
    output = server.output()
    assert code == 130 and "Traceback" not in output, output[-3000:]
