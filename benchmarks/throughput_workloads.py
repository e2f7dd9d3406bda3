"""Workload presets for `throughput.py` and `step_profile.py`, an attention timer, and the
machine's stolen CPU time (`cpu_ticks`, also used by `dispatch.py`).

``long``: 64 requests, prompts of 32-512 tokens, outputs of 16-256, on a randomly
initialised 6-layer Llama (hidden 768, 12 query heads over 4 KV heads of 64, SwiGLU
2048, 32k vocabulary), built from a fixed seed with transformers (config, then
``save_pretrained``) into a directory the caller owns. The checkpoint ships no tokenizer:
prompts are token ids and quire runs with ``skip_tokenizer_init=True``.

``AttentionTimer`` wraps an attention backend's ``write_kv`` and ``attend`` on the
instance (the class is untouched) and sums the wall time spent inside them; it is meant
for a separate, instrumented run, so that the timed runs pay nothing for it.
"""
from __future__ import annotations

import functools
import os
import time

LONG_MODEL = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
    num_key_value_heads=4, head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
    hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

# name -> (num_requests, input_len range, output_len range)
WORKLOADS = {"long": (64, (32, 512), (16, 256))}

# Static batch sizes HF generate tries when asked for its best one.
HF_BATCH_SIZES = (8, 16, 32, 64)


def build_long_model(directory: str, seed: int = 0) -> str:
    """Write the ``long`` workload's random Llama (fp32 safetensors, config, generation
    config; no tokenizer) into `directory` and return it. Same seed, same weights."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LONG_MODEL, architectures=["LlamaForCausalLM"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(directory, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(directory)
    return directory


def special_ids_of(config) -> set[int]:
    """The config's bos/eos/pad ids: kept out of prompts, as for a checkpoint with a tokenizer."""
    ids = set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(config, name, None)
        ids.update(v if isinstance(v, (list, tuple)) else [] if v is None else [v])
    return {int(i) for i in ids}


def apply_preset(args):
    """Fill the lengths `args` left unset from its `--workload` preset (the default one:
    64 requests, 32-128 in and out), and HF's batch sizes to try; returns `args`."""
    preset = WORKLOADS.get(args.workload, (64, (32, 128), (32, 128)))
    for name, value in zip(("num_requests", "input_len", "output_len"), preset):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.hf_batch_sizes is None and args.workload != "default":
        args.hf_batch_sizes = list(HF_BATCH_SIZES)
    args.hf_batch_sizes = args.hf_batch_sizes or [args.hf_batch_size]
    args.skip_tokenizer_init = False  # the caller sets it once it knows the checkpoint
    return args


def checkpoint(args):
    """`(model directory, holder)`: `--model`, else the ``long`` workload's model built into a
    temporary directory (`holder` owns it: keep it alive while the directory is used), else
    quire's shipped default model (holder None)."""
    if args.model is not None:
        return args.model, None
    if args.workload == "long":
        import tempfile

        holder = tempfile.TemporaryDirectory(prefix="quire-long-")
        return build_long_model(holder.name, args.seed), holder
    from quire.cluster.tools.default_model import default_model_dir

    return str(default_model_dir()), None


def has_tokenizer(model_dir: str) -> bool:
    return any(os.path.exists(os.path.join(model_dir, f))
               for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def attention_share(llm, run) -> dict:
    """Call `run()` (one generate of the workload on the in-process `llm`) with the attention
    backend's `write_kv` + `attend` timed; their share of its wall time."""
    with AttentionTimer(llm.engine.executor.worker.runner.attention) as timer:
        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
    return {"wall_seconds": round(wall, 3), "attention_seconds": round(timer.total_seconds, 3),
            "share_of_wall": round(timer.total_seconds / wall, 4),
            "seconds_by_method": {k: round(v, 3) for k, v in timer.seconds.items()}, "calls": timer.calls,
            "note": "a separate instrumented run; the timed runs are not wrapped"}


class AttentionTimer:
    """Times `backend.write_kv` and `backend.attend` while installed (a context manager).

    Installs instance attributes that shadow the class's methods and removes them on exit,
    so the backend behaves exactly as before afterwards. `seconds` sums both; `calls` counts
    them. Only meaningful where the backend runs synchronously (the CPU); on a GPU it would
    time the launches."""

    METHODS = ("write_kv", "attend")

    def __init__(self, backend):
        self.backend = backend
        self.seconds = {m: 0.0 for m in self.METHODS}
        self.calls = {m: 0 for m in self.METHODS}

    def _wrap(self, name: str, method):
        @functools.wraps(method)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1
        return timed

    def __enter__(self) -> AttentionTimer:
        for name in self.METHODS:
            setattr(self.backend, name, self._wrap(name, getattr(self.backend, name)))
        return self

    def __exit__(self, *exc) -> None:
        for name in self.METHODS:
            self.backend.__dict__.pop(name, None)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) CPU ticks of the machine so far, from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(field) for field in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the machine's CPU time its hypervisor gave to other guests between two
    `cpu_ticks()` readings (None off Linux)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])
