"""The router over in-process replicas (real tiny engines, no Ray): tokens equal one engine's,
requests of one prefix land together, a replica killed mid-stream loses and repeats no
token, tenants' salts never share a hit, and the mirror equals every replica's real cache
after random workloads (hypothesis). The same router over Ray actors: test_ray_replicas.py."""
from __future__ import annotations

import asyncio
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quire.cluster.core.block_hash import new_hash_seed
from quire.cluster.core.config import EngineConfig
from quire.cluster.core.kv_events import HOST
from quire.cluster.core.engine import Engine
from quire.cluster.core.outputs import OutputAccumulator
from quire.cluster.serving.llm import LLM
from quire.cluster.serving.replica import InprocReplica, ReplicaHost
from quire.cluster.serving.router import Router, served_model
from quire.protos.step import SamplingParams

EXAMPLES = int(os.environ.get("QUIRE_PROPERTY_EXAMPLES", "15"))
PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,", "1 2 3 4 5 6 7 8",
           "A long shared system prompt: you are a helpful assistant who answers briefly. Question: why?"]


@pytest.fixture(scope="module")
def model_path(tiny_checkpoint):
    return str(tiny_checkpoint("llama-gqa4"))


@pytest.fixture(scope="module")
def reference(model_path):
    """One plain engine: the tokens every routed run must reproduce."""
    llm = LLM(model=model_path, dtype="float32", num_kv_blocks=64, max_model_len=128)
    yield llm
    llm.shutdown()


def replica_kwargs(model_path, seed, num_kv_blocks=64, **kwargs) -> dict:
    return dict(model=model_path, dtype="float32", num_kv_blocks=num_kv_blocks, max_model_len=128,
                hash_seed=seed, kv_events=True, **kwargs)


def build_router(model_path, num_replicas=2, policy="cache_aware", num_kv_blocks=64, seed=None, **kwargs):
    seed = seed or new_hash_seed()
    engine_kwargs = replica_kwargs(model_path, seed, num_kv_blocks, **kwargs)
    replicas = [InprocReplica(f"r{i}", ReplicaHost.build(Engine(EngineConfig.from_kwargs(**engine_kwargs))))
                for i in range(num_replicas)]
    return Router(replicas, served_model(engine_kwargs, num_kv_blocks), seed, policy=policy, poll_seconds=0.05)


async def collect(router, prompt, params, request_id=None, cache_salt=None, on_delta=None):
    accumulator = OutputAccumulator()
    async for delta in router.generate(prompt, params, request_id, cache_salt=cache_salt):
        accumulator.add(delta)
        if on_delta is not None:
            await on_delta(delta)
    return accumulator.result()


async def settle(router, timeout=10.0):
    """Wait until every serving replica's mirror equals its real cache (events are polled
    after the step that made them); returns the inspections."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        inspections = {r: await router.handle(r).inspect() for r in router.replica_ids()}
        if all(router.mirror.cached_hashes(r) == set(i.cached_hashes)
               and router.mirror.cached_hashes(r, HOST) == set(i.host_cached_hashes) for r, i in inspections.items()):
            return inspections
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the mirror did not converge to the replicas' caches")
        await asyncio.sleep(0.05)


def run(coroutine):
    return asyncio.run(coroutine)


GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=1.0, seed=11, ignore_eos=True)
TWO = SamplingParams(max_tokens=8, temperature=0.9, seed=5, n=2, ignore_eos=True)


def expected(reference, prompt, params):
    return [c.token_ids for c in reference.generate([prompt], params, use_tqdm=False)[0].outputs]


@pytest.mark.parametrize("policy", ["cache_aware", "least_loaded", "round_robin"])
def test_routed_tokens_equal_one_engine(model_path, reference, policy):
    async def main():
        router = build_router(model_path, policy=policy)
        router.start()
        try:
            results = await asyncio.gather(*(collect(router, p, params) for p in PROMPTS
                                             for params in (GREEDY, SEEDED, TWO)))
            inspections = await settle(router)
            assert all(i.num_free_blocks == i.num_blocks for i in inspections.values())
            return results
        finally:
            router.shutdown()

    results = run(main())
    wanted = [expected(reference, p, params) for p in PROMPTS for params in (GREEDY, SEEDED, TWO)]
    assert [[c.token_ids for c in r.outputs] for r in results] == wanted


def test_one_conversation_lands_on_one_replica_and_hits_its_cache(model_path):
    async def main():
        router = build_router(model_path)
        router.start()
        try:
            system = PROMPTS[3] * 2
            first = await collect(router, system, GREEDY)
            await settle(router)
            holders = [r for r in router.replica_ids() if router.mirror.cached_hashes(r)]
            assert len(holders) == 1
            before = router.counters.predicted_cached_tokens
            for turn in range(3):
                await collect(router, system + first.outputs[0].text + f" turn {turn}", GREEDY)
                await settle(router)
            assert [r for r in router.replica_ids() if router.mirror.cached_hashes(r)] == holders
            inspection = await router.handle(holders[0]).inspect()
            assert router.counters.predicted_cached_tokens - before > 0
            assert inspection.num_hit_tokens >= router.counters.predicted_cached_tokens - before
        finally:
            router.shutdown()

    run(main())


@pytest.mark.parametrize("cut", [0, 3])
def test_a_replica_killed_mid_stream_loses_and_repeats_no_token(model_path, reference, cut):
    """Every stream on the killed replica continues elsewhere from the tokens it sent: greedy,
    seeded and n=2 streams end with exactly the undisturbed run's tokens."""
    cases = [(p, params) for p in PROMPTS for params in (GREEDY, SEEDED, TWO)]

    async def main():
        router = build_router(model_path)
        router.start()
        seen = {"tokens": 0}
        victim = router.handle("r0")

        async def maybe_kill(delta):
            seen["tokens"] += sum(len(c.token_ids) for c in delta.outputs)
            if seen["tokens"] >= cut * len(cases) and not victim._dead:
                victim.kill("killed by the test")

        try:
            if cut == 0:
                victim.kill("killed by the test")
            results = await asyncio.gather(*(collect(router, p, params, on_delta=maybe_kill) for p, params in cases))
            assert router.healthy
            assert router.replica_ids() == ["r1"]
            inspection = (await settle(router))["r1"]
            assert inspection.num_free_blocks == inspection.num_blocks
            return results
        finally:
            router.shutdown()

    results = run(main())
    assert [[c.token_ids for c in r.outputs] for r in results] == [expected(reference, p, params)
                                                                     for p, params in cases]
    assert all(c.finish_reason == "length" for r in results for c in r.outputs)


def test_salts_keep_tenants_apart_on_every_replica(model_path):
    async def main():
        router = build_router(model_path)
        router.start()
        try:
            prompt = PROMPTS[3] * 2
            await collect(router, prompt, GREEDY, cache_salt="tenant-a")
            inspections = await settle(router)
            hits_before = sum(i.num_hit_tokens for i in inspections.values())
            await collect(router, prompt, GREEDY, cache_salt="tenant-b")
            inspections = await settle(router)
            assert sum(i.num_hit_tokens for i in inspections.values()) == hits_before
            await collect(router, prompt, GREEDY, cache_salt="tenant-a")
            inspections = await settle(router)
            assert sum(i.num_hit_tokens for i in inspections.values()) > hits_before
        finally:
            router.shutdown()

    run(main())


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(workload=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 12), st.sampled_from([None, "a", "b"]),
                                   st.integers(1, 12), st.booleans()), min_size=1, max_size=10),
       policy=st.sampled_from(["cache_aware", "least_loaded", "round_robin"]),
       kv_host_memory=st.sampled_from([0, 0, 1 << 16]))
def test_the_mirror_equals_every_replica_cache_after_random_workloads(model_path, workload, policy, kv_host_memory):
    """Arrivals with shared prefixes, salts, aborts mid-stream, and a pool small enough to
    preempt and evict (with or without a host tier, whose evictions and hits then happen
    too): afterwards the mirror equals each replica's hash maps, both tiers, no resync was
    needed, and no block is held."""
    async def main():
        router = build_router(model_path, policy=policy, num_kv_blocks=16, block_size=4, max_num_seqs=4,
                              kv_host_memory=kv_host_memory)
        router.start()

        async def one(index, base, extra, salt, max_tokens, abort):
            prompt = [10 + 7 * base + i % 5 for i in range(12)] + [300 + i for i in range(extra)]
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            async for delta in router.generate(prompt, params, f"q{index}", cache_salt=salt):
                if abort and any(c.token_ids for c in delta.outputs):
                    router.abort(f"q{index}")

        try:
            await asyncio.gather(*(one(i, *item) for i, item in enumerate(workload)))
            inspections = await settle(router)
            assert router.counters.mirror_resyncs == 0
            assert all(i.num_free_blocks == i.num_blocks and i.num_unfinished == 0 for i in inspections.values())
        finally:
            router.shutdown()

    run(main())


def test_http_over_the_router_survives_a_dead_replica(model_path, reference):
    """The HTTP frontend over the router: /health stays 200 while one replica serves,
    /v1/replicas lists each replica's state, /metrics carries per-replica and router series;
    a stream whose replica dies mid-way ends with the undisturbed run's text."""
    import httpx

    from quire.cluster.serving.api_server import build_app
    from quire.cluster.serving.router_metrics import RouterMetrics

    prompt = PROMPTS[1]
    want = reference.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].text

    seed = new_hash_seed()

    async def main():
        router = build_router(model_path, seed=seed)
        router.metrics = metrics = RouterMetrics(router.model.name)
        app = build_app(router, metrics=metrics)
        transport = httpx.ASGITransport(app=app)
        router.start()
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
                assert (await http.get("/health")).status_code == 200
                body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "stream": True}
                texts = []

                async def kill_its_replica_after_three_tokens():
                    while True:
                        for placement in list(router._placements.values()):
                            if len(placement.stream.tokens[0]) >= 3:
                                router.handle(placement.replica_id).kill("killed by the test")
                                return
                        await asyncio.sleep(0)

                killer = asyncio.ensure_future(kill_its_replica_after_three_tokens())
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            texts.append(json.loads(line[len("data: "):])["choices"][0]["text"])
                assert killer.done()
                health = await http.get("/health")
                listing = (await http.get("/v1/replicas")).json()["data"]
                exposition = (await http.get("/metrics")).text
                for path in ("/v1/models", "/health", "/v1/replicas", "/metrics"):  # the seed stays inside
                    assert seed not in (await http.get(path)).text
            return "".join(texts), health, listing, exposition
        finally:
            router.shutdown()

    text, health, listing, exposition = run(main())
    assert text == want
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert sorted(entry["state"] for entry in listing) == ["dead", "serving"]
    assert 'quire_router_migrations_total{model_name=' in exposition
    assert "quire_router_decisions_total{" in exposition and 'quire_replica_up{' in exposition
    migrations = [line for line in exposition.splitlines() if line.startswith("quire_router_migrations_total")]
    assert float(migrations[0].split()[-1]) == 1.0


def test_the_router_recreates_dead_replicas_and_parks_streams_until_one_serves(model_path, reference):
    """With a factory, a dead replica comes back under its name (a fresh engine, so a fresh
    mirror epoch); when every replica is dead, the streams wait for the first one back and
    then finish with exactly the undisturbed tokens."""
    cases = [(p, params) for p in PROMPTS[:2] for params in (GREEDY, SEEDED)]

    async def main():
        seed = new_hash_seed()
        router = build_router(model_path, seed=seed)
        engine_kwargs = replica_kwargs(model_path, seed)
        started = []

        async def factory(replica_id):
            started.append(replica_id)
            await asyncio.sleep(0.2)  # the streams are parked meanwhile
            return InprocReplica(replica_id, ReplicaHost.build(Engine(EngineConfig.from_kwargs(**engine_kwargs))))

        router.replica_factory = factory
        router.start()
        killed = {"done": False}

        async def kill_all(delta):
            if not killed["done"] and sum(len(c.token_ids) for c in delta.outputs):
                killed["done"] = True
                for replica_id in router.replica_ids():
                    router.handle(replica_id).kill("killed by the test")

        try:
            results = await asyncio.gather(*(collect(router, p, params, on_delta=kill_all) for p, params in cases))
            assert sorted(started) == ["r0", "r1"] and router.counters.replica_restarts == 2
            await asyncio.sleep(0.2)
            assert sorted(router.replica_ids()) == ["r0", "r1"] and router.healthy
            inspections = await settle(router)
            assert all(i.num_free_blocks == i.num_blocks for i in inspections.values())
            return results
        finally:
            router.shutdown()

    results = run(main())
    assert [[c.token_ids for c in r.outputs] for r in results] == [expected(reference, p, params)
                                                                     for p, params in cases]


def test_lost_kv_events_are_caught_and_the_mirror_resyncs(model_path):
    """A poll whose events went missing (the replica's numbering runs ahead of what arrived)
    makes the router rebuild that replica's mirror from a snapshot: exact again, once."""
    import dataclasses

    async def main():
        router = build_router(model_path, policy="round_robin")
        victim = router.handle("r0")
        original, armed = victim.poll, {"drop": True}

        async def lossy_poll(timeout):
            update = await original(timeout)
            if armed["drop"] and update.kv_events and router.mirror.is_exact("r0"):
                armed["drop"] = False
                return dataclasses.replace(update, kv_events=update.kv_events[1:])
            return update

        victim.poll = lossy_poll
        router.start()
        try:
            await asyncio.gather(*(collect(router, p, GREEDY) for p in PROMPTS))
            await settle(router)
            assert not armed["drop"] and router.counters.mirror_resyncs == 1
            assert router.mirror.is_exact("r0") and router.mirror.is_exact("r1")
        finally:
            router.shutdown()

    run(main())
