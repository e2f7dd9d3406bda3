"""A worker as its own process: the `quire.v1.Worker` gRPC service around one `Worker`.

    quire worker --rank R --world-size N --listen HOST:PORT

`--listen HOST:0` binds a free port; the bound address is printed as
`quire-worker: rank R listening on HOST:PORT` so launchers can read it. The torch
distributed group (NCCL on CUDA, gloo on the CPU) is joined on LoadModel, at the URL
the controller sends (or `--dist-init`), by all ranks at once.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import threading
from concurrent import futures

import grpc
import torch

from quire.protos import GRPC_OPTIONS, worker_pb2_grpc
from quire.worker.worker import Worker, default_device

logger = logging.getLogger(__name__)



class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Runs every state-changing call on the worker on one thread of its own, one at a
    time; Health answers concurrently. A failure is returned as a gRPC error naming the
    rank.

    One thread, not whichever of gRPC's pool threads took the call: the CPU build of torch
    keeps an OpenMP thread team per calling thread, and once the teams' threads outnumber
    the cores, OpenMP stops spinning between parallel regions and every forward pass got
    half again slower."""

    def __init__(self, worker: Worker, rank: int, world_size: int, dist_init: str | None):
        self.worker, self.rank, self.world_size, self.dist_init = worker, rank, world_size, dist_init
        self._device_thread = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"quire-rank{rank}")
        self.stopped = threading.Event()

    def _run(self, context, method, request):
        return self._result(context, method.__name__, self._device_thread.submit(method, request))

    def _result(self, context, name: str, future: futures.Future):
        """The device thread's answer, or the call aborted with the error naming this rank."""
        try:
            return future.result()
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"rank {self.rank}: {error}")
        except Exception as error:  # the controller must learn which rank failed and why
            logger.exception("rank %d: %s failed", self.rank, name)
            context.abort(grpc.StatusCode.INTERNAL, f"rank {self.rank}: {type(error).__name__}: {error}")

    def LoadModel(self, request, context):
        if request.world_size != self.world_size or request.rank != self.rank:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"worker started as rank {self.rank}/{self.world_size}, "
                          f"asked to load as {request.rank}/{request.world_size}")
        if self.dist_init and not request.dist_init_method:
            request.dist_init_method = self.dist_init
        return self._run(context, self.worker.load_model, request)

    def ProfileMemory(self, request, context):
        return self._run(context, self.worker.profile_memory, request)

    def AllocateKVCache(self, request, context):
        return self._run(context, self.worker.allocate_kv_cache, request)

    def ExecuteStep(self, request, context):
        return self._run(context, self.worker.execute_step, request)

    def ExecuteSteps(self, request_iterator, context):
        """Steps in order, answered in order. Each plan goes to the device thread as soon as it
        arrives (read by a thread of this stream's own), so when the controller sends a step
        ahead (asynchronous scheduling) the device thread goes from one step straight to the
        next, no thread switch between them. After a failed step the stream ends and the steps
        queued behind it are not run."""
        queued: queue.SimpleQueue = queue.SimpleQueue()  # futures of the device thread, in order
        failed = threading.Event()

        def execute_step(plan):  # on the device thread, which runs the queued steps in order
            if failed.is_set():
                raise RuntimeError("not run: an earlier step of this stream failed")
            try:
                return self.worker.execute_step(plan)
            except BaseException:
                failed.set()
                raise

        def read_plans():
            try:
                for plan in request_iterator:
                    queued.put(self._device_thread.submit(execute_step, plan))
            except Exception:  # noqa: BLE001 - the stream was cancelled or broke: nothing more comes
                pass
            finally:
                queued.put(None)

        threading.Thread(target=read_plans, name=f"quire-rank{self.rank}-plans", daemon=True).start()
        while (future := queued.get()) is not None:
            yield self._result(context, "execute_step", future)

    def Health(self, request, context):
        return self.worker.health(request)

    def Shutdown(self, request, context):
        response = self._run(context, self.worker.shutdown, request)
        self.stopped.set()
        return response


def bind_to_cores(rank: int, cores: list[int]) -> bool:
    """Pin every thread of this process to `cores` (threads started later inherit it) and
    run at most that many torch threads, when this rank computes on the CPU: then its
    forward pass never shares a core with the controller or another rank. A CUDA rank's
    CPU threads only launch kernels and stay where the OS puts them. Returns whether it bound."""
    if not cores or default_device(rank).type != "cpu":
        return False
    if not set(cores) <= os.sched_getaffinity(0):
        raise ValueError(f"`cpu_cores` {cores} are not all among this process's cores {sorted(os.sched_getaffinity(0))}")
    for thread_id in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # the thread ended since the listing
            os.sched_setaffinity(int(thread_id), cores)
    torch.set_num_threads(min(len(cores), torch.get_num_threads()))
    logger.info("rank %d: bound to CPU cores %s, %d torch threads", rank, cores, torch.get_num_threads())
    return True


def parse_cores(text: str) -> list[int]:
    """'1,4-6' → [1, 4, 5, 6] (the format of taskset and /sys/.../cpulist)."""
    cores = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cores.extend(range(int(first), int(last or first) + 1))
    return cores


def start_server(rank: int, world_size: int, listen: str, dist_init: str | None = None,
                 cpu_cores: list[int] | None = None):
    """Start the gRPC server, first binding this process to `cpu_cores` (see
    `bind_to_cores`); returns (server, bound "host:port", servicer)."""
    bind_to_cores(rank, cpu_cores)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS)
    servicer = WorkerServicer(Worker(), rank, world_size, dist_init)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    host = listen.rsplit(":", 1)[0]
    port = server.add_insecure_port(listen)
    if port == 0:
        raise RuntimeError(f"cannot listen on {listen}")
    server.start()
    return server, f"{host}:{port}", servicer


def serve(rank: int, world_size: int, listen: str, dist_init: str | None = None,
          cpu_cores: list[int] | None = None) -> None:
    """Run the worker's gRPC server until Shutdown (or the process is killed)."""
    server, address, servicer = start_server(rank, world_size, listen, dist_init, cpu_cores)
    print(f"quire-worker: rank {rank} listening on {address}", flush=True)
    servicer.stopped.wait()
    server.stop(grace=1).wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="quire worker", description="Run one tensor-parallel worker")
    add_worker_args(parser)
    args = parser.parse_args(argv)
    run_from_args(args)


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to serve on (port 0: any free port)")
    parser.add_argument("--dist-init", default=None, help="torch.distributed URL, e.g. tcp://HOST:PORT")
    parser.add_argument("--cpu-cores", type=parse_cores, default=None,
                        help="pin a CPU worker to these cores, e.g. 1-3,8 (ignored on CUDA)")
    parser.add_argument("--log-level", default=None)


def run_from_args(args) -> None:
    logging.basicConfig(level=(args.log_level or "warning").upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not 0 <= args.rank < args.world_size:
        raise SystemExit(f"quire worker: --rank must be in [0, --world-size) (got {args.rank}, {args.world_size})")
    serve(args.rank, args.world_size, args.listen, args.dist_init, args.cpu_cores)


if __name__ == "__main__":
    main()
