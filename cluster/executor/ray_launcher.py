"""Workers as Ray actors: one per rank, in a placement group (one GPU per bundle, packed
on one node, as tensor parallelism wants; CPU bundles on a cluster without GPUs). Each
actor runs the same gRPC worker server as `quire worker`, so the controller talks to
every transport the same way. Ray is imported here only: quire runs without it."""
from __future__ import annotations

import logging
import os
import threading

from quire.cluster.executor.local_launcher import cores_per_rank, default_num_threads, free_port

logger = logging.getLogger(__name__)


class _WorkerActor:
    """Runs the worker's gRPC server in a thread of the actor process."""

    def __init__(self, rank: int, world_size: int, on_loopback: bool, cpu_cores: list[int] | None):
        self.rank, self.world_size, self.cpu_cores = rank, world_size, cpu_cores
        self.host = "127.0.0.1" if on_loopback else None

    def _host(self) -> str:
        import ray

        return self.host or ray.util.get_node_ip_address()

    def start(self) -> str:
        from quire.worker import server

        grpc_server, address, servicer = server.start_server(self.rank, self.world_size, f"{self._host()}:0",
                                                            cpu_cores=self.cpu_cores)

        def stop_on_shutdown():
            servicer.stopped.wait()
            grpc_server.stop(grace=1)

        threading.Thread(target=stop_on_shutdown, daemon=True).start()
        return address

    def rendezvous(self) -> str:
        """A torch.distributed URL on this actor's node (rank 0 hosts the store)."""
        return f"tcp://{self._host()}:{free_port(self._host())}"


class RayWorkerGroup:
    """The workers of one engine as Ray actors. With `bind_cpu_cores`, CPU workers on a
    Ray this process started (so on this host) are pinned to disjoint cores
    (`partition_cores`); on a cluster joined by address the node's cores are not ours to split."""

    def __init__(self, world_size: int, ray_address: str | None = None, start_timeout: float | None = None,
                 bind_cpu_cores: bool = True):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        address = ray_address or os.environ.get("RAY_ADDRESS")
        if not ray.is_initialized():
            # A local Ray needs no dashboard; quire's workers are its only tenants.
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                     **({} if address else {"num_cpus": max(world_size, os.cpu_count() or 1)}))
        self._remove_pg = remove_placement_group
        num_gpus = int(ray.cluster_resources().get("GPU", 0))
        if 0 < num_gpus < world_size:
            # Falling back to CPUs here would serve a large model unusably slowly (or not at all).
            raise RuntimeError(f"the Ray cluster has {num_gpus} GPUs; tensor_parallel_size={world_size} needs "
                               f"{world_size} (a cluster with no GPUs runs the workers on CPUs)")
        use_gpu = num_gpus >= world_size
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        if start_timeout is None:
            # On a cluster that adds nodes on demand, a new node takes minutes to boot and join.
            start_timeout = 1800.0 if address else 300.0
        self.placement_group = placement_group([bundle] * world_size, strategy="STRICT_PACK")
        try:
            ray.get(self.placement_group.ready(), timeout=start_timeout)
        except BaseException:
            # Never placed (or interrupted): give the request up, or it would claim a node's
            # GPUs later for nobody.
            remove_placement_group(self.placement_group)
            self.placement_group = None
            raise
        actor_cls = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(_WorkerActor)
        self.cpu_cores = cores_per_rank(world_size, bind_cpu_cores and not use_gpu and not address)
        self.actors = [
            actor_cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=rank),
                runtime_env={"env_vars": {"OMP_NUM_THREADS": default_num_threads(cores, world_size)}},
            ).remote(rank, world_size, on_loopback=not address, cpu_cores=cores)
            for rank, cores in enumerate(self.cpu_cores)
        ]
        self.addresses = ray.get([actor.start.remote() for actor in self.actors], timeout=start_timeout)
        self.dist_init_method = ray.get(self.actors[0].rendezvous.remote(), timeout=start_timeout)
        logger.info("Ray workers up at %s (%s bundles)", self.addresses, "GPU" if use_gpu else "CPU")

    def stop(self) -> None:
        import ray

        for actor in getattr(self, "actors", []):
            ray.kill(actor, no_restart=True)
        self.actors = []
        if getattr(self, "placement_group", None) is not None:
            self._remove_pg(self.placement_group)
            self.placement_group = None
