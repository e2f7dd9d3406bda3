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
# Sent text is retired from the live window in chunks at least this long (amortising the copy).
_RETIRE_CHARS = 1024


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

    Cost: a token costs the same at any output length. Only a window of the text is
    kept live (what is unsent, and enough sent text before it for a stop string to
    span); older text moves to a list of chunks that only :attr:`output_text` joins.
    Caveat: while every new token still ends inside a malformed UTF-8 sequence (only
    seen with garbage output) the pending window keeps growing.
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
        # The text is `_done` chunks then the live window `_text`, which starts at character
        # `_base` of the whole; positions (`_sent`, stop matches) count from the start of the whole.
        self._done: list[str] = []
        self._base = 0
        self._text = ""
        self._sent = 0  # characters already returned by take_delta
        self.matched_stop: str | None = None

    @property
    def output_text(self) -> str:
        """The output text so far, cut at a stop string when one matched (joined on each call)."""
        return "".join(self._done) + self._text

    def append(self, token_ids: Sequence[int]) -> str | None:
        """Feed newly generated token ids; update :attr:`output_text`.

        Returns the stop string that matched (the request must then finish), else
        None. After a match further ids are ignored and the match is returned again.
        """
        if self.matched_stop is not None:
            return self.matched_stop
        if self._tokenizer is None:
            return None  # no text, so no stop string
        len_before = self._length
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
                len_before = self._length
                self._advance(final=True)
                # Flushed text may complete a stop string; it must still be cut.
                self._find_stop(len_before)
            end = self._length
        else:
            end = self._length - self._holdback()
        delta = self._text[self._sent - self._base : end - self._base]
        self._sent = max(self._sent, end)
        self._retire_sent_text()
        return delta

    @property
    def _length(self) -> int:
        return self._base + len(self._text)

    def _retire_sent_text(self) -> None:
        """Move sent text no stop string can reach any more out of the live window, in
        chunks of at least _RETIRE_CHARS, so appending to the window never copies a long string."""
        keep_from = self._sent - self._max_stop_len
        cut = keep_from - self._base
        if cut >= _RETIRE_CHARS:
            self._done.append(self._text[:cut])
            self._text = self._text[cut:]
            self._base += cut

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
        # max_stop_len - 1 characters before it (still in the window: see _retire_sent_text).
        start = max(0, len_before - self._max_stop_len + 1 - self._base)
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
        end, pos, stop = best  # (in the window)
        self._text = self._text[: end if self._include_stop else pos]
        self.matched_stop = stop
        return stop

    def _holdback(self) -> int:
        """Length of the unsent tail that could still grow into a stop string."""
        if self.matched_stop is not None:
            return 0  # no more text can come
        text = self._text
        for k in range(min(self._max_stop_len - 1, self._length - self._sent), 0, -1):
            tail = text[-k:]
            if any(stop.startswith(tail) for stop in self._stops):
                return k
        return 0
