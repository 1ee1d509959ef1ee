"""What a caller hands the engine and what it gets back."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hispec.speculation.hierarchy import Hierarchy
from hispec.speculation.sampling import SamplingParams
from hispec.speculation.stats import RequestStats

_ids = itertools.count()


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int = 64
    sampling: SamplingParams = SamplingParams()
    # None: the model's EOS ids. An empty tuple never stops on a token.
    stop_token_ids: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()  # needs an engine built with `detokenize`
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    # Called with each run of newly committed token ids (outside the model's hot path).
    on_tokens: Callable[[list[int]], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not self.prompt_ids:
            raise ValueError("prompt_ids: the prompt must hold at least one token")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0):
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty strings")


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    prompt_ids: tuple[int, ...]
    token_ids: list[int]  # new tokens only
    finish_reason: str  # "stop" (EOS or stop string), "length" (max_new_tokens), "context" (context full), "abort"
    stats: RequestStats
    stop_string: str | None = None  # the stop string that ended generation, if any
    hierarchy: "Hierarchy | None" = None  # what it was decoded with (None: never admitted)


@dataclass(frozen=True)
class StepOutput:
    """What one engine step did for one request: tokens committed, and the result if it ended."""

    request_id: str
    new_token_ids: list[int]
    result: GenerationResult | None = None

    @property
    def finished(self) -> bool:
        return self.result is not None


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, str | None]:
    """Text up to (not including) the earliest stop string, and which one it was."""
    hits = [(text.find(s), s) for s in stop_strings if s in text]
    if not hits:
        return text, None
    index, stop = min(hits)
    return text[:index], stop

