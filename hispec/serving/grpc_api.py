"""`hispec.v1` messages <-> the engine's terms."""

from __future__ import annotations

from hispec.rpc import hispec_pb2 as pb
from hispec.rpc.servicer import UndecodableRequest
from hispec.serving.messages import Chunk, EngineInfo
from hispec.serving.params import GenerationParams, InvalidArgument, Limits, generation_params


def check_decoded(request: object) -> None:
    """Bytes that were no valid message arrive as an `UndecodableRequest` (hispec.rpc.servicer): a
    client error, refused like a bad field."""
    if isinstance(request, UndecodableRequest):
        raise InvalidArgument("request", f"is not a valid {request.message_type}: {request.reason}")


def params_from(request: pb.GenerateRequest, limits: Limits) -> GenerationParams:
    check_decoded(request)

    def given(field: str):
        return getattr(request, field) if request.HasField(field) else None

    return generation_params(
        limits, max_new_tokens=given("max_new_tokens"), temperature=given("temperature"), top_p=given("top_p"),
        top_k=given("top_k"), seed=given("seed"), stop=list(request.stop))


def response_from(request_id: str, chunk: Chunk, text: str | None = None,
                  token_ids: list[int] | None = None) -> pb.GenerateResponse:
    """One response message; `text`/`token_ids` override the chunk's (the unary call sends them all)."""
    response = pb.GenerateResponse(request_id=request_id, text=chunk.text if text is None else text,
                                   token_ids=chunk.token_ids if token_ids is None else token_ids,
                                   finish_reason=chunk.finish_reason)
    if chunk.stats is not None:
        response.usage.CopyFrom(pb.Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                                         total_tokens=chunk.prompt_tokens + chunk.completion_tokens))
        response.stats.CopyFrom(stats_message(chunk.stats))
    return response


def stats_message(stats: dict) -> pb.SpeculationStats:
    return pb.SpeculationStats(
        hierarchy=stats["hierarchy"], target_passes=stats["target_passes"],
        tokens_per_target_pass=stats["tokens_per_target_pass"],
        layer_forwards_per_token=stats["layer_forwards_per_token"],
        levels=[pb.LevelStats(level=lv["level"], exit_layer=lv["exit"], role=lv["role"], rounds=lv["rounds"],
                              proposed=lv.get("proposed", lv.get("drafted", 0)), accepted=lv.get("accepted", 0),
                              acceptance_rate=lv.get("acceptance_rate") or 0.0)
                for lv in stats["levels"]])


def model_info(info: EngineInfo) -> pb.ModelInfoResponse:
    return pb.ModelInfoResponse(model=info.model, num_layers=info.num_layers, max_context=info.limits.max_context,
                                vocab_size=info.vocab_size, hierarchies=info.hierarchies,
                                max_batch_size=info.max_batch_size,
                                default_max_new_tokens=info.limits.default_max_new_tokens,
                                max_prompt_chars=info.limits.max_prompt_chars)
