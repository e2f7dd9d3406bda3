"""`quire serve` in a subprocess on free ports, for tests that need a real server on loopback."""
from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SERVING_LINE = re.compile(r"quire: serving (\S+) on (https?://\S+:(\d+))$")
GRPC_LINE = re.compile(r"quire: gRPC on (\S+:(\d+))$")


def quire_command() -> list[str]:
    script = Path(sys.executable).with_name("quire")
    # (Not `python -m`: from the checkout's root its folders would shadow installed packages.)
    run_cli = "import sys; del sys.path[0]; from quire.cluster.cli import main; sys.exit(main())"
    return [str(script)] if script.is_file() else [sys.executable, "-c", run_cli]


class ServeProcess:
    """Starts `quire serve --port 0 --grpc-port 0 ARGS` and waits until both ports are announced.

    `model`, `http_url` and `grpc_target` ("127.0.0.1:PORT") are set once started; `output()`
    is everything the process printed so far. Use as a context manager: leaving stops it
    (SIGINT, then SIGKILL after `stop_timeout`)."""

    def __init__(self, args: list[str], env: dict, start_timeout: float = 90.0, stop_timeout: float = 20.0):
        self.stop_timeout = stop_timeout
        self.proc = subprocess.Popen([*quire_command(), "serve", "--port", "0", "--grpc-port", "0", *args],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._lines: queue.Queue[str] = queue.Queue()
        self._seen: list[str] = []
        threading.Thread(target=lambda: [self._lines.put(line) for line in self.proc.stdout], daemon=True).start()
        self.model = self.http_url = self.grpc_target = None
        deadline = time.monotonic() + start_timeout
        try:
            while self.http_url is None:
                try:
                    line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise RuntimeError(f"quire serve did not start within {start_timeout}s:\n{self.output()}") from None
                self._seen.append(line)
                if match := GRPC_LINE.match(line.strip()):
                    self.grpc_target = match.group(1)
                if match := SERVING_LINE.match(line.strip()):
                    self.model, self.http_url = match.group(1), match.group(2)
        except BaseException:
            self.stop()
            raise

    def output(self) -> str:
        while True:
            try:
                self._seen.append(self._lines.get_nowait())
            except queue.Empty:
                return "".join(self._seen)

    def stop(self) -> int:
        """Ctrl-C, as a user would; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
