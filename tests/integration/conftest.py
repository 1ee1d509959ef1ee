"""The real thing: `serve run deploy/hispec.yaml` in a subprocess, shared by the serving tests."""

from __future__ import annotations

import pytest

from tests.serve_process import Server, server_for_tests


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    with server_for_tests("deploy/hispec.yaml", tmp_path_factory.mktemp("serve")) as handle:
        yield handle
