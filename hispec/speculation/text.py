"""Streaming a continuation as text: release only what can no longer change."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hispec.speculation.request import cut_at_stop


class StreamingText:
    """The text of a growing continuation, released in stable pieces.

    Held back until more tokens decide it: a tail that could still become a stop string, and a
    trailing replacement character (a multi-byte character split across tokens).
    """

    def __init__(self, detokenize: Callable[[Sequence[int]], str], stops: Sequence[str] = ()) -> None:
        self.detokenize, self.stops = detokenize, tuple(stops)
        self.tokens: list[int] = []
        self.released = 0  # characters handed out so far

    def push(self, new_tokens: Sequence[int]) -> str:
        """Add committed tokens; returns the newly stable text (possibly empty)."""
        self.tokens += new_tokens
        # decode the whole continuation: byte-level BPE pieces may not be valid text alone
        text, _ = cut_at_stop(self.detokenize(self.tokens), self.stops)
        held = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        stable = text[: len(text) - held].rstrip("\ufffd")
        return self._release(stable)

    def finish(self, final_text: str) -> str:
        """The rest of the final text (as the engine's result decodes it)."""
        return self._release(final_text)

    def _release(self, text: str) -> str:
        if len(text) <= self.released:
            return ""
        piece, self.released = text[self.released :], len(text)
        return piece
