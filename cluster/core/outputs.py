"""What the engine hands back to callers: per-step deltas, in the shape vLLM users know.

Every output of a request carries only what is new since its previous one (new token
ids, their logprobs, new text), so handing it over costs the same at the 4,000th token
as at the first. Whoever needs whole sequences folds the deltas with `OutputAccumulator`.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One sample's delta: `token_ids`, `logprobs` and `text` are new since this sample's
    previous output (whole, once folded by `OutputAccumulator`)."""

    index: int                                # which of the request's `n` samples
    text: str
    token_ids: list[int]
    finish_reason: str | None = None          # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: str | int | None = None      # the stop string or stop token that matched
    logprobs: list[dict[int, float]] | None = None  # per token: {token: logprob}, sampled token first


@dataclass
class RequestOutput:
    """A request's news from one step: a delta for each of its samples that got tokens (or
    finished). `finished` once every sample has; `error` when the engine failed the request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]               # shared with the engine's request: read it, never change it
    outputs: list[CompletionOutput]
    finished: bool = False
    error: str | None = None


class OutputAccumulator:
    """Folds one request's deltas into whole outputs, in time linear in what arrives.

    `add` takes the deltas in order; `result()` is the request as received so far: every
    sample seen, ordered by index, with its whole text, token ids and logprobs."""

    def __init__(self):
        self._first: RequestOutput | None = None
        self._finished, self._error = False, None
        self._samples: dict[int, tuple[CompletionOutput, list[str]]] = {}

    def add(self, delta: RequestOutput) -> None:
        if self._first is None:
            self._first = delta
        self._finished, self._error = delta.finished, delta.error
        for new in delta.outputs:
            held = self._samples.get(new.index)
            if held is None:
                whole = CompletionOutput(new.index, "", list(new.token_ids), new.finish_reason, new.stop_reason,
                                         None if new.logprobs is None else list(new.logprobs))
                self._samples[new.index] = (whole, [new.text])
                continue
            whole, texts = held
            whole.token_ids.extend(new.token_ids)
            if new.logprobs is not None:
                if whole.logprobs is None:
                    whole.logprobs = []
                whole.logprobs.extend(new.logprobs)
            texts.append(new.text)
            whole.finish_reason, whole.stop_reason = new.finish_reason, new.stop_reason

    def result(self) -> RequestOutput:
        if self._first is None:
            raise ValueError("no output received yet")
        outputs = []
        for index in sorted(self._samples):
            whole, texts = self._samples[index]
            if len(texts) > 1:  # joined once, here: appending to one string would copy it every token
                texts[:] = ["".join(texts)]
            whole.text = texts[0]
            outputs.append(whole)
        first = self._first
        return RequestOutput(first.request_id, first.prompt, first.prompt_token_ids, outputs, self._finished,
                             self._error)


def best_candidates(candidates: dict[int, float], top: int) -> list[tuple[int, float]]:
    """The `top` most likely (token, logprob) of one position, best first. An output's
    candidates are the sampled token and the `top` best, so their best `top` are the top
    logprobs whether or not the sampled token is among them."""
    return sorted(candidates.items(), key=lambda item: -item[1])[:top]
