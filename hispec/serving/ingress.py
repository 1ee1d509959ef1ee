"""The ingress: gRPC `hispec.v1.HiSpec` (through Serve's gRPC proxy) and OpenAI-style HTTP.

It validates and tokenizes at the edge, then streams from the engine deployment. It holds no
model and no per-token loop, so the engine behind it can become a multi-stage pipeline without
changing it.

(No `from __future__ import annotations` here: FastAPI reads the route annotations at runtime.)
"""


import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from hispec.engine.executor import ExecutorFailure
from hispec.rpc import hispec_pb2 as pb
from hispec.serving import grpc_api
from hispec.serving.config import AppArgs
from hispec.serving.messages import Chunk, EngineInfo
from hispec.serving.metrics import IngressMetrics
from hispec.serving.openai_api import CompletionBuilder, CompletionRequest, error_body, field_path, sse
from hispec.serving.params import GenerationParams, InvalidArgument, check_prompt, check_prompt_ids

log = logging.getLogger(__name__)

http_app = FastAPI(title="HiSpec", description="OpenAI-style completions served with hierarchical speculation")


@http_app.exception_handler(RequestValidationError)
async def _bad_json(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    param = field_path(CompletionRequest, first["loc"][1:]) if first["loc"][:1] == ("body",) else None
    return JSONResponse(error_body(f"{param}: {first['msg']}" if param else first["msg"], param), status_code=400)


@http_app.exception_handler(ExecutorFailure)
async def _unavailable(request, error: ExecutorFailure) -> JSONResponse:
    return JSONResponse(error_body(f"engine unavailable, retry: {_message(error)}", None, "unavailable"), status_code=503)


def _message(error: BaseException) -> str:
    """What went wrong, without Ray's wrapping: an error raised in the engine replica arrives as a
    RayTaskError whose text is a whole traceback; its `cause` is the exception itself."""
    cause = getattr(error, "cause", None)
    return str(cause if isinstance(cause, BaseException) else error)


@http_app.exception_handler(InvalidArgument)
async def _invalid(request: Request, error: InvalidArgument) -> JSONResponse:
    return JSONResponse(error_body(str(error), error.field), status_code=400)



@serve.deployment(name="HiSpecIngress", max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(http_app)
class HiSpecIngress:
    def __init__(self, engine: DeploymentHandle, args: dict) -> None:
        from transformers import AutoTokenizer

        self.args = AppArgs.model_validate(args)
        self.engine = engine
        self.tokenizer = AutoTokenizer.from_pretrained(self.args.model)
        self.metrics = IngressMetrics()
        self._info: "EngineInfo | None" = None

    # ---- shared ----------------------------------------------------------------------------
    async def info(self) -> EngineInfo:
        if self._info is None:
            self._info = await self.engine.get_info.remote()
        return self._info

    async def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        limits = (await self.info()).limits
        if isinstance(prompt, list):
            return check_prompt_ids(prompt, limits)
        ids = self.tokenizer(check_prompt(prompt, limits), add_special_tokens=True)["input_ids"]
        return check_prompt_ids(ids, limits)

    async def _stream(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[Chunk]:
        response = self.engine.options(stream=True).generate.remote(prompt_ids, params)
        try:
            async for chunk in response:
                yield chunk
        finally:  # closed early (client gone, a sibling choice failed): the engine aborts the request
            response.cancel()

    async def _whole(self, prompt_ids: list[int], params: GenerationParams) -> tuple[str, list[int], Chunk]:
        """The whole completion: (text, new token ids, last chunk with finish reason and stats)."""
        chunks = [chunk async for chunk in self._stream(prompt_ids, params)]
        return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], chunks[-1]

    # ---- gRPC: hispec.v1.HiSpec ----------------------------------------------------------------
    async def _grpc_prepare(self, request: pb.GenerateRequest) -> tuple[list[int], GenerationParams]:
        limits = (await self.info()).limits
        params = grpc_api.params_from(request, limits)
        prompt_ids = await self._prompt_ids(request.prompt)
        params.new_tokens_for(len(prompt_ids), limits, "max_new_tokens")  # an explicit length must fit
        return prompt_ids, params

    def _grpc_error(self, context: RayServegRPCContext, method: str, error: Exception) -> None:
        if isinstance(error, InvalidArgument):
            code = grpc.StatusCode.INVALID_ARGUMENT
        elif isinstance(error, ExecutorFailure):  # e.g. a pipeline stage died; the replica rebuilds it
            code = grpc.StatusCode.UNAVAILABLE
            log.error("gRPC %s: engine unavailable: %s", method, error)
        else:
            code = grpc.StatusCode.INTERNAL
            log.exception("gRPC %s failed", method, exc_info=error)
        context.set_code(code)
        context.set_details(_message(error))
        self.metrics.failed("grpc", method, code.name)

    async def Generate(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        self.metrics.received("grpc", "Generate")
        request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
        try:
            prompt_ids, params = await self._grpc_prepare(request)
            text, token_ids, last = await self._whole(prompt_ids, params)
        except Exception as error:
            self._grpc_error(grpc_context, "Generate", error)
            return pb.GenerateResponse(request_id=request_id)
        return grpc_api.response_from(request_id, last, text=text, token_ids=token_ids)

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context: RayServegRPCContext) -> AsyncIterator[pb.GenerateResponse]:
        self.metrics.received("grpc", "GenerateStream")
        request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
        try:
            prompt_ids, params = await self._grpc_prepare(request)
            async for chunk in self._stream(prompt_ids, params):
                yield grpc_api.response_from(request_id, chunk)
        except Exception as error:
            self._grpc_error(grpc_context, "GenerateStream", error)
            raise  # a stream ends with the status set above only when the generator raises

    async def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context: RayServegRPCContext) -> pb.ModelInfoResponse:
        self.metrics.received("grpc", "ModelInfo")
        return grpc_api.model_info(await self.info())

    async def Health(self, request: pb.HealthRequest, grpc_context: RayServegRPCContext) -> pb.HealthResponse:
        self.metrics.received("grpc", "Health")
        return pb.HealthResponse(**await self.engine.load.remote())

    # ---- HTTP: OpenAI-style ----------------------------------------------------------------
    @http_app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        load = await self.engine.load.remote()
        return JSONResponse({"status": "ok" if load["serving"] else "unavailable", **load},
                            status_code=200 if load["serving"] else 503)

    @http_app.get("/v1/models")
    async def models(self) -> dict:
        info = await self.info()
        return {"object": "list", "data": [{"id": info.model, "object": "model", "created": 0, "owned_by": "hispec",
                                             "max_model_len": info.limits.max_context}]}

    @http_app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        self.metrics.received("http", "completions")
        info = await self.info()
        if body.model is not None and body.model != info.model:
            self.metrics.failed("http", "completions", "404")
            return JSONResponse(error_body(f"model {body.model!r} is not served here (serving {info.model!r})",
                                           "model", code="model_not_found"), status_code=404)
        try:
            params = body.params(info.limits)
            prompts = [await self._prompt_ids(p) for p in body.prompts()]
            for ids in prompts:
                params.new_tokens_for(len(ids), info.limits, "max_tokens")
        except InvalidArgument:
            self.metrics.failed("http", "completions", "400")
            raise
        builder = CompletionBuilder(info.model)
        if body.stream:
            # the first chunks arrive before the 200 goes out: a request the engine refuses still gets a status
            opened = await self._open_all(prompts, params)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(builder, opened, include_usage), media_type="text/event-stream")
        finals = await asyncio.gather(*(self._whole(ids, params) for ids in prompts))
        return builder.whole(finals)

    async def _open_all(self, prompts: list[list[int]], params: GenerationParams) -> list[tuple[Chunk, AsyncIterator]]:
        """Start every choice's engine stream and wait for its first chunk; on any failure close them all."""
        streams = [self._stream(ids, params) for ids in prompts]
        firsts = await asyncio.gather(*(anext(stream) for stream in streams), return_exceptions=True)
        failure = next((f for f in firsts if isinstance(f, BaseException)), None)
        if failure is not None:
            for stream in streams:
                await stream.aclose()
            raise failure
        return list(zip(firsts, streams))

    async def _sse(self, builder: CompletionBuilder, opened: list[tuple[Chunk, AsyncIterator]],
                   include_usage: bool) -> AsyncIterator[str]:
        """Every choice's chunks as they come (interleaved), then usage if asked, then [DONE]."""
        events: asyncio.Queue = asyncio.Queue()
        usage = [[0, 0] for _ in opened]

        async def pump(index: int, first: Chunk, rest: AsyncIterator) -> None:
            try:
                chunk = first
                while True:
                    usage[index] = [chunk.prompt_tokens, chunk.completion_tokens]
                    await events.put(builder.event(index, chunk))
                    chunk = await anext(rest)
            except StopAsyncIteration:
                pass
            except Exception as error:  # after the 200 went out: report in-band, as OpenAI does
                log.exception("stream %d failed", index)
                await events.put(sse(error_body(str(error), None, kind="server_error")))
            finally:
                await events.put(None)

        tasks = [asyncio.create_task(pump(i, first, rest)) for i, (first, rest) in enumerate(opened)]
        try:
            open_streams = len(tasks)
            while open_streams:
                event = await events.get()
                if event is None:
                    open_streams -= 1
                else:
                    yield event
            if include_usage:
                yield builder.usage_event(sum(u[0] for u in usage), sum(u[1] for u in usage))
            yield sse("[DONE]")
        finally:  # client gone: cancelling the pumps cancels the engine streams (their requests are aborted)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
