"""Offline batch generation, in the shape vLLM users know:

    from quire.cluster import LLM, SamplingParams
    llm = LLM(model="path/to/checkpoint")
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
"""
from __future__ import annotations

import dataclasses
import time

from tqdm import tqdm

from quire.cluster.core.config import EngineConfig
from quire.cluster.core.engine import Engine
from quire.cluster.core.outputs import RequestOutput
from quire.protos.step import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, tensor_parallel_size: int = 1, block_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, num_kv_blocks: int | None = None,
                 dtype: str = "auto", seed: int = 0, max_model_len: int | None = None, tokenizer: str | None = None,
                 skip_tokenizer_init: bool = False, **kwargs):
        """`tokenizer`: a tokenizer directory, for a checkpoint without one (default: the checkpoint's).
        `skip_tokenizer_init`: load none; prompts are then token ids, outputs have token ids and no text."""
        self.config = EngineConfig.from_kwargs(
            model=model, tensor_parallel_size=tensor_parallel_size, block_size=block_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, num_kv_blocks=num_kv_blocks, dtype=dtype, seed=seed,
            max_model_len=max_model_len, tokenizer=tokenizer, skip_tokenizer_init=skip_tokenizer_init, **kwargs)
        self.engine = Engine(self.config)

    def get_tokenizer(self):
        """The tokenizer; None with `skip_tokenizer_init`."""
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | list[str | list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, cache_salt: str | None = None) -> list[RequestOutput]:
        """Generate for every prompt (a string or a list of token ids); outputs in prompt order,
        each with `n` completions (its sampling params' `n`: the samples share the prompt's KV
        blocks). Only prompts with the same `cache_salt` share cached prefixes.

        Every prompt is validated before any is queued: a bad one raises ValueError and
        nothing runs."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"`sampling_params` has {len(params)} entries for {len(prompts)} prompts")
        groups: list[list[str]] = []  # per prompt, the request ids of its samples
        try:
            for prompt, p in zip(prompts, params):
                first = self.engine.add_request(prompt, p.for_sample(0), cache_salt=cache_salt)
                groups.append([first])
                for index in range(1, p.n):
                    groups[-1].append(self.engine.add_request(prompt, p.for_sample(index), f"{first}-{index}",
                                                              cache_salt=cache_salt, fork_of=first))
        except Exception:
            for request_id in (i for group in groups for i in group):
                self.engine.abort(request_id)
            raise
        finals = self._run([i for group in groups for i in group], use_tqdm)
        outputs = []
        for group in groups:
            first = finals[group[0]]
            completions = [dataclasses.replace(finals[i].outputs[0], index=k) for k, i in enumerate(group)]
            outputs.append(dataclasses.replace(first, outputs=completions))
        return outputs

    def _run(self, ids: list[str], use_tqdm: bool) -> dict[str, RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        started, generated = time.perf_counter(), 0
        try:
            while self.engine.has_unfinished():
                for output in self.engine.step():
                    generated += 1
                    if output.finished:
                        finals[output.request_id] = output
                        bar.update(1)
                elapsed = time.perf_counter() - started
                bar.set_postfix_str(f"{generated / max(elapsed, 1e-9):.1f} tok/s", refresh=False)
        finally:
            bar.close()
            for request_id in ids:
                if request_id not in finals:
                    self.engine.abort(request_id)
        return finals

    def shutdown(self) -> None:
        self.engine.shutdown()
