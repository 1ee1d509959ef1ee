"""The OpenAI-style completions API: request model, and the JSON / server-sent events it answers with."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hispec.serving.messages import Chunk
from hispec.serving.params import GenerationParams, InvalidArgument, Limits, generation_params

# our finish reasons -> OpenAI's ("context": the context filled up, a length limit too)
FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length"}


# strict: a value of the wrong JSON type is refused, never coerced ("16" is not a max_tokens, "yes" not a
# stream, 1.0 not a token id); an integer is still a number for the float fields.
STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions. Ranges are checked by `hispec.serving.params` (one rule set for both APIs)."""

    model_config = STRICT

    model: str | None = None
    prompt: str | list[str] | list[int] = Field(..., description="text, several texts (one choice each), "
                                                "or token ids")
    max_tokens: int | None = 16  # the OpenAI API's default
    temperature: float | None = 1.0  # the OpenAI API's default; 0 is greedy
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted with their neutral values only (clients send them); anything else is refused by name.
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def check_unsupported(self) -> None:
        neutral = {"n": 1, "best_of": (None, 1), "echo": False, "logprobs": None, "suffix": None,
                   "presence_penalty": (None, 0.0), "frequency_penalty": (None, 0.0), "logit_bias": (None, {})}
        for field, allowed in neutral.items():
            value = getattr(self, field)
            if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
                raise InvalidArgument(field, f"is not supported by this server (got {value!r})")

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: a text, or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt:
            raise InvalidArgument("prompt", "is empty")
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)

    def params(self, limits: Limits) -> GenerationParams:
        self.check_unsupported()
        return generation_params(limits, max_new_tokens=self.max_tokens, temperature=self.temperature,
                                 top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=self.stop,
                                 names={"max_new_tokens": "max_tokens"})


class CompletionBuilder:
    """The ids and shapes of one completion's JSON (whole or streamed)."""

    def __init__(self, model: str) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _envelope(self, choices: list[dict], usage: dict | None = None) -> dict:
        body: dict[str, Any] = {"id": self.id, "object": "text_completion", "created": self.created,
                                "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    @staticmethod
    def choice(index: int, text: str, finish_reason: str | None, extra: dict | None = None) -> dict:
        choice = {"index": index, "text": text, "logprobs": None,
                  "finish_reason": FINISH_REASONS.get(finish_reason) if finish_reason else None}
        if extra:
            choice["hispec"] = extra  # our extension: token ids, our own finish reason, speculation stats
        return choice

    def whole(self, finals: list[tuple[str, list[int], Chunk]]) -> dict:
        """finals: per choice, (text, token ids, last chunk)."""
        choices = [self.choice(i, text, last.finish_reason, {"token_ids": ids, "finish_reason": last.finish_reason,
                                                            "stats": last.stats})
                   for i, (text, ids, last) in enumerate(finals)]
        return self._envelope(choices, self.usage(sum(c.prompt_tokens for *_, c in finals),
                                                  sum(c.completion_tokens for *_, c in finals)))

    def event(self, index: int, chunk: Chunk) -> str:
        extra = {"token_ids": chunk.token_ids}
        if chunk.finish_reason:
            extra |= {"finish_reason": chunk.finish_reason, "stats": chunk.stats}
        return sse(self._envelope([self.choice(index, chunk.text, chunk.finish_reason, extra)]))

    def usage_event(self, prompt_tokens: int, completion_tokens: int) -> str:
        return sse(self._envelope([], self.usage(prompt_tokens, completion_tokens)))


def field_path(model: type[BaseModel], loc: tuple) -> str | None:
    """The field an error location names ("stream_options.include_usage"), without pydantic's
    union-member tags ("prompt.str" -> "prompt"); None where it names no field (invalid JSON's
    location is a character offset)."""
    parts = []
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            break
        parts.append(str(part))
        model = fields[part].annotation
        model = next((a for a in getattr(model, "__args__", (model,)) if isinstance(a, type)
                      and issubclass(a, BaseModel)), model)
    return ".".join(parts) or (loc[0] if loc and isinstance(loc[0], str) else None)


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


def error_body(message: str, param: str | None, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
