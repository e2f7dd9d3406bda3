"""What the engine hands back to callers, in the shape vLLM users know."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None          # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None      # the stop string or stop token that matched
    logprobs: list[dict[int, float]] | None = None  # per output token: {token: logprob}, sampled token first
    delta_text: str = ""                      # text new since the previous output of this request
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    error: str | None = None                  # set when the engine failed the request


def best_candidates(candidates: dict[int, float], top: int) -> list[tuple[int, float]]:
    """The `top` most likely (token, logprob) of one position, best first. An output's
    candidates are the sampled token and the `top` best, so their best `top` are the top
    logprobs whether or not the sampled token is among them."""
    return sorted(candidates.items(), key=lambda item: -item[1])[:top]
