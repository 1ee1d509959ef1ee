"""The committed gRPC modules are what the proto generates today, and they describe hispec.v1."""

from hispec.rpc import codegen


def test_generated_modules_are_fresh():
    assert codegen.stale_files() == [], "run `python -m hispec.rpc.codegen` and commit the result"


def test_service_shape():
    from hispec.rpc import hispec_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["HiSpec"]
    assert pb.DESCRIPTOR.package == "hispec.v1"
    methods = {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods}
    assert methods["Generate"] == ("GenerateRequest", "GenerateResponse", False)
    assert methods["GenerateStream"] == ("GenerateRequest", "GenerateResponse", True)
    assert {"ModelInfo", "Health"} <= set(methods)
    request = pb.GenerateRequest(prompt="x")
    assert not request.HasField("temperature")  # unset and 0 must differ: optional fields
