"""`quire serve`: one process, one asyncio loop, both frontends over one engine.

The OpenAI-compatible HTTP server (uvicorn) and the gRPC `quire.v1.Generate` server share
the event loop and the `AsyncEngine`, so a request is a request whichever door it came
through: one queue, one `--max-queue-len`, one set of metrics. Once bound, the process
prints `quire: gRPC on HOST:PORT` and then `quire: serving MODEL on http://HOST:PORT`
(the real ports when asked for port 0).
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _chat_template(value: str) -> str:
    """A template file's content, or the value itself when it names no file."""
    path = Path(value)
    return path.read_text() if len(value) < 4096 and path.is_file() else value


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("serving")
    group.add_argument("--host", default="127.0.0.1")
    group.add_argument("--port", type=int, default=8000, help="HTTP port; 0 picks a free one (printed once bound)")
    group.add_argument("--grpc-port", type=int, default=50051,
                       help="gRPC port (quire.v1.Generate, health, reflection); 0 picks a free one; -1 disables it")
    group.add_argument("--api-key", default=None,
                       help="require `Authorization: Bearer KEY` (HTTP) / `authorization` metadata (gRPC); "
                            "/health and /metrics stay open")
    group.add_argument("--ssl-certfile", default=None, help="TLS certificate chain (PEM) for HTTP and gRPC")
    group.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM) for HTTP and gRPC")
    group.add_argument("--max-queue-len", type=int, default=0,
                       help="refuse new requests (HTTP 429, gRPC RESOURCE_EXHAUSTED) while this many wait; 0: no limit")
    group.add_argument("--max-request-bytes", type=int, default=32 << 20,
                       help="largest request body (HTTP 413) or gRPC message (RESOURCE_EXHAUSTED)")
    group.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                       help="replicas of the whole engine (each with --tensor-parallel-size workers) on the Ray "
                            "cluster behind one router; 1 runs one engine without Ray")
    group.add_argument("--min-replicas", type=int, default=None,
                       help="autoscaling: never fewer replicas than this (default: --data-parallel-size)")
    group.add_argument("--max-replicas", type=int, default=None,
                       help="autoscaling: never more replicas than this (default: --data-parallel-size; "
                            "above the minimum, the router adds replicas under sustained load and drains idle ones)")
    group.add_argument("--target-ongoing-requests", type=float, default=64.0,
                       help="autoscaling: requests in flight per replica the router aims at (default 64)")
    group.add_argument("--scale-up-seconds", type=float, default=10.0,
                       help="autoscaling: how long load must stay above target before a replica is added")
    group.add_argument("--scale-down-seconds", type=float, default=60.0,
                       help="autoscaling: how long load must stay below target, nothing queued, before one is drained")
    group.add_argument("--drain-grace-seconds", type=float, default=30.0,
                       help="a replica being removed finishes its requests for this long, then moves the rest")
    group.add_argument("--routing-policy", default="cache_aware", choices=["cache_aware", "least_loaded", "round_robin"],
                       help="how the router picks a replica for a request (with --data-parallel-size > 1)")
    group.add_argument("--chat-template", default=None,
                       help="Jinja chat template (a file or the template itself) for models without one")


def replica_bounds(args: argparse.Namespace):
    """The replicas to start with and the autoscaling bounds: `--min-replicas` and
    `--max-replicas` default to `--data-parallel-size`, which must lie between them (without
    it, the deployment starts at the minimum). ValueError naming the flag otherwise."""
    from quire.cluster.serving.autoscaler import AutoscaleConfig

    dp = args.data_parallel_size
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise ValueError(f"`data_parallel_size` must be a positive integer (got {dp!r})")
    low = args.min_replicas if args.min_replicas is not None else min(dp, args.max_replicas or dp)
    high = args.max_replicas if args.max_replicas is not None else max(dp, low)
    config = AutoscaleConfig(min_replicas=low, max_replicas=high, target_ongoing_requests=args.target_ongoing_requests,
                             scale_up_seconds=args.scale_up_seconds, scale_down_seconds=args.scale_down_seconds)
    initial = dp if args.data_parallel_size != 1 or args.min_replicas is None else low
    if not low <= initial <= high:
        raise ValueError(f"`data_parallel_size` ({initial}) must lie within --min-replicas ({low}) and "
                         f"--max-replicas ({high})")
    return initial, config


def _start_replicas(args: argparse.Namespace, engine_kwargs: dict):
    """Start `--data-parallel-size` replicas on Ray and the router over them: (router, its
    replica factory), or None after printing why they did not start (the caller exits 1)."""
    from quire.cluster.serving.ray_replicas import start_router
    from quire.cluster.serving.router_metrics import RouterMetrics

    initial, autoscale = replica_bounds(args)
    try:
        # The replicas' start is over before serving begins; the router starts on the server's loop.
        return asyncio.run(start_router(engine_kwargs, initial, policy=args.routing_policy,
                                        max_queue_len=args.max_queue_len, make_metrics=RouterMetrics,
                                        max_replicas=autoscale.max_replicas, autoscale=autoscale,
                                        drain_grace_seconds=args.drain_grace_seconds))
    except ValueError:
        raise  # bad configuration: the command line reports it
    except Exception as error:  # noqa: BLE001 - any failure to start: say which and why, then exit non-zero
        print(f"quire: {error}; exiting", file=sys.stderr, flush=True)
        return None


def run_server(args: argparse.Namespace, engine_kwargs: dict) -> int:
    import uvicorn
    from quire.cluster.serving.api_server import build_app
    from quire.cluster.serving.async_engine import AsyncEngine
    from quire.cluster.core.config import EngineConfig
    from quire.cluster.core.engine import Engine
    from quire.cluster.serving.grpc_server import GrpcFrontend
    from quire.cluster.serving.metrics import ServerMetrics

    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        raise ValueError("`--ssl-certfile` and `--ssl-keyfile` go together")
    if args.chat_template and engine_kwargs.get("skip_tokenizer_init"):
        raise ValueError("`--chat-template` needs a tokenizer; it cannot go with --skip-tokenizer-init")
    tls = None
    if args.ssl_certfile:
        tls = (Path(args.ssl_keyfile).read_bytes(), Path(args.ssl_certfile).read_bytes())
    if engine_kwargs.get("model") is None:
        from quire.cluster.tools.default_model import default_model_dir

        engine_kwargs = {**engine_kwargs, "model": str(default_model_dir())}
    initial, autoscale = replica_bounds(args)
    engine_failures: list[BaseException] = []
    replica_factory = None
    if initial == 1 and autoscale.max_replicas == 1:
        engine = Engine(EngineConfig.from_kwargs(**engine_kwargs))
        metrics = ServerMetrics(engine.info.name)

        def on_engine_dead(error: BaseException) -> None:
            # A failure that belongs to no request: stop serving and exit non-zero, so that a
            # supervisor (Kubernetes, systemd, Ray) restarts the process instead of it answering
            # 503 forever. /health says why until the server has closed.
            engine_failures.append(error)
            server.should_exit = True

        client = AsyncEngine(engine, max_queue_len=args.max_queue_len, metrics=metrics, on_dead=on_engine_dead)
    else:
        started = _start_replicas(args, engine_kwargs)
        if started is None:
            return 1
        client, replica_factory = started
        metrics = client.metrics
    if args.chat_template:
        client.model.tokenizer.chat_template = _chat_template(args.chat_template)
    grpc_frontend: list[GrpcFrontend] = []

    async def start_grpc():
        if args.grpc_port < 0:
            return
        frontend = GrpcFrontend(client, f"{args.host}:{args.grpc_port}", api_key=args.api_key, tls=tls,
                                max_message_bytes=args.max_request_bytes)
        await frontend.start()
        grpc_frontend.append(frontend)
        print(f"quire: gRPC on {_bracketed(args.host)}:{frontend.port}", flush=True)

    async def stop_grpc():
        for frontend in grpc_frontend:
            await frontend.stop()
        if replica_factory is not None:
            client.shutdown()  # on the server's loop, which its polls run on, while it still runs

    app = build_app(client, api_key=args.api_key, metrics=metrics, max_request_bytes=args.max_request_bytes,
                    on_startup=start_grpc, on_shutdown=stop_grpc)
    scheme = "https" if tls else "http"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:  # sockets are bound now, so the port is known even for --port 0
                port = self.servers[0].sockets[0].getsockname()[1]
                print(f"quire: serving {client.model.name} on {scheme}://{_bracketed(args.host)}:{port}",
                      flush=True)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   timeout_graceful_shutdown=5, ssl_certfile=args.ssl_certfile,
                                   ssl_keyfile=args.ssl_keyfile))
    try:
        server.run()
    finally:
        client.shutdown()
        if replica_factory is not None:  # every replica, also those the router replaced; the server's loop is gone
            asyncio.run(replica_factory.shutdown_all())
    if signal.SIGINT in getattr(server, "_captured_signals", ()):
        # Ctrl-C ends quire as it ends any program (status 130). uvicorn re-raises the signal
        # through the handler it found at start, which a library (Ray) may have replaced with
        # one that does not raise; say it here, whichever handler that was.
        raise KeyboardInterrupt
    if engine_failures:
        print(f"quire: the engine stopped ({engine_failures[0]!r}); exiting", file=sys.stderr, flush=True)
        return 1
    return 0 if server.started else 1
