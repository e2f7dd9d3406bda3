"""The default model's training script on a small slice: it trains, writes a loadable
checkpoint and training.json, learns, and is deterministic given its seed."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# A few files, a tiny model, a few steps: seconds, not the full run's ~40 minutes.
SMALL = ["--max-files", "4", "--vocab-size", "300", "--hidden-size", "32", "--intermediate-size", "64",
         "--layers", "1", "--heads", "2", "--kv-heads", "1", "--steps", "30", "--batch-size", "4",
         "--seq-len", "32", "--lr", "1e-2", "--warmup-steps", "2", "--log-every", "10", "--eval-windows", "4",
         "--threads", "1", "--seed", "7"]


@pytest.fixture(scope="module")
def train(load_script):
    return load_script("scripts/train_default_model.py")


@pytest.fixture(scope="module")
def corpus(load_script):
    return load_script("scripts/default_model_corpus.py")


@pytest.fixture(scope="module")
def runs(train, tmp_path_factory):
    """Two runs with the same seed, into two directories; the caller's thread count is kept."""
    threads = torch.get_num_threads()
    try:
        out = [tmp_path_factory.mktemp(f"run{i}") for i in range(2)]
        reports = [train.main([*SMALL, "--out", str(directory)]) for directory in out]
    finally:
        torch.set_num_threads(threads)
    return list(zip(out, reports))


def test_writes_a_loadable_checkpoint_and_its_figures(runs):
    out, report = runs[0]
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.architectures == ["LlamaForCausalLM"] and model.dtype == torch.bfloat16
    assert model.config.vocab_size == len(tokenizer) <= 300
    assert json.loads((out / "training.json").read_text()) == report
    for key in ("seed", "steps", "tokens_seen", "parameters", "wall_time_s", "threads", "final_train_loss",
                "python_version", "corpus"):
        assert key in report, key
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert math.isfinite(report["held_out"]["perplexity"]) and report["held_out"]["tokens"] > 0
    assert "PSF" in (out / "README.md").read_text()
    ids = tokenizer("Return the", return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


def test_loss_decreases(runs):
    report = runs[0][1]
    assert report["final_train_loss"] < report["initial_train_loss"] - 0.3, report["loss_curve"]


def test_same_seed_same_weights(runs):
    (a, report_a), (b, report_b) = runs
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert report_a["loss_curve"] == report_b["loss_curve"]


def test_chat_examples_use_the_shipped_template(runs, corpus):
    """The corpus renders chat examples exactly as the saved tokenizer's chat template does."""
    tokenizer = AutoTokenizer.from_pretrained(runs[0][0])
    messages = [{"role": "user", "content": "What does json.dumps do?"},
                {"role": "assistant", "content": "Serialize ``obj`` to a JSON formatted ``str``."}]
    assert corpus.render_chat(messages) == tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = messages[:1]
    assert corpus.render_chat(prompt, add_generation_prompt=True) == tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True)


def test_held_out_files_never_train(corpus):
    train, held = corpus.split_files()
    assert held and train
    assert all(corpus.is_held_out(rel) for rel, _ in held)
    assert not any(corpus.is_held_out(rel) for rel, _ in train)
    assert not any("/test/" in f"/{rel}" or rel.rsplit("/", 1)[-1].startswith("test_") for rel, _ in train)
    # The rule holds out roughly its share of files (a fixed rule: a hash of the path).
    assert 0.01 < len(held) / (len(train) + len(held)) < 0.06
