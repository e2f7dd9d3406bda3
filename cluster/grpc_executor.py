"""Workers in their own processes, reached over gRPC (`quire.v1.Worker`).

Every call goes to all ranks at once and waits in lockstep; the first rank to fail
fails the call (the others would wait forever in a collective). A health thread pings
every rank each `health_interval` seconds, so a dead or hung worker is noticed within
seconds even while a step is in flight.
"""
from __future__ import annotations

import logging
import threading

import grpc

from quire.cluster.executor import Executor, WorkerFailure
from quire.protos import worker_pb2 as pb
from quire.protos import GRPC_OPTIONS, worker_pb2_grpc

logger = logging.getLogger(__name__)

# Seconds a call may take before its rank counts as hung (loading a 70B shard is slow).
TIMEOUTS = {"LoadModel": 1800.0, "ProfileMemory": 600.0, "AllocateKVCache": 600.0, "ExecuteStep": 300.0,
            "Health": 5.0, "Shutdown": 10.0}


class GrpcExecutor(Executor):
    def __init__(self, addresses: list[str], connect_timeout: float = 60.0, health_interval: float = 1.0,
                 on_shutdown=None):
        """Connect to the workers at `addresses` (rank order). `on_shutdown` runs after the
        workers were told to stop (a launcher's cleanup)."""
        self.addresses = list(addresses)
        self.world_size = len(addresses)
        self.channels = [grpc.insecure_channel(a, options=GRPC_OPTIONS) for a in addresses]
        self.stubs = [worker_pb2_grpc.WorkerStub(c) for c in self.channels]
        self.failure: WorkerFailure | None = None
        self.bytes_sent = 0
        self._on_shutdown = on_shutdown
        self._stop = threading.Event()
        for rank, channel in enumerate(self.channels):
            try:
                grpc.channel_ready_future(channel).result(timeout=connect_timeout)
            except grpc.FutureTimeoutError:
                self.close()
                raise WorkerFailure(f"rank {rank} at {addresses[rank]} did not answer within {connect_timeout}s")
        self._health_interval = health_interval
        self._health_thread = threading.Thread(target=self._watch, name="quire-worker-health", daemon=True)
        self._health_thread.start()

    def _fail(self, rank: int, what: str) -> WorkerFailure:
        if self.failure is None:
            self.failure = WorkerFailure(f"worker rank {rank} at {self.addresses[rank]} {what}")
            logger.error("%s", self.failure)
        return self.failure

    def _call_all(self, method: str, requests: list) -> list:
        if self.failure is not None:
            raise self.failure
        wire = requests[0].SerializeToString()
        self.bytes_sent += len(wire) * self.world_size
        finished = threading.Event()
        remaining = [self.world_size]
        lock = threading.Lock()

        def on_done(future):
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0 or future.exception() is not None:
                    finished.set()

        futures = []
        for stub, request in zip(self.stubs, requests):
            future = getattr(stub, method).future(request, timeout=TIMEOUTS[method])
            future.add_done_callback(on_done)
            futures.append(future)
        # Wake up regularly so a failure seen by the health thread ends the wait too.
        while not finished.wait(0.25):
            if self.failure is not None:
                break
        for rank, future in enumerate(futures):
            if future.done() and future.exception() is not None:
                error = future.exception()
                for other in futures:
                    other.cancel()
                code = error.code() if isinstance(error, grpc.Call) else None
                raise self._fail(rank, f"failed {method}: {code.name if code else ''} {error.details() if isinstance(error, grpc.Call) else error}")
        if self.failure is not None:
            for future in futures:
                future.cancel()
            raise self.failure
        return [future.result() for future in futures]

    def _watch(self) -> None:
        while not self._stop.wait(self._health_interval):
            for rank, stub in enumerate(self.stubs):
                try:
                    stub.Health(pb.HealthRequest(), timeout=TIMEOUTS["Health"])
                except grpc.RpcError as error:
                    if not self._stop.is_set():
                        self._fail(rank, f"is unreachable ({error.code().name}): it died or hung")
                    return

    def check_health(self) -> None:
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        self._stop.set()
        for channel in self.channels:
            channel.close()

    def shutdown(self) -> None:
        self._stop.set()
        if self.failure is None:
            try:
                self._call_all("Shutdown", [pb.ShutdownRequest()] * self.world_size)
            except WorkerFailure:  # already gone: nothing left to stop
                pass
        self.close()
        if self._on_shutdown is not None:
            self._on_shutdown()
