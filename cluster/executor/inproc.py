"""The in-process executor: the worker runs in the controller's process (tests, `LLM` on one device)."""
from __future__ import annotations

from quire.cluster.executor.base import Executor
from quire.protos import worker_pb2 as pb


class InprocExecutor(Executor):
    """One rank in this process. Messages still cross a serialisation boundary each way."""

    _methods = {
        "LoadModel": ("load_model", pb.LoadModelRequest, pb.LoadModelResponse),
        "ProfileMemory": ("profile_memory", pb.ProfileMemoryRequest, pb.ProfileMemoryResponse),
        "AllocateKVCache": ("allocate_kv_cache", pb.AllocateKVCacheRequest, pb.AllocateKVCacheResponse),
        "ExecuteStep": ("execute_step", pb.StepPlan, pb.StepResult),
        "Health": ("health", pb.HealthRequest, pb.HealthResponse),
        "Shutdown": ("shutdown", pb.ShutdownRequest, pb.ShutdownResponse),
    }

    def __init__(self):
        from quire.worker.worker import Worker  # the controller imports the worker only here (and in the Ray actor)

        super().__init__()
        self.worker = Worker()
        self.bytes_sent = 0

    def _call_all(self, method: str, requests: list) -> list:
        handler, request_cls, response_cls = self._methods[method]
        wire = requests[0].SerializeToString()
        self.bytes_sent += len(wire)
        response = getattr(self.worker, handler)(request_cls.FromString(wire))
        return [response_cls.FromString(response.SerializeToString())]
