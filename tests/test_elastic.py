"""Elastic replicas behind the router (in-process replicas, real tiny engines): the
autoscaler's rule on a timeline; a load step takes the deployment 1 -> 2 -> 1 with every
request completed; a drain lets in-flight streams finish (or moves them, token-exact); a
rolling restart under steady load fails no request and changes no greedy output. The same
through Ray actors: test_ray_replicas.py."""
from __future__ import annotations

import asyncio

import pytest
from test_router import (  # noqa: F401 (model_path and reference are fixtures)
    GREEDY,
    PROMPTS,
    collect,
    expected,
    model_path,
    reference,
    replica_kwargs,
    run,
    settle,
)

from quire.cluster.core.block_hash import new_hash_seed
from quire.cluster.core.config import EngineConfig
from quire.cluster.core.engine import Engine
from quire.cluster.serving.admin import AdminConflictError
from quire.cluster.serving.autoscaler import AutoscaleConfig, Autoscaler
from quire.cluster.serving.llm import LLM
from quire.cluster.serving.replica import InprocReplica, ReplicaHost
from quire.cluster.serving.router import Router, served_model
from quire.protos.step import SamplingParams

LONG = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def elastic_router(model_path, replicas=1, autoscale=None, **kwargs):
    """A router over `replicas` in-process replicas, with a factory that starts more (each
    warmed up before it is returned, as a Ray replica's `ready` does)."""
    seed = new_hash_seed()
    engine_kwargs = replica_kwargs(model_path, seed)
    started = []

    async def factory(replica_id):
        host = ReplicaHost.build(Engine(EngineConfig.from_kwargs(**engine_kwargs)))
        await host.warm_up()
        started.append(replica_id)
        return InprocReplica(replica_id, host)

    handles = [InprocReplica(f"replica-{i}", ReplicaHost.build(Engine(EngineConfig.from_kwargs(**engine_kwargs))))
               for i in range(replicas)]
    router = Router(handles, served_model(engine_kwargs, 64), seed, replica_factory=factory, poll_seconds=0.05,
                    autoscale=autoscale, **kwargs)
    router.started = started
    return router


# -- the rule --------------------------------------------------------------------------------------
def test_the_autoscaler_rule_on_a_timeline():
    scaler = Autoscaler(AutoscaleConfig(min_replicas=1, max_replicas=3, target_ongoing_requests=4,
                                        scale_up_seconds=10, scale_down_seconds=60))
    # 9 requests want 3 replicas, but only sustained load counts: nothing before 10 s.
    assert [scaler.decide(t, 1, 9, 0, False) for t in (0, 5, 9.9)] == [0, 0, 0]
    assert scaler.decide(10, 1, 9, 0, False) == 1
    assert scaler.decide(11, 2, 9, 0, True) == 0          # one change at a time: the window restarts
    assert scaler.decide(12, 2, 9, 0, False) == 0
    assert scaler.decide(22, 2, 9, 0, False) == 1
    assert scaler.decide(40, 3, 9, 0, False) == 0         # at the maximum
    # Waiting requests are a reason too, even when the count alone would not ask for more.
    scaler = Autoscaler(AutoscaleConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=64,
                                        scale_up_seconds=1, scale_down_seconds=5))
    assert [scaler.decide(t, 1, 3, 2, False) for t in (0, 1)] == [0, 1]
    # Down only after a whole quiet window; any queued request restarts it; never below the minimum.
    assert [scaler.decide(t, 2, 1, 0, False) for t in (10, 12, 14)] == [0, 0, 0]
    assert scaler.decide(14.5, 2, 1, 1, False) == 0
    assert [scaler.decide(t, 2, 1, 0, False) for t in (15, 19.9, 20)] == [0, 0, -1]
    assert scaler.decide(100, 1, 0, 0, False) == 0
    assert scaler.decide(101, 0, 0, 0, False) == 1        # under the floor: back up at once


@pytest.mark.parametrize("bad, field", [(dict(min_replicas=0, max_replicas=1), "min_replicas"),
                                        (dict(min_replicas=2, max_replicas=1), "max_replicas"),
                                        (dict(min_replicas=1, max_replicas=2, scale_up_seconds=-1), "scale_up_seconds"),
                                        (dict(min_replicas=1, max_replicas=2, target_ongoing_requests=0),
                                         "target_ongoing_requests"),
                                        (dict(min_replicas=True, max_replicas=2), "min_replicas")])
def test_bad_autoscale_settings_name_the_field(bad, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        AutoscaleConfig(**bad)


# -- the deployment --------------------------------------------------------------------------------
def test_a_load_step_scales_one_to_two_and_back_with_every_request_completed(model_path, reference):
    """Six clients send requests back to back (load 6 against a target of 2 per replica) until
    the second replica has served some of them; then the load ends and the deployment
    shrinks back. Every request completes with the tokens of an undisturbed engine."""
    config = AutoscaleConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=2, scale_up_seconds=0.2,
                             scale_down_seconds=0.5, tick_seconds=0.05)

    async def main():
        router = elastic_router(model_path, replicas=1, autoscale=config)
        router.start()
        counts, results = [], []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60

        def new_replica_served() -> bool:
            return any(i.name == "replica-1" and i.cached_blocks for i in router.list_replicas())

        async def client(index):
            turn = 0
            while not new_replica_served() and loop.time() < deadline:
                prompt = PROMPTS[index % len(PROMPTS)] + f" client {index} turn {turn}"
                results.append((prompt, await collect(router, prompt, LONG)))
                turn += 1

        async def watch():
            while True:
                counts.append(len(router.replica_ids()))
                await asyncio.sleep(0.02)

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.gather(*(client(i) for i in range(6)))
            peak = max(counts)
            while len(router.replica_ids()) > 1 and loop.time() < deadline:  # the quiet window, then the drain
                await asyncio.sleep(0.05)
            inspections = await settle(router)
            return results, peak, router.replica_ids(), router.started, inspections
        finally:
            watcher.cancel()
            router.shutdown()

    results, peak, final, started, inspections = run(main())
    assert peak == 2 and started == ["replica-1"] and len(final) == 1
    assert all(i.num_free_blocks == i.num_blocks for i in inspections.values())
    assert all(r.outputs[0].finish_reason == "length" for _, r in results)
    assert all(r.outputs[0].token_ids == expected(reference, p, LONG)[0] for p, r in results[:8])


@pytest.mark.parametrize("grace", [30.0, 0.0], ids=["finish-there", "move-at-once"])
def test_drain_with_streams_in_flight_completes_them_token_exact(model_path, reference, grace):
    cases = [(p, LONG) for p in PROMPTS]

    async def main():
        router = elastic_router(model_path, replicas=2, policy="round_robin")
        router.start()
        drained = {}

        async def drain_once(delta):
            if not drained and any(c.token_ids for c in delta.outputs):
                drained["task"] = asyncio.ensure_future(router.drain_replica("replica-0", grace))

        try:
            results = await asyncio.gather(*(collect(router, p, params, on_delta=drain_once) for p, params in cases))
            await drained["task"]
            assert router.replica_ids() == ["replica-1"]
            assert [i.name for i in router.list_replicas()] == ["replica-1"]
            inspections = await settle(router)
            assert all(i.num_free_blocks == i.num_blocks for i in inspections.values())
            with pytest.raises(AdminConflictError, match="last serving replica"):
                await router.drain_replica("replica-1")
            with pytest.raises(KeyError):
                await router.drain_replica("replica-9")
            with pytest.raises(ValueError, match="`grace_seconds`"):
                await router.drain_replica("replica-1", -1)
            return results, router.counters.migrations
        finally:
            router.shutdown()

    results, migrations = run(main())
    assert [r.outputs[0].token_ids for r in results] == [expected(reference, p, params)[0] for p, params in cases]
    assert (migrations > 0) == (grace == 0.0)


def test_a_rolling_restart_under_steady_load_fails_nothing_and_changes_no_output(model_path, reference):
    cases = [(p + f" wave {w}", GREEDY) for w in range(4) for p in PROMPTS]

    async def main():
        router = elastic_router(model_path, replicas=2)
        router.start()
        results, failures = [], []

        async def steady(index):
            for prompt, params in cases[index::4]:
                try:
                    results.append((prompt, await collect(router, prompt, params)))
                except Exception as error:  # noqa: BLE001 - counted: the test wants none
                    failures.append(error)

        try:
            clients = asyncio.ensure_future(asyncio.gather(*(steady(i) for i in range(4))))
            await asyncio.sleep(0.05)
            fresh = await router.rolling_restart(grace_seconds=10.0)
            await clients
            return fresh, router.replica_ids(), results, failures
        finally:
            router.shutdown()

    fresh, serving, results, failures = run(main())
    assert failures == [] and len(results) == len(cases)
    assert fresh == ["replica-2", "replica-3"] and sorted(serving) == fresh
    want = {p: expected(reference, p, params)[0] for p, params in cases}
    assert all(r.outputs[0].token_ids == want[p] for p, r in results)


@pytest.mark.parametrize("flags, initial, bounds", [
    ([], 1, (1, 1)), (["-dp", "2"], 2, (2, 2)), (["--min-replicas", "1", "--max-replicas", "4"], 1, (1, 4)),
    (["-dp", "2", "--max-replicas", "4"], 2, (2, 4)), (["--min-replicas", "2", "--max-replicas", "3"], 2, (2, 3)),
    (["-dp", "3", "--min-replicas", "1", "--max-replicas", "4"], 3, (1, 4)),
])
def test_serve_flags_give_the_start_and_the_bounds(flags, initial, bounds):
    from quire.cluster.cli import build_parser
    from quire.cluster.serving.serve import replica_bounds

    start, config = replica_bounds(build_parser().parse_args(["serve", *flags]))
    assert (start, (config.min_replicas, config.max_replicas)) == (initial, bounds)
    assert (config.target_ongoing_requests, config.scale_up_seconds, config.scale_down_seconds) == (64, 10, 60)


@pytest.mark.parametrize("flags, field", [(["-dp", "5", "--max-replicas", "4"], "data_parallel_size"),
                                          (["--min-replicas", "3", "--max-replicas", "2"], "max_replicas"),
                                          (["-dp", "0"], "data_parallel_size"),
                                          (["--min-replicas", "0", "--max-replicas", "2"], "min_replicas"),
                                          (["--max-replicas", "2", "--scale-up-seconds", "-1"], "scale_up_seconds"),
                                          (["--target-ongoing-requests", "0"], "target_ongoing_requests")])
def test_bad_serve_flags_name_the_field(flags, field):
    from quire.cluster.cli import build_parser
    from quire.cluster.serving.serve import replica_bounds

    with pytest.raises(ValueError, match=f"`{field}`"):
        replica_bounds(build_parser().parse_args(["serve", *flags]))


def test_the_admin_api_drives_the_router(model_path):
    """HTTP /admin over a real router: list, add (serving once it answers), drain, remove,
    a rolling restart, and the errors (unknown name, the last replica, no key)."""
    import httpx

    from quire.cluster.serving.api_server import build_app

    async def main():
        router = elastic_router(model_path, replicas=1)
        transport = httpx.ASGITransport(app=build_app(router, api_key="key"))
        router.start()
        auth = {"authorization": "Bearer key"}
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://router", headers=auth) as http:
                assert (await http.get("/admin/replicas", headers={"authorization": ""})).status_code == 401
                listed = (await http.get("/admin/replicas")).json()["data"]
                assert [(r["name"], r["state"], r["node"]) for r in listed] == [("replica-0", "serving", "local")]
                added = await http.post("/admin/replicas")
                assert (added.status_code, added.json()["name"]) == (201, "replica-1")
                await collect(router, PROMPTS[0], GREEDY)
                names = sorted(r["name"] for r in (await http.get("/admin/replicas")).json()["data"])
                assert names == ["replica-0", "replica-1"]
                drained = await http.post("/admin/replicas/replica-0/drain", json={"grace_seconds": 1})
                assert drained.json() == {"name": "replica-0", "state": "removed"}
                assert (await http.delete("/admin/replicas/replica-7")).status_code == 404
                assert (await http.delete("/admin/replicas/replica-1")).status_code == 409  # the last one
                restarted = (await http.post("/admin/rolling-restart", json={})).json()
                assert restarted == {"replaced": ["replica-1"], "replicas": ["replica-2"]}
                return router.replica_ids()
        finally:
            router.shutdown()

    assert run(main()) == ["replica-2"]
