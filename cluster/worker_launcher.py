"""Start worker processes on this host, for tensor parallelism without Ray (and tests)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalWorkerLauncher:
    """Runs `world_size` worker processes (`python -m quire.worker.server`) on this host,
    each on a free port, and a free port for the torch.distributed rendezvous. CPU threads
    are split between the workers so they do not oversubscribe the cores."""

    def __init__(self, world_size: int, host: str = "127.0.0.1", start_timeout: float = 120.0):
        self.world_size = world_size
        self.dist_init_method = f"tcp://{host}:{free_port(host)}"
        self.processes: list[subprocess.Popen] = []
        self.addresses: list[str] = []
        env = dict(os.environ)
        threads = max(1, (os.cpu_count() or 1) // world_size)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        try:
            for rank in range(world_size):
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-m", "quire.worker.server", "--rank", str(rank), "--world-size",
                     str(world_size), "--listen", f"{host}:0"],
                    stdout=subprocess.PIPE, text=True, env=env))
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
