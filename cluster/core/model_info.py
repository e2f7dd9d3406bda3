"""What the controller knows of the model: config, tokenizer, limits. Never its tensors."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from quire.cluster.core.config import ModelConfig

logger = logging.getLogger(__name__)

# Files a tokenizer directory usually has one of (fast, SentencePiece, BPE, WordPiece, tiktoken): without
# any, a failure to load says that no tokenizer is there.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "tokenizer.tiktoken")


@dataclass
class ModelInfo:
    path: Path
    name: str                  # the id clients use (the directory name)
    hf_config: object
    tokenizer: object          # None with skip_tokenizer_init: token-id prompts only, no text out
    dtype: str                 # resolved: float32 | float16 | bfloat16
    max_model_len: int
    vocab_size: int
    eos_token_ids: set[int]

    @classmethod
    def load(cls, config: ModelConfig) -> ModelInfo:
        """Read config.json, generation_config.json and the tokenizer (none with
        `skip_tokenizer_init`). ValueError naming `model` when the path is not a checkpoint,
        `tokenizer` when no tokenizer loads from `config.tokenizer` or the checkpoint."""
        from transformers import AutoConfig, GenerationConfig

        if config.model is None:  # the entry points (`LLM`, `quire serve`) put the default model here
            raise ValueError("`model`: no checkpoint directory given")
        path = Path(config.model)
        if not (path / "config.json").is_file():
            raise ValueError(f"`model`: {str(path)!r} is not a checkpoint directory (no config.json found)")
        hf_config = AutoConfig.from_pretrained(path)
        tokenizer = None if config.skip_tokenizer_init else cls._load_tokenizer(config.tokenizer, path)
        eos = set()
        try:
            generation = GenerationConfig.from_pretrained(path)
            ids = generation.eos_token_id
            eos.update(ids if isinstance(ids, list) else [] if ids is None else [ids])
        except OSError:  # no generation_config.json: config and tokenizer still name the eos
            pass
        ids = getattr(hf_config, "eos_token_id", None)
        eos.update(ids if isinstance(ids, list) else [] if ids is None else [ids])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)

        limit = getattr(hf_config, "max_position_embeddings", None) or 2048
        window = getattr(hf_config, "sliding_window", None)
        if window and getattr(hf_config, "use_sliding_window", True) and window < limit:
            # Sliding-window attention is not implemented: stay within the window, where it is exact.
            logger.warning("model uses sliding-window attention (%d); serving at most %d tokens", window, window)
            limit = window
        max_model_len = config.max_model_len or limit
        if max_model_len > limit:
            raise ValueError(f"`max_model_len` {max_model_len} exceeds the model's context length {limit}")
        return cls(path=path, name=path.name, hf_config=hf_config, tokenizer=tokenizer,
                   dtype=cls._resolve_dtype(config.dtype, hf_config), max_model_len=max_model_len,
                   vocab_size=hf_config.vocab_size, eos_token_ids=eos)

    @staticmethod
    def _load_tokenizer(given: str | None, model_path: Path):
        """AutoTokenizer from `given` (a directory), else from the checkpoint; ValueError naming
        `tokenizer`, --tokenizer and --skip-tokenizer-init when none loads (no traceback)."""
        from transformers import AutoTokenizer

        source = Path(given) if given is not None else model_path
        remedy = ("pass --tokenizer PATH (LLM(tokenizer=...)) naming a directory with one, or "
                  "--skip-tokenizer-init (LLM(skip_tokenizer_init=True)) to serve token-id prompts only")
        if not source.is_dir():  # (not looked up on the Hub: quire serves local directories)
            raise ValueError(f"`tokenizer`: {str(source)!r} is not a directory; {remedy}")
        try:
            return AutoTokenizer.from_pretrained(source)
        except Exception as exc:  # noqa: BLE001 - whatever transformers raises, it is this configuration error
            if not any((source / name).is_file() for name in TOKENIZER_FILES):
                raise ValueError(f"`tokenizer`: no tokenizer found in {str(source)!r} (no tokenizer.json, "
                                 f"tokenizer_config.json, tokenizer.model, ...); {remedy}") from None
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"`tokenizer`: cannot load the tokenizer in {str(source)!r} ({reason}); "
                             f"{remedy}") from None

    @staticmethod
    def _resolve_dtype(requested: str, hf_config) -> str:
        if requested != "auto":
            return requested
        import torch

        if not torch.cuda.is_available():
            return "float32"  # half precision matmuls on the CPU are slow and less exact
        stored = str(getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None) or "float16")
        stored = stored.replace("torch.", "")
        return stored if stored in ("float16", "bfloat16") else "float16"

    def encode_text(self, text: str, field: str, **kwargs) -> list[int]:
        """The tokenizer's ids for `text`; ValueError naming `field` when it cannot encode it
        (a lone UTF-16 surrogate from a JSON escape, say)."""
        try:
            return self.tokenizer.encode(text, **kwargs)
        except Exception as error:  # noqa: BLE001 - whatever the tokenizer refuses, the text is the caller's
            raise ValueError(f"`{field}` cannot be tokenized: {type(error).__name__}: {error}") from None

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt; ValueError naming `prompt` when empty or out of the vocabulary."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("`prompt`: text prompts need a tokenizer, and this engine was started with "
                                 "--skip-tokenizer-init (skip_tokenizer_init=True); send token ids")
            if not prompt:
                raise ValueError("`prompt` must not be empty")
            return self.encode_text(prompt, "prompt")
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("`prompt` must be a non-empty string or a non-empty list of token ids")
        bad = [t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"`prompt` token ids must be integers in [0, {self.vocab_size}); got {bad[:5]}")
        return list(prompt)
