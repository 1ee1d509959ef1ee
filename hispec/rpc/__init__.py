"""The `hispec.v1` gRPC API: `hispec.proto` and the modules generated from it (see codegen.py)."""
