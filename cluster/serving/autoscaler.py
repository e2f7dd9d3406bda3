"""When the router grows or shrinks its data-parallel deployment.

The rule (in the spirit of Ray Serve's, with a queue signal added, since an LLM replica
admits requests until its KV cache or batch is full and queues the rest):

    load      = requests the router has in flight (routed and unfinished, or waiting for a
                replica), an exact count at every tick
    desired   = ceil(load / target_ongoing_requests), at least 1
    scale up   by one when, for `scale_up_seconds` on end, desired > current replicas or the
               replicas report waiting requests (>= `scale_up_waiting` per replica): they
               are saturated, queueing;
    scale down by one when, for `scale_down_seconds` on end, desired < current replicas and
               no replica reports a waiting request;
    always within [min_replicas, max_replicas], and one change at a time (no decision while a
    replica starts or drains; the windows restart after every change).

Defaults and why: `target_ongoing_requests` 64 (a replica batches many streams: at 64 it is
well into its efficient range, far from the default cap of 256 running requests, so TTFT
stays low); `scale_up_waiting` 1 (any sustained queue means arrivals outpace the replicas);
`scale_up_seconds` 10 (a replica takes tens of seconds to minutes to start: react to load
that lasts, not to a burst the queue absorbs); `scale_down_seconds` 60 (shrinking and
growing back costs a cold start and the cache: shrink only after a minute of idleness).
"""
from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoscaleConfig:
    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float = 64.0
    scale_up_waiting: float = 1.0
    scale_up_seconds: float = 10.0
    scale_down_seconds: float = 60.0
    tick_seconds: float = 1.0

    def __post_init__(self) -> None:
        for name in ("min_replicas", "max_replicas"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer (got {value!r})")
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"`max_replicas` ({self.max_replicas}) is below `min_replicas` ({self.min_replicas})")
        for name in ("target_ongoing_requests", "scale_up_waiting", "scale_up_seconds", "scale_down_seconds",
                     "tick_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                    value <= 0 if name in ("target_ongoing_requests", "tick_seconds") else value < 0):
                raise ValueError(f"`{name}` must be a finite positive number (got {value!r})")

    @property
    def elastic(self) -> bool:
        return self.max_replicas > self.min_replicas


class Autoscaler:
    """Feeds on one sample per tick, answers +1, -1 or 0 (see the module's rule). Pure logic:
    the caller supplies the clock, so tests drive it with any timeline."""

    def __init__(self, config: AutoscaleConfig):
        self.config = config
        self._up_since: float | None = None
        self._down_since: float | None = None

    def reset(self) -> None:
        """Start both windows again (after a change, or while one is under way)."""
        self._up_since = self._down_since = None

    def desired(self, load: int) -> int:
        return max(1, math.ceil(load / self.config.target_ongoing_requests))

    def decide(self, now: float, replicas: int, load: int, waiting: int, changing: bool) -> int:
        """`replicas`: serving now; `load`: requests in flight; `waiting`: requests the
        replicas report queued; `changing`: a replica is starting or draining."""
        config = self.config
        if changing:
            self.reset()
            return 0
        desired = self.desired(load)
        wants_up = (desired > replicas or waiting >= config.scale_up_waiting * replicas) and replicas < config.max_replicas
        wants_down = desired < replicas and waiting == 0 and replicas > config.min_replicas
        self._up_since = (self._up_since if self._up_since is not None else now) if wants_up else None
        self._down_since = (self._down_since if self._down_since is not None else now) if wants_down else None
        if wants_up and now - self._up_since >= config.scale_up_seconds:
            self.reset()
            return 1
        if wants_down and now - self._down_since >= config.scale_down_seconds:
            self.reset()
            return -1
        if replicas < config.min_replicas:  # below the floor (a replica was removed by hand): back up at once
            self.reset()
            return 1
        return 0

    async def run(self, sample: Callable[[], tuple[int, int, int, bool]], grow: Callable[[], Awaitable],
                  shrink: Callable[[], Awaitable]) -> None:
        """Once per tick, on the running loop: `sample()` gives (serving replicas, requests
        in flight, requests queued on the replicas, whether one is starting or draining);
        a decision awaits `grow()` or `shrink()` (a failure is logged, and the next window
        decides again). Runs until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.tick_seconds)
            replicas, load, waiting, changing = sample()
            step = self.decide(loop.time(), replicas, load, waiting, changing)
            if not step:
                continue
            logger.info("autoscaling %s: %d requests in flight, %d queued, on %d replicas",
                        "up" if step > 0 else "down", load, waiting, replicas)
            try:
                await (grow() if step > 0 else shrink())
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - logged; the next window decides again
                logger.exception("autoscaling %s failed", "up" if step > 0 else "down")
