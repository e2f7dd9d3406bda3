"""Tests for quire.cluster.core.detokenizer.IncrementalDetokenizer.

The tokenizer is a tiny byte-level BPE trained here on fixed text, so the tests
need no network; its small vocabulary splits emoji, CJK and accented characters
across tokens, which is exactly what incremental decoding must handle.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quire.cluster.core import detokenizer
from quire.cluster.core.detokenizer import IncrementalDetokenizer

FFFD = "\ufffd"
WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world",
    "café", "naïve", "résumé", "façade", "Ångström", "über", "straße", "señor",
    "你好", "世界", "東京", "日本語", "テキスト", "한국어", "数据",
    "😀", "🎉", "👍🏽", "🚀", "❤️", "🤖", ".", ",", "!", "?",
]  # fmt: skip


@pytest.fixture(scope="session")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = [
        " ".join(WORDS[(i * 7 + j * 3 + j * j) % len(WORDS)] for j in range(4 + i % 7))
        for i in range(300)
    ]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,  # small on purpose: multi-byte characters stay split
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def stream(tok, ids, chunks=1, prompt=(), stop=(), include=False, skip=True):
    """Feed ids ``chunks`` at a time, taking a delta after each append.

    Returns (detokenizer, deltas, matched stop). Checks on the way that the text
    streamed so far is always a prefix of the text the request ends with.
    """
    d = IncrementalDetokenizer(tok, list(prompt), list(stop), include, skip)
    deltas, matched = [], None
    for i in range(0, len(ids), chunks):
        matched = d.append(ids[i : i + chunks])
        deltas.append(d.take_delta(finished=False))
        if matched is not None:
            break
    deltas.append(d.take_delta(finished=True))
    assert d.output_text.startswith("".join(deltas[:-1]))
    assert "".join(deltas) == d.output_text
    return d, deltas, matched


def test_tokenizer_splits_multibyte_characters(tok):
    # Precondition for the tests below: single tokens decode to partial characters.
    ids = tok.encode("😀 你好 straße 🤖")
    assert any(FFFD in tok.decode([i]) for i in ids)
    assert tok.decode(ids) == "😀 你好 straße 🤖"


@pytest.mark.parametrize("text", ["😀 🎉 hello 你好 café 👍🏽 straße", "a 🤖 b 東京. 한국어 ❤️"])
@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_split_multibyte_characters_never_stream_fffd(tok, text, chunks):
    ids = tok.encode(text)
    d, deltas, _ = stream(tok, ids, chunks, prompt=tok.encode("the quick"))
    assert "".join(deltas) == d.output_text == text
    assert not any(FFFD in delta for delta in deltas)
    # Each multi-byte character comes out whole and in order.
    assert [c for delta in deltas for c in delta] == list(text)


def test_prompt_context_not_in_output(tok):
    prompt = tok.encode("hello world")
    ids = tok.encode(" café 🚀")  # leading space must survive, prompt text must not
    d, deltas, _ = stream(tok, ids, prompt=prompt)
    assert d.output_text == " café 🚀"


def test_prompt_context_gives_leading_space():
    # SentencePiece-style decoding drops the first token's leading space; in the
    # middle of a sentence the output must keep it, as decoding in context does.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "▁hello", "▁world", "▁again", "!"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    sp = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    assert sp.decode([2, 3]) == "world again"
    d, _, _ = stream(sp, [2, 3, 4], prompt=[1])
    assert d.output_text == " world again!"


def test_prompt_ending_mid_character(tok):
    emoji = tok.encode("🤖")
    assert len(emoji) > 1
    # The prompt holds the emoji's first token; the output completes it.
    prompt = tok.encode("hello ") + emoji[:1]
    ids = emoji[1:] + tok.encode(" ok")
    d, _, _ = stream(tok, ids, prompt=prompt)
    assert d.output_text == tok.decode(ids)


def test_trailing_incomplete_character_flushed_at_finish(tok):
    ids = tok.encode("dog 🤖")[:-1]  # ends mid-emoji
    full = tok.decode(ids)
    assert full.endswith(FFFD)
    d = IncrementalDetokenizer(tok, [], [])
    assert d.append(ids) is None
    first = d.take_delta(finished=False)
    assert first.startswith("dog") and FFFD not in first
    assert first + d.take_delta(finished=True) == full == d.output_text


def _boundary_stop(tok, ids):
    """A stop string made of the last chars of one token and the first of the next."""
    pieces = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    for i in range(1, len(ids) - 1):
        a, b = pieces[i - 1], pieces[i]
        if len(a) >= 2 and len(b) - len(a) >= 2 and FFFD not in b:
            stop = a[-2:] + b[len(a) : len(a) + 2]
            full = pieces[-1]
            assert full.index(stop) == len(a) - 2
            return stop, len(a) - 2
    raise AssertionError("no token boundary suitable for a spanning stop string")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tok, include):
    text = "the lazy dog jumps over the brown fox. hello world"
    ids = tok.encode(text)
    stop, pos = _boundary_stop(tok, ids)
    d, deltas, matched = stream(tok, ids, stop=["never", stop], include=include)
    assert matched == stop == d.matched_stop
    assert d.output_text == text[: pos + len(stop) if include else pos]
    assert "".join(deltas) == d.output_text
    assert d.append(tok.encode(" more")) == stop  # ignored once stopped
    assert d.output_text == text[: pos + len(stop) if include else pos]


def test_stop_string_ending_in_multibyte_character(tok):
    text = "hello 你好 world"
    ids = tok.encode(text)
    d, deltas, matched = stream(tok, ids, stop=["o 你"])
    assert matched == "o 你"
    assert d.output_text == "hell"
    assert not any(FFFD in delta for delta in deltas)


def test_first_completed_stop_wins(tok):
    # "fox jumps" starts first but "x j" completes first.
    ids = tok.encode("brown fox jumps over")
    d, _, matched = stream(tok, ids, chunks=len(ids), stop=["fox jumps", "x j"])
    assert matched == "x j" and d.output_text == "brown fo"


def test_holdback_never_streams_part_of_stop(tok):
    text = "hello world STOP here"
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, [], ["STOP"])
    streamed = ""
    for i in ids:
        if d.append([i]):
            break
        streamed += d.take_delta(finished=False)
        assert "S" not in streamed  # not even the first character of the stop
    streamed += d.take_delta(finished=True)
    assert streamed == d.output_text == "hello world "


def test_holdback_released_when_stop_does_not_complete(tok):
    text = "hello world STOx here STO"
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, [], ["STOP", "never"])
    streamed = ""
    for i in ids:
        assert d.append([i]) is None
        streamed += d.take_delta(finished=False)
        if d.output_text.endswith("STO"):
            assert not streamed.endswith("S") and not streamed.endswith("ST")
    assert streamed == "hello world STOx here "  # trailing "STO" still held back
    assert streamed + d.take_delta(finished=True) == text == d.output_text


vocab_ids = st.integers(min_value=0, max_value=319)


@pytest.fixture(params=[1024, 1], ids=["retire-1024-chars", "retire-every-char"])
def retire(request, monkeypatch):
    """Sent text leaves the live window in chunks of this many characters; at 1 every delta
    retires what it can, so the properties below also cover text split between chunks."""
    monkeypatch.setattr(detokenizer, "_RETIRE_CHARS", request.param)


@settings(
    max_examples=50,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    prompt=st.lists(vocab_ids, max_size=8),
    ids=st.lists(vocab_ids, max_size=40),
    chunks=st.integers(1, 4),
    skip=st.booleans(),
)
def test_property_matches_one_shot_decode(tok, retire, prompt, ids, chunks, skip):
    d, deltas, matched = stream(tok, ids, chunks, prompt=prompt, stop=[], skip=skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    assert matched is None
    assert d.output_text == "".join(deltas) == full
    if FFFD not in full:
        assert not any(FFFD in delta for delta in deltas)


@settings(
    max_examples=50,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    words=st.lists(st.sampled_from(WORDS), min_size=2, max_size=12),
    data=st.data(),
    chunks=st.integers(1, 4),
    include=st.booleans(),
)
def test_property_stop_cut_at_first_occurrence(tok, retire, words, data, chunks, include):
    text = " ".join(words)
    ids = tok.encode(text)
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start : start + data.draw(st.integers(1, 6))]
    pos = text.index(stop)
    d, deltas, matched = stream(tok, ids, chunks, stop=[stop], include=include)
    assert matched == stop
    assert d.output_text == text[: pos + len(stop) if include else pos]
    assert not any(FFFD in delta for delta in deltas)
