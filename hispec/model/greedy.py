"""Plain greedy decoding with the full model: the reference every speculative path must equal."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hispec.model.model import EarlyExitModel


@torch.inference_mode()
def greedy_generate(
    model: EarlyExitModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    on_token: Callable[[int], None] | None = None,
) -> tuple[list[int], str]:
    """Greedy continuation of one prompt. Returns (new token ids, finish reason).

    Finish reasons: "stop" (an EOS token was produced; it is included), "length" (max new
    tokens), "context" (the model's context length is full).
    """
    if not prompt_ids:
        raise ValueError("prompt must hold at least one token")
    if max_new_tokens <= 0:
        return [], "length"
    L = model.config.num_layers
    capacity = min(len(prompt_ids) + max_new_tokens, model.config.max_position_embeddings)
    if len(prompt_ids) >= capacity:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in a {capacity}-token context")
    cache = model.new_cache(num_slots=1, capacity=capacity)
    token_ids = torch.tensor([list(prompt_ids)], device=model.device)  # [1, T]
    out: list[int] = []
    while True:
        step = model.plan(cache, [0], token_ids.shape[1])
        hidden = model.forward_layers(model.embed(token_ids), step, cache, 0, L)
        token_ids = model.exit_logits(hidden[:, -1:]).argmax(-1)  # [1, 1]
        token = int(token_ids)  # host sync: the token is streamed out
        out.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos_token_ids:
            return out, "stop"
        if len(out) >= max_new_tokens:
            return out, "length"
        if cache.length(L - 1, 0) + 1 > capacity:
            return out, "context"
