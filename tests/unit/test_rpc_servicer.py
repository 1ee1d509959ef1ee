"""The servicer function the gRPC proxy registers: undecodable bytes become a client error, not UNKNOWN
(a real grpcio server, no Ray)."""

from __future__ import annotations

import pickle
from concurrent import futures

import grpc
import pytest

from hispec.rpc import hispec_pb2 as pb
from hispec.rpc.servicer import SERVICE, UndecodableRequest, add_HiSpecServicer_to_server, tolerant_decoder
from hispec.serving import grpc_api
from hispec.serving.params import InvalidArgument, Limits

LIMITS = Limits(max_context=64, vocab_size=100, default_max_new_tokens=20, max_prompt_chars=50, max_stop_strings=2)
# bytes that are no GenerateRequest: corrupt wire format, a prompt that is not UTF-8, a length past the end
UNDECODABLE = [b"\xff", b"\x0a\x10abc", b"\x0a\x02\xff\xfe", b"\x10" + b"\xff" * 11, b"\x0f", b"\x00\x01"]


@pytest.mark.parametrize("data", UNDECODABLE)
def test_undecodable_bytes_become_an_undecodable_request(data):
    decoded = tolerant_decoder(pb.GenerateRequest)(data)
    assert isinstance(decoded, UndecodableRequest) and decoded.message_type == "hispec.v1.GenerateRequest"
    assert decoded.reason and "Error parsing" not in decoded.reason  # protobuf's reason, not its preamble
    assert pickle.loads(pickle.dumps(decoded)) == decoded  # the proxy pickles it to the ingress
    with pytest.raises(InvalidArgument, match=r"^request: is not a valid hispec.v1.GenerateRequest: "):
        grpc_api.params_from(decoded, LIMITS)


def test_valid_bytes_decode_as_usual():
    request = pb.GenerateRequest(prompt="def f():", max_new_tokens=3, stop=["\n"])
    assert tolerant_decoder(pb.GenerateRequest)(request.SerializeToString()) == request
    assert tolerant_decoder(pb.GenerateRequest)(b"") == pb.GenerateRequest()  # empty is a valid message
    assert grpc_api.params_from(request, LIMITS).max_new_tokens == 3


class EchoServicer:
    """Answers with what the decoder gave it, or refuses it as the ingress does."""

    def Generate(self, request, context):  # noqa: N802
        try:
            grpc_api.check_decoded(request)
        except InvalidArgument as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return pb.GenerateResponse(text=request.prompt)

    def GenerateStream(self, request, context):  # noqa: N802
        yield self.Generate(request, context)

    def ModelInfo(self, request, context):  # noqa: N802
        return pb.ModelInfoResponse(model=type(request).__name__)

    def Health(self, request, context):  # noqa: N802
        return pb.HealthResponse(serving=True)


@pytest.fixture(scope="module")
def channel():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_HiSpecServicer_to_server(EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    server.stop(None)


def test_every_method_of_the_proto_is_served(channel):
    from hispec.rpc import hispec_pb2_grpc as rpc

    assert {m.name for m in SERVICE.methods} == {"Generate", "GenerateStream", "ModelInfo", "Health"}
    stub = rpc.HiSpecStub(channel)
    assert stub.Generate(pb.GenerateRequest(prompt="hi")).text == "hi"
    assert [r.text for r in stub.GenerateStream(pb.GenerateRequest(prompt="yo"))] == ["yo"]
    assert stub.ModelInfo(pb.ModelInfoRequest()).model == "ModelInfoRequest"
    assert stub.Health(pb.HealthRequest()).serving


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
@pytest.mark.parametrize("data", UNDECODABLE)
def test_a_real_server_answers_invalid_argument_to_undecodable_bytes(channel, method, data):
    identity = lambda b: b  # noqa: E731  (our bytes go out as they are)
    path = f"/hispec.v1.HiSpec/{method}"
    call = (channel.unary_stream(path, request_serializer=identity, response_deserializer=identity)
            if method == "GenerateStream" else
            channel.unary_unary(path, request_serializer=identity, response_deserializer=identity))
    with pytest.raises(grpc.RpcError) as caught:
        result = call(data, timeout=10)
        list(result) if method == "GenerateStream" else result
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("request: is not a valid hispec.v1.GenerateRequest: ")
