"""Text of a growing token list, decoding only a short window of recent tokens (vLLM's approach).

Decoding the whole list at every step costs O(n) per step, O(n^2) for a continuation. Here each
push decodes the tokens since the last stable point plus a little context before them:

    tokens:  [ ... stable ... | context | pending ... ]
                             prefix    read          end

`context` (tokens[prefix:read]) was decoded last time; decoding it again in front of the new
tokens gives them the surroundings they are decoded in inside the whole list (a decoder may treat
a list's first token differently, e.g. drop its leading space). Text becomes stable, and the window
moves on, once the window's decode starts with the context's text and does not end in the
replacement character U+FFFD (a multi-byte character whose remaining bytes are in tokens still to
come: byte-level BPE splits characters across tokens).

What this relies on, true of byte-level BPE decoding (bytes joined, then decoded as UTF-8 with
U+FFFD for invalid bytes): once a decode ends in a whole character, whatever follows it does not
change the text before it. tests/unit/test_incremental_text.py checks, on the bundled tokenizer,
that stable + pending text equals decoding the whole list after every push.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

_REPLACEMENT = "\ufffd"
# Past this many pending tokens a window still ending in U+FFFD is cut at a boundary among its last
# tokens (a UTF-8 character has at most 4 bytes, so spans at most 4 tokens): invalid bytes never
# decode without U+FFFD, and pushes can keep ending inside characters.
_MAX_PENDING = 4


@dataclass(frozen=True, slots=True)
class TextMark:
    """Where an IncrementalText stood: `rewind` returns to it."""

    length: int
    pieces: int
    prefix: int
    read: int
    context_text: str
    pending: str


class IncrementalText:
    """decode(tokens) for a list that only grows, as stable pieces plus a pending tail.

    After every push: (all pieces push returned) + `pending` == detokenize(tokens).
    Pieces never change; `pending` (at most a few tokens' text) may.
    """

    def __init__(self, detokenize: Callable[[Sequence[int]], str]) -> None:
        self.detokenize = detokenize
        self.tokens: list[int] = []
        self._prefix = 0  # window start: tokens[prefix:read] is the context
        self._read = 0  # tokens[:read] are stable text
        self._context_text = ""  # detokenize(tokens[prefix:read])
        self._stable: list[str] = []  # the pieces handed out (for `text`; the finders keep their own)
        self.pending = ""  # text of tokens[read:] as it reads after the stable text; may still change
        self.resyncs = 0  # whole-list decodes (never, for byte-level BPE)

    @property
    def text(self) -> str:
        """detokenize(tokens), built from the pieces (O(n): for checks, not per step)."""
        return "".join(self._stable) + self.pending

    @property
    def pending_tokens(self) -> int:
        """Tokens whose text is not stable yet (the window's decode past its context)."""
        return len(self.tokens) - self._read

    def push(self, new_tokens: Sequence[int]) -> str:
        """Append tokens; returns the text that became stable (possibly empty)."""
        self.tokens.extend(new_tokens)
        window = self.detokenize(self.tokens[self._prefix :])
        if not window.startswith(self._context_text):
            return self._resync()
        if not window.endswith(_REPLACEMENT):
            return self._advance(window[len(self._context_text) :], len(self.tokens))
        self.pending = window[len(self._context_text) :]
        if len(self.tokens) - self._read > _MAX_PENDING:
            return self._cut_before_last(window)
        return ""

    def mark(self) -> TextMark:
        return TextMark(len(self.tokens), len(self._stable), self._prefix, self._read, self._context_text, self.pending)

    def rewind(self, mark: TextMark) -> None:
        """Back to `mark`: the tokens pushed since, and the text they made stable, are dropped
        (the caller discards the pieces it got since; a stop-string search redoes them one token
        at a time)."""
        del self.tokens[mark.length :]
        del self._stable[mark.pieces :]
        self._prefix, self._read, self._context_text, self.pending = mark.prefix, mark.read, mark.context_text, mark.pending

    def _advance(self, piece: str, read: int) -> str:
        """tokens[:read] are stable, their text ending with `piece`: the tokens since the last
        stable point become the next window's context."""
        self._prefix, self._read = self._read, read
        self._context_text = self.detokenize(self.tokens[self._prefix : self._read])
        self.pending = ""
        if piece:
            self._stable.append(piece)
        return piece

    def _cut_before_last(self, window: str) -> str:
        """A long tail still ending in U+FFFD (invalid bytes, or pushes that keep ending inside a
        character): stable up to a boundary among the last few tokens where the text before it and
        the text after it, each decoded alone, add up to the window's. Then nothing before it
        waits for bytes after it: an unfinished character there would decode as fewer characters
        together than apart."""
        for back in range(1, min(_MAX_PENDING, self.pending_tokens - 1) + 1):
            head = self.detokenize(self.tokens[self._prefix : -back])
            tail = self.detokenize(self.tokens[-back:])
            if tail and head + tail == window and head.startswith(self._context_text):
                piece = self._advance(head[len(self._context_text) :], len(self.tokens) - back)
                self.pending = tail
                return piece
        return ""

    def _resync(self) -> str:
        """The context decodes differently after the new tokens (not byte-level BPE): decode the
        whole list once. Stable text already handed out stays; the rest follows the whole decode."""
        self.resyncs += 1
        stable = "".join(self._stable)
        rest = self.detokenize(self.tokens)[len(stable) :]
        # the window now starts at the first token, its context all the stable text
        self._prefix, self._context_text = 0, stable
        if rest.endswith(_REPLACEMENT):
            self.pending = rest
            return ""
        return self._advance(rest, len(self.tokens))
