"""The shipped default model (cluster/assets/default-model, written by
scripts/train_default_model.py): present, small, bf16, and writing text in the style of its
training data, the Python standard library.

The word check recomputes the training text's vocabulary from the same corpus function the
script uses rather than reading a list the script shipped: the test then trusts nothing the
training run wrote, and no extra file ships with quire. It costs a few seconds of reading."""
import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from quire.cluster.tools.default_model import REQUIRED_FILES, SHIPPED_DIR, default_model_dir

PROMPTS = ["Return the", "The default value is", "def parse("]
CHAT = [{"role": "user", "content": "What does json.dumps do?"}]
NEW_TOKENS = 40
MIN_KNOWN_WORDS = 0.8
MAX_BYTES = 25 * 1024 * 1024

# Skipped only while none of the shipped files exists (a checkout before the training run):
# once any of them (training.json included) is there, the checkpoint must be complete and
# every test here runs.
SHIPPED = any((SHIPPED_DIR / name).exists() for name in (*REQUIRED_FILES, "training.json"))
pytestmark = pytest.mark.skipif(not SHIPPED, reason="the default model is not trained yet: no file of it in "
                                "cluster/assets/default-model (run scripts/train_default_model.py)")


def test_shipped_files_present():
    missing = [name for name in (*REQUIRED_FILES, "training.json", "README.md") if not (SHIPPED_DIR / name).is_file()]
    assert not missing, f"incomplete shipped model: {missing}"


def test_default_model_dir_is_the_shipped_model(monkeypatch):
    monkeypatch.delenv("QUIRE_DEFAULT_MODEL", raising=False)
    assert default_model_dir() == SHIPPED_DIR


def test_weights_are_bf16_and_small():
    path = SHIPPED_DIR / "model.safetensors"
    assert path.stat().st_size <= MAX_BYTES
    with safe_open(str(path), framework="pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"BF16"}
    assert json.loads((SHIPPED_DIR / "config.json").read_text()).get("architectures") == ["LlamaForCausalLM"]


def test_training_figures():
    report = json.loads((SHIPPED_DIR / "training.json").read_text())
    held = report["held_out"]
    assert math.isfinite(held["loss"]) and math.isfinite(held["perplexity"]) and held["perplexity"] > 1
    assert held["tokens"] > 0 and report["held_out"]["files"] > 0
    for key in ("seed", "steps", "tokens_seen", "parameters", "wall_time_s", "threads", "final_train_loss",
                "python_version", "corpus"):
        assert key in report, key


@pytest.fixture(scope="module")
def model():
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_DIR)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_DIR, dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def vocabulary(load_script):
    return load_script("scripts/default_model_corpus.py").training_words()


def greedy(tokenizer, model, ids: list[int]) -> str:
    with torch.no_grad():
        # min_new_tokens: a completion that ends early (EOS) still yields enough words to judge.
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def known_share(text: str, vocabulary: set[str]) -> float:
    words = re.findall(r"[A-Za-z_]+", text)
    assert len(words) >= 5, f"too few words generated: {text!r}"
    return sum(w in vocabulary for w in words) / len(words)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completions_use_the_training_vocabulary(model, vocabulary, prompt):
    tokenizer, lm = model
    text = greedy(tokenizer, lm, tokenizer(prompt).input_ids)
    assert known_share(text, vocabulary) >= MIN_KNOWN_WORDS, text


def test_chat_answers_like_documentation(model, vocabulary):
    tokenizer, lm = model
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    text = greedy(tokenizer, lm, list(ids))
    assert "<|user|>" not in text.split("\n", 1)[0], text  # it answers instead of asking
    assert known_share(text, vocabulary) >= MIN_KNOWN_WORDS, text


def test_quire_serves_it_as_hf_runs_it(model, monkeypatch):
    """`LLM()` with no model is the shipped model, and quire's greedy tokens are HF's (both
    stopping at the end-of-text token, which neither counts here)."""
    from quire.cluster import LLM, SamplingParams

    monkeypatch.delenv("QUIRE_DEFAULT_MODEL", raising=False)
    tokenizer, lm = model
    llm = LLM(dtype="float32", num_kv_blocks=64)
    try:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    finally:
        llm.shutdown()
    eos = tokenizer.eos_token_id
    for prompt, out in zip(PROMPTS, outs):
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            ref = lm.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        ref = ref[:ref.index(eos)] if eos in ref else ref
        ours = [t for t in out.outputs[0].token_ids if t != eos]
        assert ours == ref, prompt
