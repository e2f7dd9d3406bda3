"""Choose and bring up the executor a ParallelConfig asks for."""
from __future__ import annotations

import logging

from quire.cluster.core.config import ParallelConfig
from quire.cluster.executor.base import Executor
from quire.cluster.executor.inproc import InprocExecutor

logger = logging.getLogger(__name__)


def create_executor(parallel: ParallelConfig) -> tuple[Executor, str]:
    """The executor and the torch.distributed URL its workers rendezvous at ("" for one rank)."""
    kind = parallel.resolved_executor
    if kind == "inproc":
        return InprocExecutor(), ""
    from quire.cluster.executor.grpc_executor import GrpcExecutor

    if kind == "workers" and parallel.worker_addresses:
        if parallel.tensor_parallel_size > 1 and not parallel.dist_init_method:
            raise ValueError("`dist_init_method` is needed with `worker_addresses` and tensor_parallel_size > 1")
        return GrpcExecutor(parallel.worker_addresses), parallel.dist_init_method or ""
    if kind == "workers":
        from quire.cluster.executor.local_launcher import LocalWorkerLauncher

        launcher = LocalWorkerLauncher(parallel.tensor_parallel_size, bind_cpu_cores=parallel.bind_cpu_cores)
        try:
            return GrpcExecutor(launcher.addresses, on_shutdown=launcher.stop), launcher.dist_init_method
        except BaseException:
            launcher.stop()
            raise
    from quire.cluster.executor.ray_launcher import RayWorkerGroup

    group = RayWorkerGroup(parallel.tensor_parallel_size, parallel.ray_address,
                           bind_cpu_cores=parallel.bind_cpu_cores)
    try:
        return GrpcExecutor(group.addresses, on_shutdown=group.stop), group.dist_init_method
    except BaseException:
        group.stop()
        raise
