"""Request validation at the edge: one set of rules for gRPC and HTTP, errors that name the field."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hispec.errors import InvalidRequest
from hispec.speculation.sampling import SamplingParams


# A bad request field: gRPC INVALID_ARGUMENT, HTTP 400 (the engine raises the same class).
InvalidArgument = InvalidRequest

# Below this a temperature is greedy, as vLLM treats it: logits / 1e-38 overflow float32 and the
# softmax turns to NaN, while any temperature this small already picks the argmax.
GREEDY_BELOW_TEMPERATURE = 1e-5
# top_p's floor: the sampler holds top_p in float32, where 1e-46 is 0 and the nucleus empty (NaN
# probabilities). Any top_p up to the most likely token's probability (>= 1 / vocabulary) keeps just
# that token, so raising a smaller one to this floor changes nothing else.
SMALLEST_TOP_P = 1e-9
# top_k's largest value: gRPC's int32, so that both protocols accept the same numbers (anything at
# or above the vocabulary size means no cut).
MAX_TOP_K = 2**31 - 1


@dataclass(frozen=True)
class Limits:
    """What the served engine accepts (from AppArgs and the checkpoint)."""

    max_context: int  # prompt tokens + new tokens
    vocab_size: int
    default_max_new_tokens: int
    max_prompt_chars: int
    max_stop_strings: int
    max_stop_chars: int = 256


@dataclass(frozen=True)
class GenerationParams:
    """A validated request, in the engine's terms (the prompt is tokenized separately)."""

    max_new_tokens: int | None  # None: fill the default, bounded by the room the prompt leaves
    sampling: SamplingParams
    stop: tuple[str, ...]

    def new_tokens_for(self, prompt_tokens: int, limits: Limits, field: str) -> int:
        """max_new_tokens for a prompt of `prompt_tokens`: an explicit value must fit the context."""
        room = limits.max_context - prompt_tokens
        if self.max_new_tokens is None:
            return min(limits.default_max_new_tokens, room)
        if self.max_new_tokens > room:
            raise InvalidArgument(field, f"the prompt ({prompt_tokens} tokens) plus {self.max_new_tokens} new "
                                         f"tokens exceeds the model's context of {limits.max_context} tokens")
        return self.max_new_tokens


def check_prompt(prompt: Any, limits: Limits, field: str = "prompt") -> str:
    if not isinstance(prompt, str):
        raise InvalidArgument(field, f"must be a string, got {type(prompt).__name__}")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidArgument(field, f"{len(prompt)} characters; at most {limits.max_prompt_chars} are accepted")
    _check_unicode(prompt, field)
    return prompt


def _shown(value: Any, limit: int = 60) -> str:
    """A value for an error message, cut short: a hostile value may be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__})"


def _check_unicode(text: str, field: str) -> None:
    """JSON may spell lone surrogates ("\\ud800"), which no UTF-8 text holds: the tokenizer raises
    a TypeError on them, which would reach the client as a server error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidArgument(field, f"is not valid Unicode ({error.reason} at character {error.start})") from None


def check_prompt_ids(ids: list[int], limits: Limits, field: str = "prompt") -> list[int]:
    if not ids:
        raise InvalidArgument(field, "is empty (it must hold at least one token)")
    if len(ids) >= limits.max_context:
        raise InvalidArgument(field, f"{len(ids)} tokens; the model's context holds {limits.max_context}, "
                                     "which leaves no room to generate")
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < limits.vocab_size for t in ids):
        raise InvalidArgument(field, f"token ids must be integers in [0, {limits.vocab_size})")
    return ids


def generation_params(
    limits: Limits,
    *,
    max_new_tokens: Any = None,
    temperature: Any = None,
    top_p: Any = None,
    top_k: Any = None,
    seed: Any = None,
    stop: Any = (),
    names: dict[str, str] | None = None,
) -> GenerationParams:
    """Checks every field (None = unset); `names` maps our field names to the API's (e.g. max_tokens)."""
    name = (names or {}).get

    def number(field: str, value: Any, integer: bool) -> Any:
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise InvalidArgument(name(field, field),
                                  f"must be {'an integer' if integer else 'a number'}, got {_shown(value)}")
        if not integer and not math.isfinite(value):
            raise InvalidArgument(name(field, field), f"must be a finite number, got {value!r}")
        return value

    if max_new_tokens is not None:
        number("max_new_tokens", max_new_tokens, integer=True)
        if not 1 <= max_new_tokens < limits.max_context:
            raise InvalidArgument(name("max_new_tokens", "max_new_tokens"),
                                  f"must be in [1, {limits.max_context - 1}], got {_shown(max_new_tokens)}")
    temperature = 0.0 if temperature is None else float(number("temperature", temperature, integer=False))
    if temperature < 0:
        raise InvalidArgument(name("temperature", "temperature"), f"must be >= 0 (0 is greedy), got {temperature}")
    if temperature < GREEDY_BELOW_TEMPERATURE:
        temperature = 0.0
    top_p = 1.0 if top_p is None else float(number("top_p", top_p, integer=False))
    if not 0 < top_p <= 1:
        raise InvalidArgument(name("top_p", "top_p"), f"must be in (0, 1], got {top_p}")
    top_p = max(top_p, SMALLEST_TOP_P)
    top_k = 0 if top_k is None else number("top_k", top_k, integer=True)
    if top_k == -1:  # vLLM's spelling of "no cut"
        top_k = 0
    if not 0 <= top_k <= MAX_TOP_K:
        raise InvalidArgument(name("top_k", "top_k"),
                              f"must be in [0, {MAX_TOP_K}] (0 or -1: no cut), got {_shown(top_k)}")
    if seed is not None:
        number("seed", seed, integer=True)
        if not 0 <= seed < 2**63:
            raise InvalidArgument(name("seed", "seed"), f"must be in [0, 2**63), got {_shown(seed)}")
    stop = _stop_strings(stop, limits, name("stop", "stop"))
    return GenerationParams(max_new_tokens, SamplingParams(temperature, top_k, top_p, seed), stop)


def _stop_strings(stop: Any, limits: Limits, field: str) -> tuple[str, ...]:
    if stop is None:
        return ()
    if not isinstance(stop, (str, list, tuple)):
        raise InvalidArgument(field, f"must be a string or a list of strings, got {type(stop).__name__}")
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > limits.max_stop_strings:
        raise InvalidArgument(field, f"{len(stops)} stop strings; at most {limits.max_stop_strings} are accepted")
    for s in stops:
        if not isinstance(s, str) or not s:
            raise InvalidArgument(field, f"stop strings must be non-empty strings, got {_shown(s)}")
        if len(s) > limits.max_stop_chars:
            raise InvalidArgument(field, f"a stop string is {len(s)} characters; at most {limits.max_stop_chars}")
        _check_unicode(s, field)
    return stops
