"""Ray Serve application: gRPC (`hispec.v1`) and OpenAI-style HTTP in front of the batched engine.

`build_app(args)` (in `hispec.serving.app`) is what `deploy/hispec.yaml` imports.
"""
