"""Workers in their own processes, reached over gRPC (`quire.v1.Worker`).

Every call goes to all ranks at once and waits in lockstep; the first rank to fail
fails the call (the others would wait forever in a collective). Steps travel on one
long-lived `ExecuteSteps` stream per rank, each plan serialised once for all ranks.
A health thread pings every rank each `health_interval` seconds and watches the step in
flight, so a dead or hung worker is noticed within seconds even mid-step; it then
cancels the streams, which ends the wait.
"""
from __future__ import annotations

import logging
import queue
from collections import deque
import threading
import time

import grpc

from quire.cluster.executor.base import Executor, WorkerFailure
from quire.protos import worker_pb2 as pb
from quire.protos import GRPC_OPTIONS, worker_pb2_grpc
from quire.protos.step import StepPlan, StepResult

logger = logging.getLogger(__name__)

# Seconds a call may take before its rank counts as hung (loading a 70B shard is slow).
TIMEOUTS = {"LoadModel": 1800.0, "ProfileMemory": 600.0, "AllocateKVCache": 600.0, "ExecuteStep": 300.0,
            "Health": 5.0, "Shutdown": 10.0}


class _StepStream:
    """One rank's open ExecuteSteps call: serialised plans go in through a queue (gRPC's
    own thread sends them), results come back in order, as bytes."""

    def __init__(self, channel: grpc.Channel):
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        call = channel.stream_stream("/quire.v1.Worker/ExecuteSteps")  # no (de)serialisers: bytes in, bytes out
        self._responses = call(iter(self._outbox.get, None))

    def send(self, wire: bytes) -> None:
        self._outbox.put(wire)

    def receive(self) -> bytes:
        """The next result; raises grpc.RpcError when the call failed or was cancelled."""
        return next(self._responses)

    def close(self) -> None:
        self._outbox.put(None)
        self._responses.cancel()


class GrpcExecutor(Executor):
    runs_apart = True

    def __init__(self, addresses: list[str], connect_timeout: float = 60.0, health_interval: float = 1.0,
                 on_shutdown=None):
        """Connect to the workers at `addresses` (rank order). `on_shutdown` runs after the
        workers were told to stop (a launcher's cleanup)."""
        super().__init__()
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
        self._streams: list[_StepStream] | None = None
        self._step_started: float | None = None  # monotonic time the oldest step in flight began
        self._in_flight: deque[int] = deque()     # step ids submitted, not yet collected
        self._health_interval = health_interval
        self._health_thread = threading.Thread(target=self._watch, name="quire-worker-health", daemon=True)
        self._health_thread.start()

    def _fail(self, rank: int, what: str) -> WorkerFailure:
        """Record the first failure and end the step streams (waking a waiting `execute`)."""
        if self.failure is None:
            self.failure = WorkerFailure(f"worker rank {rank} at {self.addresses[rank]} {what}")
            logger.error("%s", self.failure)
            for stream in self._streams or []:
                stream.close()
        return self.failure

    def _fail_with_root_cause(self, rank: int, what: str) -> WorkerFailure:
        """A rank's error is often the echo of a peer's death (a collective lost its peer):
        blame a rank that no longer answers, if there is one."""
        for other, stub in enumerate(self.stubs):
            if other != rank and self.failure is None:
                try:
                    stub.Health(pb.HealthRequest(), timeout=2.0)
                except grpc.RpcError as error:
                    return self._fail(other, f"is unreachable ({error.code().name}): it died or hung "
                                             f"(then rank {rank} {what})")
        return self._fail(rank, what)

    def submit(self, plan: StepPlan) -> None:
        """Send the plan down every rank's step stream; each rank starts on it as soon as it
        is done with the step before."""
        if self.failure is not None:
            return  # collect() raises it
        if self._streams is None:
            self._streams = [_StepStream(channel) for channel in self.channels]
        wire = plan.to_pb().SerializeToString()
        self.bytes_sent += len(wire) * self.world_size
        if not self._in_flight:
            self._step_started = time.monotonic()
        self._in_flight.append(plan.step_id)
        for stream in self._streams:
            stream.send(wire)

    def collect(self) -> StepResult:
        if self.failure is not None:
            raise self.failure
        answers = []
        for rank, stream in enumerate(self._streams):
            try:
                answers.append(stream.receive())
            except (grpc.RpcError, StopIteration) as error:
                if self.failure is not None:
                    raise self.failure
                detail = f"{error.code().name} {error.details()}" if isinstance(error, grpc.Call) else "ended the stream"
                raise self._fail_with_root_cause(rank, f"failed ExecuteSteps: {detail}")
        step_id = self._in_flight.popleft()
        self._step_started = time.monotonic() if self._in_flight else None  # the next one runs from now on
        result = StepResult.from_pb(pb.StepResult.FromString(answers[0]))
        if result.step_id != step_id:
            raise self._fail(0, f"answered step {result.step_id} to step {step_id}")
        return result

    def execute(self, plan: StepPlan) -> StepResult:
        self.submit(plan)
        return self.collect()

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
                detail = f"{code.name} {error.details()}" if code else str(error)
                raise self._fail_with_root_cause(rank, f"failed {method}: {detail}")
        if self.failure is not None:
            for future in futures:
                future.cancel()
            raise self.failure
        return [future.result() for future in futures]

    def _watch(self) -> None:
        while not self._stop.wait(self._health_interval):
            started = self._step_started
            if started is not None and time.monotonic() - started > TIMEOUTS["ExecuteStep"]:
                # Alive but stuck, e.g. in a collective that another rank never joined.
                self._fail(0, f"did not finish a step within {TIMEOUTS['ExecuteStep']:.0f}s: workers hung")
                return
            for rank, stub in enumerate(self.stubs):
                try:
                    stub.Health(pb.HealthRequest(), timeout=TIMEOUTS["Health"])
                except grpc.RpcError as error:
                    if not self._stop.is_set():
                        self._fail(rank, f"is unreachable ({error.code().name}): it died or hung")
                    return

    def worker_pids(self) -> list[int]:
        """Process ids of the workers this executor's launcher started on this host (the
        launcher whose `stop` is `on_shutdown`, when it can tell); [] otherwise."""
        launcher = getattr(self._on_shutdown, "__self__", None)
        pids = getattr(launcher, "worker_pids", None)
        return list(pids()) if callable(pids) else []

    def check_health(self) -> None:
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        self._stop.set()
        for stream in self._streams or []:
            stream.close()
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
