"""Offline batch generation, in the shape vLLM users know:

    from quire.cluster import LLM, SamplingParams
    llm = LLM(model="path/to/checkpoint")
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))

`LLM` is a synchronous caller of the `EngineClient` contract, like the HTTP and gRPC
frontends are asynchronous ones: it builds an engine, then uses only the client.
"""
from __future__ import annotations

import asyncio
import time

from tqdm import tqdm

from quire.cluster.core.config import EngineConfig
from quire.cluster.core.engine import Engine
from quire.cluster.core.outputs import OutputAccumulator, RequestOutput
from quire.cluster.serving.async_engine import AsyncEngine
from quire.cluster.serving.engine_client import EngineClient, EngineDeadError
from quire.cluster.tools.default_model import default_model_dir
from quire.protos.step import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, tensor_parallel_size: int = 1, block_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, num_kv_blocks: int | None = None,
                 dtype: str = "auto", seed: int = 0, max_model_len: int | None = None, tokenizer: str | None = None,
                 skip_tokenizer_init: bool = False, data_parallel_size: int = 1, routing_policy: str = "cache_aware",
                 **kwargs):
        """`tokenizer`: a tokenizer directory, for a checkpoint without one (default: the checkpoint's).
        `skip_tokenizer_init`: load none; prompts are then token ids, outputs have token ids and no text.
        Without `model`, quire's shipped default model (`default_model_dir()`).
        `data_parallel_size` > 1: that many replicas of the whole engine as Ray actors behind a
        router choosing by `routing_policy` (`self.engine` is then None: the engines live in
        the actors); 1: one engine in this process."""
        if isinstance(data_parallel_size, bool) or not isinstance(data_parallel_size, int) or data_parallel_size < 1:
            raise ValueError(f"`data_parallel_size` must be a positive integer (got {data_parallel_size!r})")
        if model is None:
            model = str(default_model_dir())
        engine_kwargs = dict(
            model=model, tensor_parallel_size=tensor_parallel_size, block_size=block_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, num_kv_blocks=num_kv_blocks, dtype=dtype, seed=seed,
            max_model_len=max_model_len, tokenizer=tokenizer, skip_tokenizer_init=skip_tokenizer_init, **kwargs)
        self.config = EngineConfig.from_kwargs(**engine_kwargs)
        self._async_engine: AsyncEngine | None = None
        self._replica_factory = None
        if data_parallel_size == 1:
            # The engine behind the client, for inspection between `generate` calls (no thread
            # touches it then: the client's loop runs only while a call does).
            self.engine: Engine | None = Engine(self.config)
            self._async_engine = AsyncEngine(self.engine)
            self.client: EngineClient = self._async_engine
            self._loop = asyncio.new_event_loop()
        else:
            from quire.cluster.serving.ray_replicas import start_router

            self.engine = None
            # The router lives on this loop: its polls run while a call does.
            self._loop = asyncio.new_event_loop()
            try:
                self.client, self._replica_factory = self._loop.run_until_complete(
                    start_router(engine_kwargs, data_parallel_size, policy=routing_policy))
            except BaseException:
                self._loop.close()
                raise

    def get_tokenizer(self):
        """The tokenizer; None with `skip_tokenizer_init`."""
        return self.client.model.tokenizer

    def generate(self, prompts: str | list[int] | list[str | list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, cache_salt: str | None = None) -> list[RequestOutput]:
        """Generate for every prompt (a string or a list of token ids); outputs in prompt order,
        each with its `n` completions in index order (the samples share the prompt's KV
        blocks). Only prompts with the same `cache_salt` share cached prefixes.

        A prompt the engine refuses raises its ValueError (naming the field), and every other
        prompt of the call is aborted, freeing its blocks."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"`sampling_params` has {len(params)} entries for {len(prompts)} prompts")
        generating = self._loop.create_task(self._generate_all(prompts, params, cache_salt, use_tqdm))
        try:
            return self._loop.run_until_complete(generating)
        except BaseException as error:  # e.g. Ctrl-C, which leaves the task pending: end it, aborting every request
            generating.cancel()
            self._loop.run_until_complete(asyncio.gather(generating, return_exceptions=True))
            if isinstance(error, EngineDeadError) and isinstance(error.__cause__, Exception):
                raise error.__cause__ from None  # offline callers get the engine's own failure (e.g. WorkerFailure)
            raise
        finally:
            if self._async_engine is not None:
                self._async_engine.pause()  # no thread touches the engine between calls

    async def _generate_all(self, prompts: list, params: list[SamplingParams], cache_salt: str | None,
                            use_tqdm: bool) -> list[RequestOutput]:
        accumulators = [OutputAccumulator() for _ in prompts]
        bar = tqdm(total=len(prompts), desc="generate", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        started, generated = time.perf_counter(), 0

        async def run(index: int) -> None:
            nonlocal generated
            async for delta in self.client.generate(prompts[index], params[index], cache_salt=cache_salt):
                accumulators[index].add(delta)
                generated += sum(len(completion.token_ids) for completion in delta.outputs)
                if delta.finished:
                    bar.update(1)
                    elapsed = time.perf_counter() - started
                    bar.set_postfix_str(f"{generated / max(elapsed, 1e-9):.1f} tok/s", refresh=False)

        tasks = [asyncio.ensure_future(run(index)) for index in range(len(prompts))]
        try:
            # Every task queues its request on its first run; only then does the engine loop
            # start, so it admits them all before its first step, whatever the timing: the
            # batches, and so the tokens, are the same from run to run.
            await asyncio.sleep(0)
            self.client.start()  # resumes a paused engine; a router starts polling its replicas once
            await asyncio.gather(*tasks)
        finally:  # a refusal or an interrupt: the others end too (closing a stream aborts its request)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            bar.close()
        return [accumulator.result() for accumulator in accumulators]

    def shutdown(self) -> None:
        """Stop the engine, or the router and every replica it ran (idempotent)."""
        if self._loop.is_closed():
            return
        self.client.shutdown()
        if self._replica_factory is not None:  # also replicas the router replaced
            self._loop.run_until_complete(self._replica_factory.shutdown_all())
        self._loop.close()
