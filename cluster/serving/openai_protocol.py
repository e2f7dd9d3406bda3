"""The OpenAI-compatible request bodies and the pieces of their responses.

Unknown fields are rejected, as OpenAI does, so a misspelt parameter is an error
rather than silently ignored. `sampling_params()` turns a body into engine
parameters, raising ValueError that names the field when a value is out of range.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from quire.cluster.core.outputs import best_candidates
from quire.protos.limits import SAMPLING_LIMITS
from quire.protos.step import SamplingParams

# A prompt is a string or a list of token ids, or (OpenAI's batch form) a list of them.
PromptType = Union[str, list[StrictInt], list[str], list[list[StrictInt]]]
MAX_N = 16  # parallel samples per request


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _GenerationBody(BaseModel):
    """Fields both endpoints share: OpenAI's, then quire's extras (vLLM's names)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None  # None → the served model
    temperature: float | None = None
    top_p: float | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored
    # quire extras
    top_k: StrictInt | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    cache_salt: str | None = None  # only requests with the same salt share cached prefixes

    def check_common(self) -> None:
        """Raise ValueError naming the field for what the engine does not support."""
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"`n` must be in [1, {MAX_N}] (got {self.n})")
        if self.logit_bias:
            raise ValueError("`logit_bias` is not supported")
        if self.cache_salt is not None and not self.cache_salt:
            raise ValueError("`cache_salt` must be a non-empty string")
        if self.stream_options is not None and not self.stream:
            raise ValueError("`stream_options` is only allowed with `stream`=true")

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        given = {name: getattr(self, name) for name in (
            "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
            "repetition_penalty") if getattr(self, name) is not None}
        return SamplingParams(
            max_tokens=16 if max_tokens is None else max_tokens, stop=self.stop or [],
            stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos, logprobs=logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, n=self.n, **given)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationBody):
    """The body of `POST /v1/completions`."""

    prompt: PromptType
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: str | None = None

    def sampling_params(self) -> SamplingParams:
        self.check_common()
        if self.best_of not in (None, self.n):
            raise ValueError("`best_of` other than `n` is not supported")
        if self.echo:
            raise ValueError("`echo`=true is not supported")
        if self.suffix:
            raise ValueError("`suffix` is not supported")
        return self._sampling_params(self.max_tokens, self.logprobs)

    def single_prompt(self) -> str | list[int]:
        """Unwrap OpenAI's list-of-one batch form; batches of several prompts are refused."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError(f"`prompt`: batches of several prompts ({len(prompt)}) are not supported; "
                                 "send one prompt per request")
            return prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise ValueError("`prompt` must not be empty")
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_GenerationBody):
    """The body of `POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True  # quire extra (vLLM's name)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None   # accepted; meaningless without tools
    response_format: dict[str, Any] | None = None
    store: bool | None = None                 # accepted and ignored
    metadata: dict[str, str] | None = None    # accepted and ignored

    def sampling_params(self, room_left: int) -> SamplingParams:
        """`room_left`: tokens the context holds after the prompt, the default `max_tokens`."""
        self.check_common()
        if self.tools:
            raise ValueError("`tools` (function calling) is not supported")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("`tool_choice` is not supported")
        if self.response_format and self.response_format.get("type") != "text":
            raise ValueError("`response_format`: only {\"type\": \"text\"} is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs`=true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.max_completion_tokens is not None and self.max_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("`max_tokens` and `max_completion_tokens` disagree; send one")
        # Chat's names for the engine's `logprobs` and `max_tokens`: refused under their own names.
        for name, engine_name in (("top_logprobs", "logprobs"), ("max_completion_tokens", "max_tokens")):
            if getattr(self, name) is not None:
                dataclasses.replace(SAMPLING_LIMITS[engine_name], field=name).check(getattr(self, name))
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max(1, room_left) if max_tokens is None else max_tokens, logprobs)

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in self.messages]


def finite(value: float | None) -> float | None:
    # JSON has no -inf/NaN; OpenAI-compatible servers report -9999.0 for impossible tokens.
    return value if value is None or math.isfinite(value) else -9999.0


def token_text(tokenizer, token_id: int) -> str:
    """A token's text; `token_id:N` (vLLM's convention) when there is no tokenizer."""
    return f"token_id:{token_id}" if tokenizer is None else tokenizer.decode([token_id])


class CompletionLogprobs:
    """OpenAI legacy completion logprobs (tokens, token_logprobs, top_logprobs, text_offset);
    offsets count characters of the completion text, continuing across stream chunks. With no
    tokenizer, tokens read `token_id:N` and offsets stay 0 (the completion has no text)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.offset = tokenizer, 0

    def build(self, token_ids: list[int], logprobs: list[dict[int, float]]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, candidates in zip(token_ids, logprobs):
            text = token_text(self.tokenizer, token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(finite(candidates.get(token_id)))
            top: dict[str, float] = {}
            for candidate, logprob in candidates.items():
                top.setdefault(token_text(self.tokenizer, candidate), finite(logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(text) if self.tokenizer is not None else 0
        return out


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]], top: int) -> dict:
    """Chat completion logprobs: `{"content": [{token, logprob, bytes, top_logprobs}]}`; with no
    tokenizer a token reads `token_id:N` and its `bytes` are null (unknown)."""

    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": finite(logprob),
                "bytes": list(text.encode("utf-8")) if tokenizer is not None else None}

    content = []
    for token_id, candidates in zip(token_ids, logprobs):
        content.append({**entry(token_id, candidates.get(token_id, -9999.0)),
                        "top_logprobs": [entry(t, lp) for t, lp in best_candidates(candidates, top)]})
    return {"content": content}
