"""Where a growing continuation first shows a stop string, without re-reading all of its text.

A stop string that appears when tokens are added either lies in their text or starts at most
(longest stop - 1) characters before it: anything earlier was searched when it was added. So each
push decodes a short window (IncrementalText) and searches only that new text and the characters
just before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hispec.speculation.detokenize import IncrementalText
from hispec.speculation.request import cut_at_stop


class StopFinder:
    """One sequence's stop-string search over its committed tokens, pushed as they commit.

    `push` answers what decoding the whole continuation would: the fewest tokens whose text shows
    a stop string, and which one (the earliest in that text; among stops at the same place, the
    least). After a hit the finder stands at those tokens, where the sequence ends.
    """

    def __init__(self, detokenize: Callable[[Sequence[int]], str], stop_strings: Sequence[str]) -> None:
        if not stop_strings or not all(stop_strings):
            raise ValueError("stop strings must be non-empty strings, and at least one")
        self.stops = tuple(stop_strings)
        self._text = IncrementalText(detokenize)
        self._reach = max(len(s) for s in self.stops) - 1  # characters a stop can start before new text
        self._tail = ""  # the last `_reach` characters of the stable text (searched already, but a stop may start there)

    @property
    def count(self) -> int:
        """Tokens pushed so far."""
        return len(self._text.tokens)

    def push(self, new_tokens: Sequence[int]) -> tuple[int, str] | None:
        """Add newly committed tokens: (tokens to keep, stop string) if their text completes a
        stop string, else None."""
        mark, tail = self._text.mark(), self._tail
        stop_in_all = self._search(new_tokens)
        if stop_in_all is None:
            return None
        # a stop in the text of all of them: the first token that shows one ends the output
        self._text.rewind(mark)
        self._tail = tail
        for token in new_tokens:
            stop = self._search((token,))
            if stop is not None:
                return self.count, stop
        return self.count, stop_in_all  # only a detokenize whose text depends on how it was pushed gets here

    def _search(self, tokens: Sequence[int]) -> str | None:
        """Push `tokens`; the earliest stop string in the text from `_tail` on (the stable part
        and the pending tail that may still change), if any."""
        piece = self._text.push(tokens)
        stop = cut_at_stop(self._tail + piece + self._text.pending, self.stops)[1]
        if self._reach:
            self._tail = (self._tail + piece)[-self._reach :]
        return stop
