"""quire's two built-in checkpoints, both usable with no download.

* The default model (``default_model_dir()``): a small Llama trained on the Python standard
  library by ``scripts/train_default_model.py`` and shipped with quire as package data
  (``cluster/assets/default-model``). It writes readable documentation-style English and
  Python; ``quire serve`` and ``LLM()`` use it when no model is given.
* The tiny random model (``tiny_random_model_dir()``): *built* on first use rather than
  shipped: a byte-level BPE tokenizer is trained on text every machine already has
  (standard-library docstrings plus a few fixed non-ASCII lines below), and a small
  ``LlamaForCausalLM`` is created from a fixed seed. Its weights are random: it exists so
  that quire's whole serving path (tokenizer, paged KV cache, sampling, HTTP) runs offline
  and fast in tests, not to produce sensible text.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pathlib
import shutil
import tempfile

CHECKPOINT_NAME = "tiny-random-llama-v1"  # bump when anything below changes the output
# The shipped, trained default model (package data; written by scripts/train_default_model.py).
SHIPPED_DIR = pathlib.Path(__file__).resolve().parent.parent / "assets" / "default-model"
# A directory to use instead of the shipped model when no model is given (tests point it at
# the tiny random model, which serves much faster).
DEFAULT_MODEL_ENV = "QUIRE_DEFAULT_MODEL"
VOCAB_SIZE = 2048
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors",
                  "tokenizer.json", "tokenizer_config.json")

# Pure-Python modules whose docstrings do not depend on the platform (no os/sys/socket:
# their docs differ between POSIX and Windows), so the corpus is the same on every
# machine running the same Python version.
_CORPUS_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "collections", "contextlib", "csv",
    "dataclasses", "difflib", "enum", "fractions", "functools", "heapq", "json",
    "logging", "pathlib", "pprint", "queue", "random", "re", "statistics", "string",
    "textwrap", "typing", "unittest",
)

# Multi-byte UTF-8 text so that non-ASCII scripts appear in the training data. They are
# deliberately rare relative to the English docstrings, so their byte sequences mostly
# stay unmerged and e.g. CJK characters and emoji encode as several byte-level tokens.
_NON_ASCII_LINES = (
    "Café, naïve, façade, déjà vu, São Paulo, Zürich, Ångström, señor, Łódź, Dvořák.",
    "Ελληνικά: Καλημέρα κόσμε, η γλώσσα μου έδωσαν ελληνική.",
    "Русский: Съешь же ещё этих мягких французских булок.",
    "中文：你好，世界。日本語：こんにちは世界。한국어: 안녕하세요 세계.",
    "Emoji: 🙂 🚀 ✨ 🎉 👍 — “quotes” ‘single’ … «guillemets» € £ ¥ ©.",
)

# Shared by both checkpoints; the default model's chat training examples are rendered with it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _cache_root(cache_dir: str | os.PathLike | None) -> pathlib.Path:
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    if os.environ.get("QUIRE_CACHE_DIR"):
        return pathlib.Path(os.environ["QUIRE_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(os.environ["XDG_CACHE_HOME"]) / "quire"
    return pathlib.Path.home() / ".cache" / "quire"


def _is_complete(path: pathlib.Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in REQUIRED_FILES)


def _corpus() -> list[str]:
    """Fixed, ordered training text: module docs, then public members' docs, by name."""
    texts = []
    for mod_name in sorted(_CORPUS_MODULES):
        module = importlib.import_module(mod_name)
        texts.append(inspect.getdoc(module) or "")
        for name in sorted(vars(module)):
            obj = getattr(module, name)
            # Only objects defined in the module itself: re-exports vary with what the
            # module happens to import on a given platform.
            if name.startswith("_") or getattr(obj, "__module__", None) != mod_name:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj):
                texts.append(inspect.getdoc(obj) or "")
    texts.extend(_NON_ASCII_LINES)
    return [t for t in texts if t]


def _build_tokenizer(out_dir: pathlib.Path):
    hf_tok = train_tokenizer(_corpus(), VOCAB_SIZE)
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer (a ``PreTrainedTokenizerFast``, not saved) trained on the
    iterable `texts`: at most `vocab_size` tokens, ids 0-2 the special tokens BOS, EOS, PAD,
    all 256 bytes in the alphabet (any UTF-8 text encodes), BOS prepended on encode, and
    CHAT_TEMPLATE as its chat template. Deterministic for given texts and library version."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],  # ids 0, 1, 2
        # All 256 bytes, so any UTF-8 text encodes even if a byte never occurs above.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Prepend bos on encode (Llama-style add_bos_token) and keep byte-level offsets.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)],
        ),
    ])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    return hf_tok


def _build_model(out_dir: pathlib.Path, hf_tok) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        torch_dtype="float32",  # accepted by transformers 4.x and 5.x alike
        architectures=["LlamaForCausalLM"],
    )
    # fork_rng: seed deterministically without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id,
                                               eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    # ~4M params (~16 MB), below the shard limit: one model.safetensors. The progress
    # bar is silenced for the duration only: it is noise for a sub-second write.
    from transformers.utils import logging as hf_logging

    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()


class DefaultModelMissing(FileNotFoundError):
    """The default model's directory is incomplete (see ``default_model_dir``)."""


def default_model_dir() -> pathlib.Path:
    """Return the directory of quire's default model: ``$QUIRE_DEFAULT_MODEL`` if set, else
    the shipped trained checkpoint (``SHIPPED_DIR``), loadable with ``AutoTokenizer`` /
    ``AutoModelForCausalLM``. Nothing is built or downloaded. Raises DefaultModelMissing when
    the chosen directory lacks any of ``REQUIRED_FILES`` (e.g. a checkout where the model was
    not trained yet: ``scripts/train_default_model.py`` writes it)."""
    override = os.environ.get(DEFAULT_MODEL_ENV)
    path = pathlib.Path(override) if override else SHIPPED_DIR
    if not _is_complete(path):
        missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
        source = f"${DEFAULT_MODEL_ENV}" if override else "the shipped default model"
        raise DefaultModelMissing(f"{source} at {path} lacks {', '.join(missing)}; train it with "
                                "scripts/train_default_model.py, or pass a model")
    return path


def tiny_random_model_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the directory of the tiny random checkpoint, building it on first use.

    The checkpoint lives in ``<root>/tiny-random-llama-v1`` where ``<root>`` is ``cache_dir``
    if given, else ``$QUIRE_CACHE_DIR``, else ``$XDG_CACHE_HOME/quire``, else
    ``~/.cache/quire``. It holds a Hugging Face-format Llama (config.json,
    model.safetensors, generation_config.json) and a byte-level BPE tokenizer
    (tokenizer.json, tokenizer_config.json) loadable with ``AutoTokenizer`` /
    ``AutoModelForCausalLM``. The weights are RANDOM (seeded): the model lets quire run
    with no download; its output is gibberish.

    Building is deterministic for a given Python and library version, takes a few
    seconds on CPU, and is safe under concurrency: each caller builds into a private
    temp dir beside the target and publishes it with an atomic ``os.replace``; a loser
    of that race discards its copy. An existing complete directory is returned as is.
    """
    root = _cache_root(cache_dir)
    target = root / CHECKPOINT_NAME
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_NAME}-", dir=root))
    try:
        hf_tok = _build_tokenizer(tmp)
        _build_model(tmp, hf_tok)
        # mkdtemp (and safetensors) create owner-only modes; a cache shared by several
        # users or containers must be readable by all of them.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if target.exists() and not _is_complete(target):
            # A partial directory (e.g. copied or edited by hand) would block the rename;
            # move it aside first so the publish below stays a single atomic step.
            stale = pathlib.Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_NAME}-stale-", dir=root))
            try:
                os.replace(target, stale)
            except OSError:
                pass  # another process moved or replaced it concurrently
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process published first (rename onto a non-empty dir fails).
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_llama(directory: str | os.PathLike, max_position_embeddings: int = 4096,
                     tokenizer_dir: str | os.PathLike | None = None, num_attention_heads: int = 4,
                     num_key_value_heads: int = 2) -> pathlib.Path:
    """Save a random tiny Llama (hidden 64, 2 layers, 4 heads, 2 KV heads by default; seed 0)
    with the tiny random model's tokenizer (or `tokenizer_dir`'s) into `directory`, for benchmarks
    that need a model of a given context length; returns the directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or tiny_random_model_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                         max_position_embeddings=max_position_embeddings,
                         rms_norm_eps=1e-6, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return pathlib.Path(directory)
