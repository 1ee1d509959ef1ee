"""The real thing: `serve run deploy/hispec.yaml` in a subprocess, shared by the serving tests."""

from __future__ import annotations

import pytest

from tests.serve_process import Server, ServerFailed, running_server


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    try:
        with running_server("deploy/hispec.yaml", tmp_path_factory.mktemp("serve") / "serve.log") as handle:
            yield handle
    except ServerFailed as error:
        pytest.fail(str(error))
