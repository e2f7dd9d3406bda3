"""Shared fixtures: tiny checkpoints built by the tests themselves (no download)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before
# any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent

# `python -m pytest` puts the current directory on sys.path: from the checkout's root, its
# top-level folders (kernels/, worker/) would shadow installed packages of the same name
# (transformers imports a `kernels` package). quire itself is installed; drop that entry.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]


@pytest.fixture(scope="session")
def load_script():
    """Import a script of the repository (not part of the package) by its relative path."""
    def load(relative_path: str):
        spec = importlib.util.spec_from_file_location(Path(relative_path).stem, ROOT / relative_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, max_position_embeddings=512,
            rms_norm_eps=1e-6, initializer_range=0.2)

# name → (config class name, overrides): the families and attention shapes quire must match HF on.
TINY_CONFIGS = {
    "llama-mha": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa4": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2)),
    "llama3-tied-rope": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, rope_theta=500000.0)),
    "qwen2-bias": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral-gqa": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32)),
    # For tensor parallelism: 2 KV heads (replicated at tp=4), a vocabulary not divisible by 4.
    "llama-tp": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=2051)),
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The tiny random model (and its tokenizer), built once per session in a temp cache. The
    session's servers and `LLM()` without a model serve it (via $QUIRE_DEFAULT_MODEL, set by
    the tests that start them): the shipped trained model is tested in test_shipped_model.py."""
    from quire.cluster.tools.default_model import tiny_random_model_dir

    return tiny_random_model_dir(tmp_path_factory.mktemp("quire-cache"))


def build_checkpoint(directory: Path, name: str, tokenizer_dir: Path, dtype=torch.float32) -> Path:
    import transformers
    from transformers import AutoTokenizer

    config_cls_name, overrides = TINY_CONFIGS[name]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    settings = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = getattr(transformers, config_cls_name)(**{**settings, **TINY, **overrides})
    model_cls = getattr(transformers, config_cls_name.replace("Config", "ForCausalLM"))
    torch.manual_seed(0)
    model = model_cls(config).to(dtype)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir):
    """`tiny_checkpoint(name)` → path of a saved tiny checkpoint of that TINY_CONFIGS entry (cached)."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_checkpoint(tmp_path_factory.mktemp(name), name, tokenizer_dir)
        return built[name]

    return get
