"""Data-parallel replicas as Ray actors: each replica is a `ReplicaHost` (a whole engine)
inside one `ReplicaActor`, reached by the router through a `RayReplica` handle.

Placement. A replica actor asks for one CPU (its engine loop and scheduler). Where its
model runs depends on the engine's executor:

* in-process (tensor_parallel_size 1, the default) or `workers` launched on the actor's
  host: the model runs in the actor's node, so on a cluster with GPUs the actor asks for
  `tensor_parallel_size` GPUs itself (Ray hands it those devices);
* `ray` (the default for tensor_parallel_size > 1): the engine creates its own placement
  group of tensor_parallel_size workers (`RayWorkerGroup`, STRICT_PACK: one node), so each
  replica's ranks are packed on one node and replicas spread over nodes by what is free:
  with 4-GPU nodes and tensor_parallel_size 4, every replica's group fills a node of its
  own. The actor itself may land on another node than its group; steps then cross the
  network once each way (one serialised plan out, one result back).

Replica actors are scheduled with Ray's SPREAD strategy, so a lost node takes as few
replicas with it as the cluster allows. A Ray this process starts (no address given) gets
this host's CPU count, or the replicas' need if that is more (so that every replica can be
scheduled; they then share the cores). On the CPU, replicas do not pin their workers
to cores unless `bind_cpu_cores` is given (each would pin to the same cores), and on a
local Ray a model running in its actor or its worker processes gets this host's cores
divided by the ranks of all replicas as threads.

Failure. An actor is never restarted by Ray (the router decides: it moves the streams and
asks the factory for a new replica under the same id; the factory kills the old actor,
whose engine may have died while the actor lives, and its devices with it). Every Ray error
that means the actor is gone, and an engine that stopped for good inside it, reach the
router as `ReplicaDeadError`.

Ray is imported only inside functions here: quire runs without it.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

from quire.cluster.core.block_hash import new_hash_seed
from quire.cluster.core.config import EngineConfig
from quire.cluster.core.kv_events import KVSnapshot
from quire.cluster.serving.engine_client import EngineDeadError
from quire.cluster.serving.replica import (
    HostedReplica,
    ReplicaDeadError,
    ReplicaHost,
    ReplicaInspection,
    ReplicaRequest,
    ReplicaUpdate,
)
from quire.cluster.serving.router import Router, served_model
from quire.cluster.serving.routing import make_policy

logger = logging.getLogger(__name__)

# A poll answers within its own timeout; beyond that plus this grace the actor is hung or gone.
POLL_GRACE_SECONDS = 30.0
# Loading a replica (weights, KV profiling) may take minutes for a large model.
READY_TIMEOUT_SECONDS = 1800.0
# Seconds a replica gets to stop its engine and workers before its actor is killed.
SHUTDOWN_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class ReplicaFacts:
    """What a started replica serves, as its engine measured it."""
    num_kv_blocks: int
    max_model_len: int
    tensor_parallel_size: int
    block_size: int
    node: str = ""  # the Ray node the actor runs on


class ReplicaActor(HostedReplica):
    """The body of one replica's Ray actor (made remote by `RayReplicaFactory`). Its methods
    are coroutines: they run on the actor's event loop, which the host's streams need.
    `engine_kwargs` are `EngineConfig.from_kwargs`'s, with the deployment's `hash_seed`
    and `kv_events=True`."""

    def __init__(self, replica_id: str, engine_kwargs: dict, max_queue_len: int = 0):
        from quire.cluster.core.engine import Engine

        self.replica_id = replica_id
        engine = Engine(EngineConfig.from_kwargs(**engine_kwargs))
        try:
            self.host = ReplicaHost.build(engine, max_queue_len)
        except BaseException:
            engine.shutdown()
            raise

    async def ready(self) -> ReplicaFacts:
        """The served model's facts, once the constructor has loaded it and a warm-up step ran."""
        import ray

        await self.host.warm_up()
        model = self.host.async_engine.model
        return ReplicaFacts(model.num_kv_blocks, model.max_model_len, model.tensor_parallel_size, model.block_size,
                            ray.get_runtime_context().get_node_id())

    async def abort(self, request_id: str) -> None:
        await self.host.abort(request_id)

    async def worker_pids(self) -> list[int]:
        return self.host.worker_pids()

    async def pid(self) -> int:
        """The actor's own process id."""
        return os.getpid()

    async def shutdown(self) -> None:
        # Joining the engine loop blocks: off the actor's event loop.
        await asyncio.get_running_loop().run_in_executor(None, self.host.shutdown)


def _replica_dead(replica_id: str, error: BaseException) -> ReplicaDeadError | None:
    """The ReplicaDeadError that `error` (from awaiting an actor call) amounts to, or None
    when it is the call's own failure."""
    import ray.exceptions as rex

    if isinstance(error, (ReplicaDeadError, EngineDeadError)):  # raised in the actor (a RayTaskError of it)
        return ReplicaDeadError(f"replica {replica_id}: {error}")
    gone = (rex.RayActorError, rex.ActorUnschedulableError, rex.WorkerCrashedError, rex.NodeDiedError,
            rex.LocalRayletDiedError, rex.ObjectLostError, rex.GetTimeoutError, asyncio.TimeoutError)
    if isinstance(error, gone):
        return ReplicaDeadError(f"replica {replica_id} is gone: {type(error).__name__}: {error}")
    return None


class RayReplica:
    """A `ReplicaHandle` over a replica actor. Every call raises ReplicaDeadError once the
    actor is gone or its engine stopped for good; a poll unanswered `poll_grace` seconds past
    its timeout counts as gone (a hung actor)."""

    def __init__(self, replica_id: str, actor, facts: ReplicaFacts | None = None,
                 poll_grace: float = POLL_GRACE_SECONDS):
        self.replica_id, self.actor, self.facts = replica_id, actor, facts
        self.poll_grace = poll_grace
        self._dead: str | None = None

    @property
    def node(self) -> str:
        """The Ray node the replica's actor runs on (known once it is ready)."""
        return self.facts.node if self.facts is not None else ""

    async def _call(self, method: str, *args, timeout: float | None = None):
        if self._dead is not None:
            raise ReplicaDeadError(f"replica {self.replica_id} is gone: {self._dead}")
        try:
            reference = getattr(self.actor, method).remote(*args)
            return await (asyncio.wait_for(reference, timeout) if timeout is not None else reference)
        except Exception as error:  # noqa: BLE001 - classified here: dead replica or the call's own failure
            dead = _replica_dead(self.replica_id, error)
            if dead is None:
                raise
            raise dead from error

    async def add(self, request: ReplicaRequest) -> None:
        await self._call("add", request)

    async def abort(self, request_id: str) -> None:
        if self._dead is None:
            await self._call("abort", request_id)

    async def poll(self, timeout: float) -> ReplicaUpdate:
        return await self._call("poll", timeout, timeout=timeout + self.poll_grace)

    async def kv_snapshot(self) -> KVSnapshot:
        return await self._call("kv_snapshot")

    async def inspect(self) -> ReplicaInspection:
        return await self._call("inspect")

    async def worker_pids(self) -> list[int]:
        """Process ids of the replica's workers on the actor's host ([] for an in-process model)."""
        return await self._call("worker_pids")

    async def pid(self) -> int:
        """The actor's process id."""
        return await self._call("pid")

    def kill(self, why: str = "killed") -> None:
        """End the actor at once, as a crash would (Ray does not restart it)."""
        import ray

        self._dead = self._dead or why
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone, or Ray is down: nothing left to kill
            pass

    async def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_SECONDS) -> None:
        """Stop the engine and its workers, then the actor (idempotent)."""
        if self._dead is None:
            try:
                await self._call("shutdown", timeout=timeout)
            except Exception as error:  # noqa: BLE001 - it is going away regardless
                logger.warning("replica %s did not shut down cleanly: %r", self.replica_id, error)
        self.kill("shut down")


def ensure_ray(ray_address: str | None, num_cpus_needed: int):
    """Ray, connected: to `ray_address` (else $RAY_ADDRESS) when given, else to a local Ray
    started with at least `num_cpus_needed` CPUs. Returns the `ray` module."""
    import ray

    address = ray_address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        # A local Ray needs no dashboard; quire's replicas and workers are its only tenants.
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                 **({} if address else {"num_cpus": max(num_cpus_needed, os.cpu_count() or 1)}))
    return ray


class RayReplicaFactory:
    """Starts the replicas of one deployment: all the same engine (`engine_kwargs`, flat as
    `EngineConfig.from_kwargs` takes them) sharing `hash_seed`, so the router can hash their
    blocks. `start(replica_id)` starts one (the router's `replica_factory` when a replica
    dies); `start_all(ids)` starts several concurrently. The factory remembers every replica
    it started until `kill_all`."""

    def __init__(self, engine_kwargs: dict, hash_seed: str, *, num_replicas: int = 1, max_queue_len: int = 0,
                 ready_timeout: float = READY_TIMEOUT_SECONDS, poll_grace: float = POLL_GRACE_SECONDS):
        kwargs = {**engine_kwargs, "hash_seed": hash_seed, "kv_events": True}
        # Replicas sharing a host would all pin their CPU workers to the same cores.
        kwargs.setdefault("bind_cpu_cores", False)
        config = EngineConfig.from_kwargs(**kwargs)  # a bad argument fails here, before any actor starts
        self.engine_kwargs, self.hash_seed, self.max_queue_len = kwargs, hash_seed, max_queue_len
        self.ready_timeout, self.poll_grace = ready_timeout, poll_grace
        parallel = config.parallel
        if parallel.worker_addresses:
            raise ValueError("`worker_addresses` name one engine's workers; every replica starts its own "
                             "(use --executor ray or workers without addresses)")
        tp, executor = parallel.tensor_parallel_size, parallel.resolved_executor
        workers_in_actor = executor in ("inproc", "workers")
        per_replica_cpus = 1 + (tp if executor == "ray" else 0)
        # One replica more than the most that serve at once: a rolling restart starts each new
        # replica before it drains an old one.
        ray = ensure_ray(parallel.ray_address, per_replica_cpus * (num_replicas + 1))
        cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
        num_gpus = tp if cluster_gpus and workers_in_actor else 0
        if num_gpus > cluster_gpus:
            raise RuntimeError(f"the Ray cluster has {cluster_gpus} GPUs; a replica with tensor_parallel_size={tp} "
                               f"needs {num_gpus}")
        options = dict(num_cpus=1, num_gpus=num_gpus, max_restarts=0, scheduling_strategy="SPREAD")
        on_this_host = not (parallel.ray_address or os.environ.get("RAY_ADDRESS"))
        if not cluster_gpus and workers_in_actor and on_this_host:
            # The model runs in the actor or its worker processes: each rank gets its share of this
            # host's cores as threads (else Ray's default for a one-CPU actor: one thread).
            ranks = num_replicas * (tp if executor == "workers" else 1)
            threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // ranks))
            options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": threads}}
        self._actor_cls = ray.remote(**options)(ReplicaActor)
        self.replicas: dict[str, RayReplica] = {}

    async def start(self, replica_id: str) -> RayReplica:
        """A new replica under `replica_id`, its model loaded. Raises RuntimeError naming the
        replica when it does not come up within `ready_timeout` (its actor is then killed)."""
        previous = self.replicas.pop(replica_id, None)
        if previous is not None:  # a replica whose engine died keeps its actor (and devices) until now
            previous.kill("replaced")
        actor = self._actor_cls.remote(replica_id, self.engine_kwargs, self.max_queue_len)
        replica = RayReplica(replica_id, actor, poll_grace=self.poll_grace)
        self.replicas[replica_id] = replica
        try:
            replica.facts = await asyncio.wait_for(actor.ready.remote(), self.ready_timeout)
        except BaseException as error:
            replica.kill("did not start")
            self.replicas.pop(replica_id, None)
            if isinstance(error, asyncio.TimeoutError):
                raise RuntimeError(f"replica {replica_id} did not start within {self.ready_timeout:.0f}s") from None
            if isinstance(error, Exception):
                # A failed constructor comes back as its whole remote traceback; its last line says why.
                lines = [line for line in str(error).splitlines() if line.strip()]
                logger.error("replica %s did not start: %s", replica_id, error)
                why = lines[-1] if lines else repr(error)
                raise RuntimeError(f"replica {replica_id} did not start: {why}") from error
            raise
        return replica

    async def start_all(self, replica_ids: list[str]) -> list[RayReplica]:
        """Start the replicas concurrently; when one fails, stop the others (their actors
        killed) and raise its error."""
        tasks = [asyncio.ensure_future(self.start(replica_id)) for replica_id in replica_ids]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()  # a replica still loading is killed by its own `start`
            for result in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(result, RayReplica):
                    result.kill("another replica did not start")
                    self.replicas.pop(result.replica_id, None)
            raise

    async def shutdown_all(self) -> None:
        """Stop every replica this factory started, each its engine and workers first (idempotent)."""
        replicas = list(self.replicas.values())
        self.replicas.clear()
        await asyncio.gather(*(replica.shutdown() for replica in replicas), return_exceptions=True)

    def kill_all(self) -> None:
        """Kill every replica actor this factory started (idempotent)."""
        for replica in self.replicas.values():
            replica.kill("shut down")
        self.replicas.clear()


async def start_router(engine_kwargs: dict, num_replicas: int, *, policy: str = "cache_aware",
                       max_queue_len: int = 0, make_metrics: Callable[[str], object] | None = None,
                       ready_timeout: float = READY_TIMEOUT_SECONDS, max_replicas: int | None = None,
                       **router_kwargs) -> tuple[Router, RayReplicaFactory]:
    """Start `num_replicas` replicas of `engine_kwargs` concurrently, under a fresh shared hash
    seed, and the Router over them (not started: its `start` needs the serving loop). The
    router restarts dead replicas through the returned factory, whose `shutdown_all` (or
    `kill_all`) ends every actor left when serving ends. `make_metrics(model_name)`: the router's metrics.
    `max_queue_len` is the router's; replicas queue without limit (a migrated stream must
    never be refused). `max_replicas`: the most the router may grow to (sizes a local Ray);
    `router_kwargs` go to the Router (autoscale, drain_grace_seconds). Raises RuntimeError
    naming a replica that did not start."""
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"`data_parallel_size` must be a positive integer (got {num_replicas!r})")
    make_policy(policy)  # a bad name fails now, not after minutes of loading
    # The router's own model facts (config and tokenizer): a bad checkpoint fails here, before Ray starts.
    model = served_model(engine_kwargs, 0)
    hash_seed = new_hash_seed()
    factory = RayReplicaFactory(engine_kwargs, hash_seed, num_replicas=max(num_replicas, max_replicas or 0),
                                ready_timeout=ready_timeout)
    replicas = await factory.start_all([f"replica-{index}" for index in range(num_replicas)])
    try:
        # Each replica sized its own cache; the router promises what the smallest holds.
        model = replace(model, num_kv_blocks=min(replica.facts.num_kv_blocks for replica in replicas))
        router = Router(replicas, model, hash_seed, policy=policy, replica_factory=factory.start,
                        max_queue_len=max_queue_len, metrics=make_metrics(model.name) if make_metrics else None,
                        **router_kwargs)
    except BaseException:
        factory.kill_all()
        raise
    return router, factory
