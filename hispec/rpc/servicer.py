"""The servicer function Serve's gRPC proxy registers (`grpc_servicer_functions` in deploy/*.yaml):
the generated `add_HiSpecServicer_to_server`, except that a request that does not decode is not an
exception.

The proxy decodes every request before any of our code runs. With the generated decoders, bytes
that are no valid message (a corrupt wire format, a string field that is not UTF-8) raise inside
grpcio's aio server, which answers UNKNOWN "Unexpected <class 'DecodeError'>": a server's status for
a client's mistake. Here they decode to an `UndecodableRequest` instead, which travels to the
ingress like any request (the proxy pickles it) and is refused there with INVALID_ARGUMENT
(`hispec.serving.grpc_api.check_decoded`).

Light on purpose: the proxy imports it, with neither torch nor the serving package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError, Message

from hispec.rpc import hispec_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["HiSpec"]


@dataclass(frozen=True)
class UndecodableRequest:
    """What arrives in place of a request whose bytes did not decode as `message_type`."""

    message_type: str  # e.g. "hispec.v1.GenerateRequest"
    reason: str  # protobuf's words, e.g. "Wire format was corrupt"
    request_id: str = ""  # read before validation, as on a real request (the server makes one up)


def tolerant_decoder(message_class: type[Message]) -> Callable[[bytes], Message | UndecodableRequest]:
    def decode(data: bytes) -> Message | UndecodableRequest:
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            return UndecodableRequest(message_class.DESCRIPTOR.full_name, _reason(error))

    return decode


def _reason(error: DecodeError) -> str:
    """protobuf's reason without the type it repeats ("Error parsing message with type 'X': reason")."""
    return str(error).rpartition("': ")[2] or str(error)


def method_handlers(servicer) -> dict[str, grpc.RpcMethodHandler]:
    """One handler per method of hispec.v1.HiSpec, read from the proto's descriptor (so a method added
    to the proto is served without an edit here)."""
    handlers = {}
    for method in SERVICE.methods:
        assert not method.client_streaming, f"{method.name}: client streaming is not served"
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=tolerant_decoder(request),
                                     response_serializer=response.SerializeToString)
    return handlers


def add_HiSpecServicer_to_server(servicer, server) -> None:  # noqa: N802  (the generated function's name)
    handlers = method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
