"""The HF peers of ``throughput.py``: ``generate`` in static, left-padded batches (run to each
batch's longest output, EOS disabled, as quire runs with ignore_eos) and ``generate_batch``
(transformers' continuous batching), each timed on the same work as quire. Also the HF greedy
reference that quire's tokens are checked against. Imported by path (benchmarks are scripts).
"""
from __future__ import annotations

import logging
import math
import time

import torch


def warmup_work(work, n: int):
    return [(p, min(o, 4)) for p, o in work[:max(1, n)]]



def quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)


def load_hf(model_path: str, dtype: str, attn: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype), attn_implementation=attn)
    model.eval()
    # Disable EOS: every row must emit exactly its output length, through EOS tokens, as quire
    # does with ignore_eos=True. (min_new_tokens would instead *ban* EOS and change the tokens.)
    # generate() fills unset fields from model.generation_config, so clear it there too.
    model.generation_config.eos_token_id = None
    return model


def _hf_gen_config(max_new_tokens: int, pad_id: int):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                            eos_token_id=None, temperature=None, top_p=None, top_k=None)


@torch.inference_mode()
def hf_static_batch(model, batch, pad_id: int) -> tuple[list[list[int]], int]:
    """One left-padded static batch run to its longest output; returns each row's own tokens
    and the number of output tokens computed (rows x longest output)."""
    max_prompt = max(len(p) for p, _ in batch)
    max_new = max(o for _, o in batch)
    ids = torch.full((len(batch), max_prompt), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), max_prompt), dtype=torch.long)
    for row, (p, _) in enumerate(batch):
        ids[row, max_prompt - len(p):] = torch.tensor(p)
        mask[row, max_prompt - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=_hf_gen_config(max_new, pad_id))
    gen = out[:, max_prompt:]
    if gen.shape[1] != max_new:
        raise RuntimeError(f"HF generate returned {gen.shape[1]} new tokens, expected {max_new} (EOS not disabled?)")
    return [gen[row, :o].tolist() for row, (_, o) in enumerate(batch)], gen.numel()


@torch.inference_mode()
def hf_reference(model, work, n: int, pad_id: int) -> list[list[int]]:
    """Unbatched, unpadded HF greedy tokens for the first `n` requests."""
    refs = []
    for p, o in work[:n]:
        out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             generation_config=_hf_gen_config(o, pad_id))
        refs.append(out[0, len(p):].tolist())
    return refs


class HFGeneratePeer:
    name = "hf_generate"

    def __init__(self, args, model_path: str, work, pad_id: int, model=None, load_seconds: float | None = None):
        self.args, self.model_path, self.work, self.pad_id = args, model_path, work, pad_id
        self.model, self.load_seconds = model, load_seconds

    def setup(self) -> dict:
        t0 = time.perf_counter()
        if self.model is None:
            self.model = load_hf(self.model_path, self.args.dtype, self.args.hf_attn)
            self.load_seconds = time.perf_counter() - t0
        init = self.load_seconds or 0.0
        warm = warmup_work(self.work, self.args.warmup_requests)
        for bs in self.args.hf_batch_sizes:
            for start in range(0, len(warm), bs):
                hf_static_batch(self.model, warm[start:start + bs], self.pad_id)
        return {"init_seconds": round(init, 3), "attn_implementation": self.model.config._attn_implementation,
                "batch_sizes_tried": self.args.hf_batch_sizes}

    def run(self):
        """Every batch size in turn; the fastest one's wall time and tokens (all walls in extras)."""
        runs = {bs: self._run(bs) for bs in self.args.hf_batch_sizes}
        best = min(runs, key=lambda bs: runs[bs][0])
        wall, tokens, extras = runs[best]
        extras.update(batch_size=best, num_batches=math.ceil(len(self.work) / best),
                      wall_seconds_by_batch_size={bs: round(r[0], 4) for bs, r in runs.items()})
        return wall, tokens, extras

    def _run(self, bs: int):
        tokens, computed = [], 0
        t0 = time.perf_counter()
        for start in range(0, len(self.work), bs):
            toks, n = hf_static_batch(self.model, self.work[start:start + bs], self.pad_id)
            tokens.extend(toks)
            computed += n
        wall = time.perf_counter() - t0
        useful = sum(len(t) for t in tokens)
        return wall, tokens, {"computed_output_tokens": computed,
                              "padded_output_waste": round(1 - useful / computed, 4) if computed else None}


class HFGenerateBatchPeer:
    """transformers' continuous batching, driven through its manager so that every request
    gets its own max_new_tokens (generate_batch itself takes one max_new_tokens for all)."""

    name = "hf_generate_batch"

    def __init__(self, args, model_path: str, work, pad_id: int):
        self.args, self.model_path, self.work, self.pad_id = args, model_path, work, pad_id
        self.model = None

    def setup(self) -> dict:
        t0 = time.perf_counter()
        self.model = load_hf(self.model_path, self.args.dtype, self.args.hf_cb_attn)
        init = time.perf_counter() - t0
        self._run(warmup_work(self.work, self.args.warmup_requests))
        return {"init_seconds": round(init, 3), "attn_implementation": self.model.config._attn_implementation,
                "page_size": self.args.hf_cb_page_size, "per_request_max_new_tokens": True,
                "note": "wall_seconds: first add_request to last result; manager start/stop in setup/teardown_seconds"}

    def _run(self, work):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.generation.continuous_batching.utils import WorkloadHints

        page = self.args.hf_cb_page_size
        # Size the cache explicitly: on the CPU auto-sizing reads host memory (psutil) and may
        # allocate gigabytes. Every request fits at once, so nothing is ever evicted.
        num_blocks = sum(math.ceil((len(p) + o) / page) for p, o in work) + 2
        cb_config = ContinuousBatchingConfig(
            page_size=page, num_blocks=num_blocks, max_batch_tokens=self.args.max_num_batched_tokens,
            max_requests_per_batch=self.args.max_num_seqs, allow_block_sharing=False, seed=self.args.seed,
            auto_switch_to_flash=False)
        gen_config = GenerationConfig(max_new_tokens=max(o for _, o in work), do_sample=False, eos_token_id=-1,
                                      pad_token_id=self.pad_id, temperature=None, top_p=None, top_k=None)
        hints = WorkloadHints(max_prompt_length=max(len(p) for p, _ in work),
                              max_generated_length=max(o for _, o in work), num_requests=len(work))
        results = {}
        t_enter = time.perf_counter()
        with self.model.continuous_batching_context_manager(
                generation_config=gen_config, continuous_batching_config=cb_config, block=True, timeout=30,
                workload_hints=hints) as manager:
            t_start = time.perf_counter()
            for i, (p, o) in enumerate(work):
                # eos_token_id=-1: no EOS, each request stops at exactly its own max_new_tokens.
                if manager.add_request(input_ids=p, request_id=f"r{i}", max_new_tokens=o, eos_token_id=-1) is None:
                    raise RuntimeError("the continuous batching manager refused a request")
            while len(results) < len(work):
                out = manager.get_result(timeout=1)
                if out is None:
                    if not manager.is_running():
                        raise RuntimeError("the HF continuous batching thread stopped with requests pending")
                    continue
                if out.is_finished():
                    if out.error is not None:
                        raise RuntimeError(f"HF continuous batching request {out.request_id} failed: {out.error}")
                    results[out.request_id] = out
            t_done = time.perf_counter()
        t_exit = time.perf_counter()
        tokens = [list(results[f"r{i}"].generated_tokens) for i in range(len(work))]
        return tokens, {"generation_seconds": t_done - t_start, "setup_seconds": round(t_start - t_enter, 4),
                        "teardown_seconds": round(t_exit - t_done, 4), "num_blocks": num_blocks}

    def run(self):
        tokens, timing = self._run(self.work)
        return timing.pop("generation_seconds"), tokens, timing


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
