"""Tests for the tiny random checkpoint built on first use (quire.cluster.tools.default_model)."""

import pathlib

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from quire.cluster.tools import default_model
from quire.cluster.tools.default_model import CHECKPOINT_NAME, REQUIRED_FILES, tiny_random_model_dir

MULTIBYTE = "héllo wörld — 你好 🙂"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> pathlib.Path:
    # One build shared by the module: building is cheap, importing torch/transformers is not.
    return tiny_random_model_dir(tmp_path_factory.mktemp("cache"))


def test_build_creates_complete_checkpoint(built):
    assert built.name == CHECKPOINT_NAME
    for name in REQUIRED_FILES:
        assert (built / name).is_file(), name
    # No temp dirs are left next to the published checkpoint.
    assert [p.name for p in built.parent.iterdir()] == [CHECKPOINT_NAME]


def test_second_call_reuses_without_rebuilding(built, monkeypatch):
    mtimes = {p.name: p.stat().st_mtime_ns for p in built.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt an existing complete checkpoint")

    monkeypatch.setattr(default_model, "_build_tokenizer", fail)
    assert tiny_random_model_dir(built.parent) == built
    assert {p.name: p.stat().st_mtime_ns for p in built.iterdir()} == mtimes


def test_incomplete_dir_is_rebuilt(tmp_path):
    target = tmp_path / CHECKPOINT_NAME
    target.mkdir()
    (target / "config.json").write_text("{}")
    assert tiny_random_model_dir(tmp_path) == target
    assert all((target / name).is_file() for name in REQUIRED_FILES)


def test_builds_are_deterministic(built, tmp_path):
    other = tiny_random_model_dir(tmp_path)
    assert other != built
    assert (other / "tokenizer.json").read_bytes() == (built / "tokenizer.json").read_bytes()
    a = load_file(built / "model.safetensors")
    b = load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("QUIRE_CACHE_DIR", str(tmp_path / "q"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_model._cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert default_model._cache_root(None) == tmp_path / "q"
    monkeypatch.delenv("QUIRE_CACHE_DIR")
    assert default_model._cache_root(None) == tmp_path / "x" / "quire"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model._cache_root(None) == tmp_path / "home" / ".cache" / "quire"


def test_tokenizer_is_byte_level_and_round_trips(built):
    tok = AutoTokenizer.from_pretrained(built)
    assert 1500 <= len(tok) <= 2048
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")

    ids = tok(MULTIBYTE).input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == MULTIBYTE

    # Byte-level: some multi-byte character must span two or more tokens, i.e. several
    # tokens report the same one-character offset span.
    enc = tok(MULTIBYTE, add_special_tokens=False, return_offsets_mapping=True)
    spans = [tuple(span) for span in enc["offset_mapping"]]
    split = {MULTIBYTE[a:b] for (a, b) in spans
             if b - a == 1 and len(MULTIBYTE[a].encode()) > 1 and spans.count((a, b)) > 1}
    assert split, f"no multi-byte character split across tokens: {spans}"

    # Arbitrary text (unseen scripts, control bytes) still encodes and decodes exactly.
    odd = "ᚠᛇᚻ ∮ E⋅da = Q \x00\x7f 𝔘𝔫𝔦"
    assert tok.decode(tok(odd, add_special_tokens=False).input_ids) == odd


def test_chat_template(built):
    tok = AutoTokenizer.from_pretrained(built)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.startswith(tok.bos_token) and text.endswith("<|assistant|>\n")
    assert "hi" + tok.eos_token in text


def test_model_loads_and_runs(built):
    tok = AutoTokenizer.from_pretrained(built)
    model = AutoModelForCausalLM.from_pretrained(built).eval()
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    batch = tok(["hello world", MULTIBYTE], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_default_model_dir_honours_the_override(built, monkeypatch, tmp_path):
    # $QUIRE_DEFAULT_MODEL names the directory served when no model is given (the tests point it
    # at the tiny random model); an incomplete one is an error that says what is missing.
    monkeypatch.setenv("QUIRE_DEFAULT_MODEL", str(built))
    assert default_model.default_model_dir() == built
    monkeypatch.setenv("QUIRE_DEFAULT_MODEL", str(tmp_path))
    with pytest.raises(default_model.DefaultModelMissing, match="model.safetensors"):
        default_model.default_model_dir()
