"""Incremental detokenization and stop-string handling for one request.

The engine owns one :class:`IncrementalDetokenizer` per request, feeds it each
step's new token ids with :meth:`~IncrementalDetokenizer.append`, finishes the
request when ``append`` reports a stop string, and streams the text returned by
:meth:`~IncrementalDetokenizer.take_delta`.
"""

from __future__ import annotations

from collections.abc import Sequence

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded as context in front of the output, so a token's leading
# space or merge behaviour is what it would be in context (vLLM uses 5 as well).
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a request's generated token ids into text, a few tokens at a time.

    Decoding uses a sliding window in the style of vLLM/TGI: ``ids[prefix:read]``
    is text already emitted (kept only as context) and ``ids[read:]`` is pending.
    Each new token costs two decodes of the window, never of the whole output.
    Pending tokens are committed only when their text does not end in U+FFFD, so
    a multi-byte character split across tokens is emitted whole, once complete.

    Contracts:

    * Output text never includes prompt text. After ``take_delta(finished=True)``
      and with no stop string matched, :attr:`output_text` equals
      ``tokenizer.decode(output_ids, skip_special_tokens=...)`` for tokenizers
      whose decode is concatenative, e.g. byte-level BPE. (With SentencePiece-style
      tokenizers the first token keeps the leading space it has in context.)
    * Before finishing, :attr:`output_text` omits trailing tokens that so far
      decode to an incomplete character; they are flushed by ``take_delta(True)``
      (then as U+FFFD if still incomplete, as a one-shot decode would give).
    * Stop strings may span tokens. The first text position at which any stop
      string is complete ends the output: text is cut before that stop string, or
      after it when ``include_stop_str_in_output``. Later appends are ignored.
    * Deltas concatenate to the final :attr:`output_text`; a streamed delta never
      contains any part of a stop string that is cut from the output.
    * With ``tokenizer=None`` (an engine started with skip_tokenizer_init) there is no
      text: :attr:`output_text` and every delta are empty, and stop strings are refused.

    Cost caveat: while every new token still ends inside a malformed UTF-8
    sequence (only seen with garbage output) the pending window keeps growing.
    """

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str],
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._include_stop = include_stop_str_in_output
        # An empty stop string would match everywhere; treat it as absent.
        self._stops = [s for s in dict.fromkeys(stop) if s]
        self._max_stop_len = max(map(len, self._stops), default=0)
        if tokenizer is None and self._stops:
            raise ValueError("`stop` strings need a tokenizer")

        context = list(prompt_token_ids[max(0, len(prompt_token_ids) - _PROMPT_CONTEXT_TOKENS) :])
        if tokenizer is None:
            context = []
        # A prompt ending mid-character would let the first output token complete
        # that character and shift the window's text; decode without context then.
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []
        # Prompt context followed by every output id; only a window is decoded.
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text: str | None = None  # decode(ids[prefix:read]), cached
        self._text = ""
        self._sent = 0  # characters of _text already returned by take_delta
        self.matched_stop: str | None = None

    @property
    def output_text(self) -> str:
        """The output text so far, cut at a stop string when one matched."""
        return self._text

    def append(self, token_ids: Sequence[int]) -> str | None:
        """Feed newly generated token ids; update :attr:`output_text`.

        Returns the stop string that matched (the request must then finish), else
        None. After a match further ids are ignored and the match is returned again.
        """
        if self.matched_stop is not None:
            return self.matched_stop
        if self._tokenizer is None:
            return None  # no text, so no stop string
        len_before = len(self._text)
        for token_id in token_ids:
            self._ids.append(token_id)
            self._advance(final=False)
        return self._find_stop(len_before)

    def take_delta(self, finished: bool) -> str:
        """Return the text not yet returned that is safe to stream now.

        With ``finished=False`` the longest tail of the text that is a proper prefix
        of a stop string is held back, as it may yet become the stop string. With
        ``finished=True`` pending tokens are flushed and everything left is returned.
        """
        if finished:
            if self.matched_stop is None:
                len_before = len(self._text)
                self._advance(final=True)
                # Flushed text may complete a stop string; it must still be cut.
                self._find_stop(len_before)
            end = len(self._text)
        else:
            end = len(self._text) - self._holdback()
        delta = self._text[self._sent : end]
        self._sent = max(self._sent, end)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _advance(self, final: bool) -> None:
        """Commit the pending tokens' text if it is complete (or ``final``)."""
        prefix, read = self._prefix_offset, self._read_offset
        if read == len(self._ids):
            return
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[prefix:read])
        new_text = self._decode(self._ids[prefix:])
        if len(new_text) <= len(self._prefix_text):
            # Nothing visible yet (e.g. a skipped special token); keep waiting.
            return
        if new_text.endswith(_REPLACEMENT) and not final:
            # Probably a character split across tokens: wait for its other bytes.
            return
        self._text += new_text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = read, len(self._ids)
        self._prefix_text = None

    def _find_stop(self, len_before: int) -> str | None:
        """Cut the text at the first stop string completed after ``len_before``."""
        if not self._stops:
            return None
        # A new match must end in the new text, so it starts at most
        # max_stop_len - 1 characters before it.
        start = max(0, len_before - self._max_stop_len + 1)
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            pos = self._text.find(stop, start)
            if pos >= 0:
                # Earliest end first: the stop string completed first when streaming
                # character by character, so the result does not depend on how text
                # was chunked into appends. On a tie the longer (earlier) one wins.
                cand = (pos + len(stop), pos, stop)
                best = cand if best is None else min(best, cand)
        if best is None:
            return None
        end, pos, stop = best
        self._text = self._text[: end if self._include_stop else pos]
        self.matched_stop = stop
        return stop

    def _holdback(self) -> int:
        """Length of the unsent tail that could still grow into a stop string."""
        if self.matched_stop is not None:
            return 0  # no more text can come
        text = self._text
        for k in range(min(self._max_stop_len - 1, len(text) - self._sent), 0, -1):
            tail = text[-k:]
            if any(stop.startswith(tail) for stop in self._stops):
                return k
        return 0
