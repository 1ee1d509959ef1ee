"""Streaming a continuation as text: release only what can no longer change."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hispec.speculation.detokenize import IncrementalText
from hispec.speculation.request import cut_at_stop


class StreamingText:
    """The text of a growing continuation, released in stable pieces.

    Held back until more tokens decide it: a tail that could still become a stop string, and a
    trailing replacement character (a multi-byte character split across tokens). Each push decodes
    only a short window of recent tokens (IncrementalText) and looks for stop strings only in the
    text not yet released and the characters before it a stop string could start in.
    """

    def __init__(self, detokenize: Callable[[Sequence[int]], str], stops: Sequence[str] = ()) -> None:
        self.stops = tuple(stops)
        self._text = IncrementalText(detokenize)
        self._reach = max((len(s) for s in self.stops), default=1) - 1
        self._recent = ""  # the stable text from character `_base` on
        self._base = 0
        self.released = 0  # characters handed out so far
        self.stopped = False  # a stop string showed: nothing after it is released

    @property
    def tokens(self) -> list[int]:
        """The continuation's tokens pushed so far."""
        return self._text.tokens

    def push(self, new_tokens: Sequence[int]) -> str:
        """Add committed tokens; returns the newly stable text (possibly empty)."""
        if self.stopped:
            self._text.tokens.extend(new_tokens)
            return ""
        self._recent += self._text.push(new_tokens)
        pending = self._text.pending
        visible = self._recent + pending  # detokenize(tokens)[_base:]
        cut, stop = cut_at_stop(visible, self.stops)
        if stop is not None:
            self.stopped = True
            end = len(cut)
        else:
            # a trailing U+FFFD is a character still arriving: what could become a stop string with
            # it is the decided text's tail
            decided = visible[: len(self._recent) + len(pending.rstrip("\ufffd"))]
            held = max((n for s in self.stops for n in range(1, len(s)) if decided.endswith(s[:n])), default=0)
            end = len(decided) - held
        start = self.released - self._base
        piece = visible[start:end] if end > start else ""
        self.released += len(piece)
        # keep the stable text a stop string could still start in: from `_reach` before the
        # first character not yet released (or not yet stable)
        keep_from = max(self._base, min(self.released, self._base + len(self._recent)) - self._reach)
        self._recent, self._base = self._recent[keep_from - self._base :], keep_from
        return piece

    def finish(self, final_text: str) -> str:
        """The rest of the final text (as the engine's result decodes it)."""
        if len(final_text) <= self.released:
            return ""
        piece, self.released = final_text[self.released :], len(final_text)
        return piece
