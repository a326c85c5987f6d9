"""Token ids -> text, one token at a time, safe across token boundaries.

A byte-level token can hold half of a UTF-8 character, and SentencePiece-style
tokenizers only know whether a piece starts with a space from its neighbours. So a
new token's text is the difference between decoding a short window with and without
it, and nothing is emitted while the window ends in an incomplete character.

`ReplyText` adds what a reply needs on top: cut at the first stop string (never
returned), hold back text that may be the start of a stop string, and strip
surrounding whitespace, so that the streamed pieces always add up to the final text.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_INCOMPLETE = "\ufffd"


class IncrementalDecoder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens already turned into text
        self._prefix_text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is unfinished)."""
        self.ids.append(token_id)
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(self._prefix_text) and not new_text.endswith(_INCOMPLETE):
            piece = new_text[len(self._prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_text = self._decode(self.ids[self._prefix:self._read])
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (an unfinished character decodes as U+FFFD)."""
        if self._read == len(self.ids):
            return ""
        new_text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return new_text[len(self._prefix_text):]


class ReplyText:
    """The text of one reply as it grows: stop strings, hold-back and stripping."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.raw = ""  # everything decoded so far
        self.stopped = False
        self._emitted = 0  # characters of the stripped reply already handed out
        self._max_stop = max((len(s) for s in self.stops), default=0)

    def add(self, piece: str) -> bool:
        """Append decoded text; returns True when a stop string has appeared."""
        if self.stopped or not piece:
            return self.stopped
        start = max(0, len(self.raw) - self._max_stop + 1)
        self.raw += piece
        cut = self._find_stop(start)
        if cut is not None:
            self.raw = self.raw[:cut]
            self.stopped = True
        return self.stopped

    def _find_stop(self, start: int) -> int | None:
        hits = [i for s in self.stops if (i := self.raw.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _safe_end(self) -> int:
        """End of the raw text that can no longer become part of a stop string."""
        end = len(self.raw)
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.raw)), 0, -1):
                if self.raw.endswith(s[:k]):
                    end = min(end, len(self.raw) - k)
                    break
        return end

    @property
    def text(self) -> str:
        """The final reply: stop removed, surrounding whitespace stripped."""
        return self.raw.strip()

    def pending(self, final: bool = False) -> str:
        """New text that is safe to show now (everything remaining when ``final``)."""
        if final:
            visible = self.text
        else:
            # Leading whitespace never shows; trailing whitespace waits for more text.
            visible = self.raw[: self._safe_end()].lstrip().rstrip()
        if len(visible) <= self._emitted:
            return ""
        piece = visible[self._emitted:]
        self._emitted = len(visible)
        return piece
