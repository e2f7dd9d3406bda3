"""What the fuzz tests (test_fuzz.py) send: hypothesis strategies for HTTP bodies of
`/v1/completions` and `/v1/chat/completions` (valid fields, their extremes and their wrong
types, mixed), `quire.v1.GenerateRequest` messages, and damaged protobuf bytes. Extremes are
drawn often but not always (`rarely`), so most examples still reach the engine."""
from __future__ import annotations

import json

from hypothesis import strategies as st
from quire.protos import generate_pb2 as pb


def chance(one_in: int):
    """True about once in `one_in` draws (hypothesis favours the ends of a range, so not those)."""
    return st.integers(0, 2 * one_in - 1).map(lambda roll: roll in (one_in // 2, one_in + one_in // 2))


def rarely(strategy, otherwise, one_in: int = 6):
    """`strategy` about once in `one_in` draws, else `otherwise` (a strategy or a value)."""
    usual = otherwise if isinstance(otherwise, st.SearchStrategy) else st.just(otherwise)
    return chance(one_in).flatmap(lambda hit: strategy if hit else usual)


def unit(low: float, high: float):
    return st.floats(low, high, allow_nan=False)


# -- values --------------------------------------------------------------------------------------
INTS = [0, 1, -1, 2**31 - 1, 2**31, -2**31, -2**31 - 1, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63,
        -2**63, -2**63 - 1, 2**64 - 1, 2**64, 10**100, -10**100]
FLOATS = [-0.0, 5e-324, 2.2250738585072014e-308, 1e-46, 1e-45, 1e-39, 1.1754943e-38, 1e-30, 0.5, 0.9999999,
          1.0000001, 2.0000001, 3.4e38, 3.4028235e38, 3.5e38, 1e39, -1e39, 1.7976931348623157e308,
          -1.7976931348623157e308, float("nan"), float("inf"), float("-inf")]
ODD_CHARS = ["\x00", "\ud800", "\udfff", "\ufffe", "\U0010ffff", "😀", "\u202e", "\ufeff", "\r", "é"]
STRINGS = ["", " ", "\x00", "a\x00b", "\ud800", "\udfff\ud800x", "😀" * 40, "NaN", "Infinity", "-Infinity", "1e39",
           "null", "\u202e\ufeff\u200b", "<|end_of_text|>", "<|begin_of_text|><|pad|>", "<|user|>\n", "a" * 100_000]


def odd_text(chars: list[str], strings: list[str]):
    # (st.text would about never draw these few characters from a whole-Unicode alphabet)
    return st.sampled_from(strings) | st.lists(st.sampled_from(chars) | st.characters(), min_size=1,
                                               max_size=8).map("".join)


ODD_TEXT = odd_text(ODD_CHARS, STRINGS)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12), st.sampled_from(INTS),
              st.sampled_from(FLOATS), ODD_TEXT),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
BIG_INT = rarely(st.integers(), st.sampled_from(INTS), 4)
BIG_FLOAT = rarely(st.floats() | st.sampled_from(["NaN", "Infinity", "-inf", "1e39", "1e-46", "-0", "0x1p-149"]),
                   st.sampled_from(FLOATS + INTS[:8]), 4)


# -- HTTP bodies -------------------------------------------------------------------------------
def http_fields(vocab: int) -> tuple[dict, dict, dict]:
    """(completion fields, chat fields, extremes): each name → a strategy of plausible values,
    and (for the typed fields) name → a strategy of extreme ones."""
    ids = st.lists(st.integers(3, vocab - 1), min_size=1, max_size=8)
    odd_ids = st.lists(BIG_INT | st.integers(vocab - 2, vocab + 2), min_size=1, max_size=8)
    common = {
        "model": st.just("tiny-random-llama-v1") | st.none(),
        "temperature": st.sampled_from([0, 0.0, 1]) | unit(0, 2), "top_p": unit(0.01, 1),
        "top_k": st.integers(-1, 50), "min_p": unit(0, 1), "seed": st.integers(0, 2**64 - 1) | st.just(2**64 - 1),
        "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=3),
        "stop_token_ids": st.lists(st.integers(0, vocab - 1), max_size=3),
        "presence_penalty": unit(-2, 2), "frequency_penalty": unit(-2, 2), "repetition_penalty": unit(0.1, 2),
        "n": st.integers(1, 16), "stream": st.booleans(), "stream_options": st.just({"include_usage": True}),
        "ignore_eos": st.booleans(), "include_stop_str_in_output": st.booleans(),
        "skip_special_tokens": st.booleans(), "cache_salt": st.text(min_size=1, max_size=8),
        "user": st.text(max_size=8), "logit_bias": st.just({}),
    }
    completion = {
        **common, "max_tokens": st.integers(1, 4), "logprobs": st.integers(0, 5), "echo": st.just(False),
        "best_of": st.just(1), "suffix": st.just(""),
        "prompt": st.sampled_from(["hi", "Hello world"]) | st.text(min_size=1, max_size=20) | ids
        | st.lists(ids, min_size=1, max_size=1) | st.lists(st.just("hi"), min_size=1, max_size=1),
    }
    roles = st.sampled_from(["system", "developer", "user", "assistant", "tool"])

    def messages(role, text):
        content = text | st.none() | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                                              max_size=2)
        return st.lists(st.fixed_dictionaries({"role": role, "content": content}, optional={"name": text}),
                        min_size=1, max_size=3)

    chat = {
        **common, "max_tokens": st.integers(1, 4), "max_completion_tokens": st.integers(1, 4),
        "messages": messages(roles, st.text(max_size=20)), "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 5), "add_generation_prompt": st.booleans(), "tools": st.just([]),
        "tool_choice": st.sampled_from(["none", "auto"]), "parallel_tool_calls": st.booleans(),
        "response_format": st.just({"type": "text"}), "store": st.booleans(),
        "metadata": st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
    }
    ints = ("max_tokens", "max_completion_tokens", "top_k", "seed", "n", "logprobs", "top_logprobs", "best_of")
    floats = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
    extremes = {
        **dict.fromkeys(ints, BIG_INT), **dict.fromkeys(floats, BIG_FLOAT), "stop_token_ids": odd_ids,
        **dict.fromkeys(("model", "stop", "cache_salt", "user", "suffix"),
                        ODD_TEXT | st.lists(ODD_TEXT, min_size=1, max_size=3)),
        "prompt": ODD_TEXT | odd_ids | st.lists(ODD_TEXT, min_size=1, max_size=2) | st.lists(odd_ids, max_size=2)
        | st.lists(st.integers(3, vocab - 1), min_size=120, max_size=5000),
        "messages": messages(roles | ODD_TEXT, ODD_TEXT)
        | st.lists(st.just({"role": "user", "content": "hi"}), min_size=100, max_size=300),
    }
    return completion, chat, extremes


@st.composite
def http_payloads(draw, fields: dict, extremes: dict, required: tuple[str, ...]) -> bytes:
    """A body: (a) valid, mostly with one or two typed fields made extreme, (b) random JSON, or
    (c) a valid body mutated (fields dropped, replaced, wrapped, nested; unknown keys added).
    Sent as Python's json writes it (so NaN and Infinity come as bare tokens); now and then
    cut short or with bytes that are not UTF-8."""
    names = sorted(fields)
    body = {name: draw(fields[name]) for name in required}
    body.update({name: draw(fields[name]) for name in draw(st.lists(st.sampled_from(names), max_size=4, unique=True))})
    if draw(chance(3)):  # parallel samples (which fork the first one's blocks) are a dimension of their own
        body["n"] = draw(st.integers(2, 16))
    if "best_of" in body:  # only valid as these
        body["best_of"] = body.get("n", 1)
    if "stream_options" in body:
        body["stream"] = True
    kind = draw(st.sampled_from(["valid", "extreme", "extreme", "extreme", "extreme", "extreme", "random", "mutated"]))
    if kind == "extreme":  # mostly one field, so that it is what the server sees first
        count = 2 if draw(chance(4)) else 1
        for name in draw(st.lists(st.sampled_from(sorted(set(extremes) & set(fields))), min_size=count,
                                  max_size=count, unique=True)):
            body[name] = draw(extremes[name])
    elif kind == "random":
        body = draw(JSON_VALUES | st.dictionaries(st.sampled_from(names), JSON_VALUES, max_size=6))
    elif kind == "mutated":
        for _ in range(draw(st.integers(1, 3))):
            how, name = draw(st.sampled_from(["drop", "replace", "wrap", "nest", "add"])), draw(st.sampled_from(names))
            if how == "drop":
                body.pop(name, None)
            elif how == "replace":
                body[name] = draw(JSON_VALUES)
            elif how == "wrap":
                body[name] = [body.get(name)] * draw(st.integers(1, 3))
            elif how == "nest":
                body[name] = {"value": body.get(name), draw(st.text(max_size=5)): draw(JSON_VALUES)}
            else:
                body[draw(ODD_TEXT | st.sampled_from(["max_tokenz", "", "prompt ", "Prompt"]))] = draw(JSON_VALUES)
    payload = json.dumps(body, allow_nan=True).encode()
    if draw(chance(25)):
        payload = draw(st.sampled_from([payload[:len(payload) // 2], payload + b"\xff", b"\xc3(" + payload]))
    return payload


# -- gRPC requests -----------------------------------------------------------------------------
def edges(low: int, high: int):
    near = [low, low + 1, -1, 0, 1, 2, high // 2, high // 2 + 1, high - 1, high]
    return rarely(st.integers(low, high), st.sampled_from([v for v in near if low <= v <= high]), 4)


UINT32, INT32, UINT64 = edges(0, 2**32 - 1), edges(-2**31, 2**31 - 1), edges(0, 2**64 - 1)
ANY_FLOAT = rarely(st.floats(), st.sampled_from(FLOATS + [0.0, 1.0, 2.0, -2.0, -1.0]), 4)
# A protobuf string must be valid UTF-8 (the client refuses to send others; damaged bytes do).
TEXT = st.text(max_size=20) | odd_text([c for c in ODD_CHARS if not "\ud800" <= c <= "\udfff"],
                                       [s for s in STRINGS if "\ud800" not in s and "\udfff" not in s])


def sampling_options(vocab: int):
    extreme = dict(max_tokens=UINT32, temperature=ANY_FLOAT, top_p=ANY_FLOAT, top_k=INT32, min_p=ANY_FLOAT,
                   seed=UINT64, logprobs=UINT32, presence_penalty=ANY_FLOAT, frequency_penalty=ANY_FLOAT,
                   repetition_penalty=ANY_FLOAT, n=UINT32, stop=st.lists(TEXT, max_size=3),
                   stop_token_ids=st.lists(INT32 | st.integers(0, vocab + 2), max_size=3))
    plausible = dict(max_tokens=st.integers(1, 4), temperature=unit(0, 2), top_p=unit(0.01, 1),
                     top_k=st.integers(-1, 50), min_p=unit(0, 1), seed=st.integers(0, 1000) | st.just(2**64 - 1),
                     logprobs=st.integers(0, 5), presence_penalty=unit(-2, 2), frequency_penalty=unit(-2, 2),
                     repetition_penalty=unit(0.1, 2), skip_special_tokens=st.booleans(), n=st.integers(1, 16),
                     ignore_eos=st.booleans(), stop=st.lists(st.text(min_size=1, max_size=3), max_size=2),
                     stop_token_ids=st.lists(st.integers(0, vocab - 1), max_size=2))

    @st.composite
    def options(draw) -> pb.SamplingOptions:
        chosen = draw(st.lists(st.sampled_from(sorted(plausible)), max_size=5, unique=True))
        values = {name: draw(plausible[name]) for name in chosen}
        if draw(chance(3)):
            values["n"] = draw(st.integers(2, 16))
        if not draw(chance(5)):  # mostly one field extreme, sometimes two
            count = 2 if draw(chance(4)) else 1
            for name in draw(st.lists(st.sampled_from(sorted(extreme)), min_size=count, max_size=count, unique=True)):
                values[name] = draw(extreme[name])
        if "max_tokens" not in values and not draw(chance(5)):  # keep most generations short
            values["max_tokens"] = draw(st.integers(1, 4))
        return pb.SamplingOptions(**values)

    return options()


@st.composite
def generate_requests(draw, vocab: int) -> pb.GenerateRequest:
    request = pb.GenerateRequest(sampling=draw(sampling_options(vocab)), request_id=draw(rarely(TEXT, "")),
                                 model=draw(rarely(TEXT, st.sampled_from(["", "tiny-random-llama-v1"]), 10)),
                                 cache_salt=draw(rarely(TEXT, "")))
    prompt = draw(rarely(st.sampled_from(["odd_ids", "odd_ids", "none"]), st.sampled_from(["text", "ids"]), 5))
    if prompt == "text":
        request.text = draw(st.sampled_from(["hi", "Hello world"]) | TEXT)
    elif prompt == "ids":
        request.token_ids.ids.extend(draw(st.lists(st.integers(3, vocab - 1), max_size=8)))
    elif prompt == "odd_ids":  # out of the vocabulary, or longer than the context
        request.token_ids.ids.extend(draw(st.lists(INT32 | st.sampled_from([vocab - 1, vocab, vocab + 1]), max_size=8)
                                          | st.lists(st.integers(3, vocab - 1), min_size=120, max_size=3000)))
    return request


@st.composite
def damaged_bytes(draw, vocab: int) -> bytes:
    """A serialized GenerateRequest, damaged: cut, a byte changed, junk appended, or a string
    (request_id, text, model, cache_salt, or a stop string in `sampling`) that is not UTF-8."""
    payload = draw(generate_requests(vocab)).SerializeToString()
    how, at = draw(st.sampled_from(["cut", "byte", "append", "utf8"])), draw(st.integers(0, max(len(payload) - 1, 0)))
    if how == "cut":
        return payload[:at]
    if how == "byte":
        return payload[:at] + bytes([draw(st.integers(0, 255))]) + payload[at + 1:]
    if how == "append":
        return payload + draw(st.binary(min_size=1, max_size=8))
    bad = draw(st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"a\xf4\x90\x80\x80"]))
    if draw(st.booleans()):  # field 7 of field 4
        return payload + bytes([0x22, len(bad) + 2, 0x3A, len(bad)]) + bad
    return payload + bytes([draw(st.sampled_from([0x0A, 0x12, 0x2A, 0x32])), len(bad)]) + bad  # fields 1, 2, 5, 6
