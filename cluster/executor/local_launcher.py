"""Start worker processes on this host, for tensor parallelism without Ray (and tests)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable



# `python -m` would put the current directory first on sys.path: started from a checkout,
# its top-level folders (kernels/, worker/) would shadow installed packages of the same name
# (transformers imports a `kernels` package). So the worker module runs through runpy, with
# that entry dropped; the same on every Python version quire supports.
_RUN_WORKER = ("import runpy, sys; del sys.path[0]; "
               "runpy.run_module('quire.worker.server', run_name='__main__', alter_sys=True)")


def worker_command(*args: str) -> list[str]:
    """The command line of a worker process (`quire.worker.server`) with `args`."""
    return [sys.executable, "-c", _RUN_WORKER, *args]

def partition_cores(cores: Iterable[int], world_size: int) -> list[list[int]] | None:
    """Disjoint CPU cores for each rank's worker: the first core stays with the controller,
    the others are split into `world_size` equal runs of neighbouring cores (a remainder
    stays with the controller too). None when there are not more cores than ranks: then
    binding would leave the controller no core of its own, and the OS places every thread."""
    cores = sorted(cores)
    per_rank = (len(cores) - 1) // world_size
    if per_rank < 1:
        return None
    return [cores[1 + rank * per_rank: 1 + (rank + 1) * per_rank] for rank in range(world_size)]


def cores_per_rank(world_size: int, bind: bool) -> list[list[int] | None]:
    """Each rank's cores from `partition_cores` over this process's own, or None per rank
    where there is no binding (not asked for, or too few cores)."""
    return (partition_cores(os.sched_getaffinity(0), world_size) if bind else None) or [None] * world_size


def default_num_threads(cores: list[int] | None, world_size: int) -> str:
    """The caller's OMP_NUM_THREADS if set, else the rank's cores, else this host's cores split between the ranks."""
    return os.environ.get("OMP_NUM_THREADS") or str(len(cores) if cores else max(1, (os.cpu_count() or 1) // world_size))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalWorkerLauncher:
    """Runs `world_size` worker processes (`python -m quire.worker.server`) on this host,
    each on a free port, and a free port for the torch.distributed rendezvous. CPU threads
    are split between the workers so they do not oversubscribe the cores; with
    `bind_cpu_cores`, CPU workers are pinned to disjoint cores (`partition_cores`), so a
    forward pass never shares its core with the controller or another rank."""

    def __init__(self, world_size: int, host: str = "127.0.0.1", start_timeout: float = 120.0,
                 bind_cpu_cores: bool = True):
        self.world_size = world_size
        self.dist_init_method = f"tcp://{host}:{free_port(host)}"
        self.processes: list[subprocess.Popen] = []
        self.addresses: list[str] = []
        self.cpu_cores = cores_per_rank(world_size, bind_cpu_cores)
        try:
            for rank, cores in enumerate(self.cpu_cores):
                binding = ["--cpu-cores", ",".join(map(str, cores))] if cores else []
                self.processes.append(subprocess.Popen(
                    worker_command("--rank", str(rank), "--world-size", str(world_size), "--listen", f"{host}:0",
                                   *binding),
                    stdout=subprocess.PIPE, text=True,
                    env={**os.environ, "OMP_NUM_THREADS": default_num_threads(cores, world_size)}))
            for rank, process in enumerate(self.processes):
                self.addresses.append(self._read_address(rank, process, start_timeout))
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _read_address(rank: int, process: subprocess.Popen, timeout: float) -> str:
        found: list[str] = []

        def read():
            for line in process.stdout:
                match = re.search(r"listening on (\S+)", line)
                if match:
                    found.append(match.group(1))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            raise RuntimeError(f"worker rank {rank} did not start within {timeout}s (exit code {process.poll()})")
        return found[0]

    def worker_pids(self) -> list[int]:
        """Process ids of the workers still running, in rank order."""
        return [process.pid for process in self.processes if process.poll() is None]

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the workers (idempotent)."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
