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

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from hispec.rpc import hispec_pb2 as pb
from hispec.serving import grpc_api
from hispec.serving.config import AppArgs
from hispec.serving.edge import (UNAUTHENTICATED, EdgeGuard, EdgePolicy, bearer_matches, is_retryable, message_of,
                                 status_of)
from hispec.serving.logs import log_like_serve
from hispec.serving.messages import Chunk, EngineInfo
from hispec.serving.metrics import IngressMetrics
from hispec.serving.openai_api import CompletionBuilder, CompletionRequest, error_body, field_path, sse
from hispec.serving.params import GenerationParams, InvalidArgument, check_prompt, check_prompt_ids

log = logging.getLogger(__name__)

# Engine failures before a request produced anything are retried this many times (the engine
# replica waits for its rebuild before taking the retry), so a crash costs such clients only time.
RETRIES_WHEN_UNAVAILABLE = 2

http_app = FastAPI(title="HiSpec", description="OpenAI-style completions served with hierarchical speculation")
http_app.add_middleware(EdgeGuard)  # API key and body size, before any route runs


@http_app.exception_handler(RequestValidationError)
async def _bad_json(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    param = field_path(CompletionRequest, first["loc"][1:]) if first["loc"][:1] == ("body",) else None
    return JSONResponse(error_body(f"{param}: {first['msg']}" if param else first["msg"], param), status_code=400)


@http_app.exception_handler(StarletteHTTPException)
async def _http_exception(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (unknown route, wrong method, a body it cannot parse) in our error shape."""
    return JSONResponse(error_body(str(error.detail), None, "invalid_request_error" if error.status_code < 500
                                   else "server_error"), status_code=error.status_code, headers=error.headers)


def _http_error(error: BaseException, request_id: str) -> JSONResponse:
    """The JSON error for a failure, its status by cause; internal errors are logged with the id."""
    status = status_of(error)
    if status.http >= 500:
        log.error("HTTP request %s failed: %s", request_id, message_of(error), exc_info=status.http == 500)
    message = message_of(error) if status.http != 500 else f"internal error (request {request_id}): {message_of(error)}"
    return JSONResponse(error_body(message, getattr(error, "field", None), status.kind),
                        status_code=status.http, headers={"retry-after": "1"} if status.http in (429, 503) else None)


@serve.deployment(name="HiSpecIngress", max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(http_app)
class HiSpecIngress:
    def __init__(self, engine: DeploymentHandle, args: dict) -> None:
        from transformers import AutoTokenizer

        log_like_serve()
        self.args = AppArgs.model_validate(args)
        self.engine = engine
        self.tokenizer = AutoTokenizer.from_pretrained(self.args.model, trust_remote_code=False)
        self.metrics = IngressMetrics()
        self._info: "EngineInfo | None" = None
        self.api_key = self.args.api_key()
        http_app.state.edge = EdgePolicy(self.api_key, self.args.max_request_bytes)
        log.info("ingress up; API key %s", "required" if self.api_key else "not configured (open)")

    # ---- shared ----------------------------------------------------------------------------
    async def info(self) -> EngineInfo:
        if self._info is None:
            self._info = await self.engine.get_info.remote()
        return self._info

    async def _prompt_ids(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Token ids per prompt, checked. Tokenizing runs on a worker thread: a long prompt must not
        hold the event loop (and every other stream's chunks) while it is cut into tokens."""
        limits = (await self.info()).limits
        texts = [check_prompt(p, limits) for p in prompts if not isinstance(p, list)]
        encoded = (await asyncio.to_thread(self.tokenizer, texts, add_special_tokens=True))["input_ids"] if texts else []
        text_ids = iter(encoded)
        return [check_prompt_ids(p if isinstance(p, list) else next(text_ids), limits) for p in prompts]

    async def _stream(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[Chunk]:
        """The engine's chunks; an engine failure before the first chunk is retried (the client saw nothing)."""
        for attempt in range(RETRIES_WHEN_UNAVAILABLE + 1):
            response = self.engine.options(stream=True).generate.remote(prompt_ids, params)
            streamed = False
            try:
                async for chunk in response:
                    streamed = True
                    yield chunk
                return
            except Exception as error:
                if streamed or not is_retryable(error) or attempt == RETRIES_WHEN_UNAVAILABLE:
                    raise
                log.warning("engine unavailable before the first token (%s); retrying", message_of(error))
            finally:  # closed early (client gone, a sibling choice failed): the engine aborts the request
                response.cancel()

    async def _whole(self, prompt_ids: list[int], params: GenerationParams) -> tuple[str, list[int], Chunk]:
        """The whole completion: (text, new token ids, last chunk with finish reason and stats). The
        client sees nothing before the end, so an engine failure at any point is retried."""
        for attempt in range(RETRIES_WHEN_UNAVAILABLE + 1):
            try:
                chunks = [chunk async for chunk in self._stream(prompt_ids, params)]
                return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], chunks[-1]
            except Exception as error:
                if status_of(error).http != 503 or attempt == RETRIES_WHEN_UNAVAILABLE:
                    raise
                log.warning("engine failed mid-request (%s); running it again", message_of(error))
        raise AssertionError("unreachable")

    # ---- gRPC: hispec.v1.HiSpec ----------------------------------------------------------------
    def _grpc_authorized(self, context: RayServegRPCContext, method: str) -> bool:
        if self.api_key is None:
            return True
        metadata = dict(context.invocation_metadata() or ())
        if bearer_matches(metadata.get("authorization"), self.api_key):
            return True
        context.set_code(UNAUTHENTICATED.grpc)
        context.set_details("missing or wrong API key: send metadata `authorization: Bearer <key>`")
        self.metrics.failed("grpc", method, UNAUTHENTICATED.grpc.name)
        return False

    async def _grpc_prepare(self, request: pb.GenerateRequest) -> tuple[list[int], GenerationParams]:
        limits = (await self.info()).limits
        params = grpc_api.params_from(request, limits)
        [prompt_ids] = await self._prompt_ids([request.prompt])
        params.new_tokens_for(len(prompt_ids), limits, "max_new_tokens")  # an explicit length must fit
        return prompt_ids, params

    def _grpc_error(self, context: RayServegRPCContext, method: str, request_id: str, error: Exception) -> None:
        status = status_of(error)
        if status.http >= 500:
            log.error("gRPC %s %s failed: %s", method, request_id, message_of(error), exc_info=status.http == 500)
        context.set_code(status.grpc)
        context.set_details(message_of(error) if status.http != 500
                            else f"internal error (request {request_id}): {message_of(error)}")
        self.metrics.failed("grpc", method, status.grpc.name)

    async def Generate(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        self.metrics.received("grpc", "Generate")
        request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
        if not self._grpc_authorized(grpc_context, "Generate"):
            return pb.GenerateResponse(request_id=request_id)
        try:
            prompt_ids, params = await self._grpc_prepare(request)
            text, token_ids, last = await self._whole(prompt_ids, params)
        except Exception as error:
            self._grpc_error(grpc_context, "Generate", request_id, error)
            return pb.GenerateResponse(request_id=request_id)
        return grpc_api.response_from(request_id, last, text=text, token_ids=token_ids)

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context: RayServegRPCContext) -> AsyncIterator[pb.GenerateResponse]:
        self.metrics.received("grpc", "GenerateStream")
        request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
        if not self._grpc_authorized(grpc_context, "GenerateStream"):
            raise PermissionError("unauthenticated")  # a stream keeps the status set above only when it raises
        try:
            prompt_ids, params = await self._grpc_prepare(request)
            async for chunk in self._stream(prompt_ids, params):
                yield grpc_api.response_from(request_id, chunk)
        except Exception as error:
            self._grpc_error(grpc_context, "GenerateStream", request_id, error)
            raise  # a stream ends with the status set above only when the generator raises

    def _grpc_admit(self, context: RayServegRPCContext, method: str, request) -> bool:
        """Count the call; False (status already set) without the API key or for bytes that were no message."""
        if not self._grpc_authorized(context, method):
            return False
        try:
            grpc_api.check_decoded(request)
        except InvalidArgument as error:
            self._grpc_error(context, method, "-", error)
            return False
        return True

    async def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context: RayServegRPCContext) -> pb.ModelInfoResponse:
        self.metrics.received("grpc", "ModelInfo")
        if not self._grpc_admit(grpc_context, "ModelInfo", request):
            return pb.ModelInfoResponse()
        return grpc_api.model_info(await self.info())

    async def Health(self, request: pb.HealthRequest, grpc_context: RayServegRPCContext) -> pb.HealthResponse:
        self.metrics.received("grpc", "Health")
        if not self._grpc_admit(grpc_context, "Health", request):
            return pb.HealthResponse()
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
        builder = CompletionBuilder((await self.info()).model)
        try:
            return await self._complete(body, builder)
        except Exception as error:
            self.metrics.failed("http", "completions", str(status_of(error).http))
            return _http_error(error, builder.id)

    async def _complete(self, body: CompletionRequest, builder: CompletionBuilder):
        info = await self.info()
        if body.model is not None and body.model != info.model:
            self.metrics.failed("http", "completions", "404")
            return JSONResponse(error_body(f"model {body.model!r} is not served here (serving {info.model!r})",
                                           "model", code="model_not_found"), status_code=404)
        params = body.params(info.limits)
        prompts = body.prompts()
        if len(prompts) > self.args.max_prompts_per_request:
            raise InvalidArgument("prompt", f"{len(prompts)} prompts; at most {self.args.max_prompts_per_request} "
                                            "are accepted per request")
        prompts = await self._prompt_ids(prompts)
        for ids in prompts:
            params.new_tokens_for(len(ids), info.limits, "max_tokens")
        if body.stream:
            # the first chunks arrive before the 200 goes out: a request the engine refuses still gets a status
            opened = await self._open_all(prompts, params)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(builder, opened, include_usage), media_type="text/event-stream")
        choices = [asyncio.create_task(self._whole(ids, params)) for ids in prompts]
        try:
            finals = await asyncio.gather(*choices)
        finally:  # one choice failed (or the client left): the others stop too and free their KV
            for choice in choices:
                choice.cancel()
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
                await events.put(sse(error_body(message_of(error), None, kind=status_of(error).kind)))
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
