"""Load a Hugging Face checkpoint directory into quire's model, one rank's shard at a time.

Reads `config.json` through transformers' AutoConfig and the weights from
`model.safetensors` or the shards named by `model.safetensors.index.json`. Tensors are
opened lazily with `safe_open(...).get_slice`, so a rank copies only its slice and a
70B checkpoint never sits whole in one process.
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch

from quire.worker.models import model_class
from quire.worker.parallel import ParallelContext

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_config(model_path: str | Path):
    """The checkpoint's transformers config; ValueError naming the path when it is not a checkpoint."""
    from transformers import AutoConfig

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model path {str(model_path)!r} is not a checkpoint directory (no config.json)")
    return AutoConfig.from_pretrained(path)


def safetensors_files(model_path: Path) -> list[Path]:
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_path / shard for shard in shards]
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model path {str(model_path)!r} holds no .safetensors weights")
    return files


def load_model(model_path: str | Path, ctx: ParallelContext, dtype: torch.dtype, device: torch.device,
               max_position: int):
    """Build the model for this rank and load its shard of the weights onto `device`."""
    from safetensors import safe_open

    path = Path(model_path)
    config = load_config(path)
    cls = model_class(config)
    with torch.device(device):
        model = cls(config, ctx, dtype, max_position)
    with ExitStack() as stack:
        def tensors():
            for file in safetensors_files(path):
                handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
                for name in handle.keys():
                    yield name, handle.get_slice(name)

        model.load_weights(tensors())
    return model.eval()
