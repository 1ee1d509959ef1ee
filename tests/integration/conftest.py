"""The real thing: `serve run deploy/hispec.yaml` in a subprocess, shared by the serving tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
HTTP_PORT, GRPC_PORT = 8000, 9000  # what deploy/hispec.yaml sets
START_TIMEOUT_S = 240


@dataclass(frozen=True)
class Server:
    http: str
    grpc: str
    log: Path

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _ready(http: str, grpc_target: str) -> bool:
    import grpc

    from hispec.rpc import hispec_pb2 as pb
    from hispec.rpc import hispec_pb2_grpc as rpc

    try:
        if requests.get(f"{http}/healthz", timeout=5).status_code != 200:
            return False
        with grpc.insecure_channel(grpc_target) as channel:
            return rpc.HiSpecStub(channel).Health(pb.HealthRequest(), timeout=10).serving
    except (requests.RequestException, grpc.RpcError):
        return False


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    busy = [p for p in (HTTP_PORT, GRPC_PORT) if not _port_free(p)]
    if busy:
        pytest.fail(f"ports {busy} are in use: stop the server holding them (e.g. `serve shutdown`) first")
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster of its own
    serve = Path(sys.executable).parent / "serve"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(serve), "run", "deploy/hispec.yaml"], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    handle = Server(f"http://127.0.0.1:{HTTP_PORT}", f"127.0.0.1:{GRPC_PORT}", log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(handle.http, handle.grpc):
            if process.poll() is not None:
                pytest.fail(f"`serve run` exited with {process.returncode}:\n{handle.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready after {START_TIMEOUT_S} s:\n{handle.log_tail()}")
            time.sleep(2)
        yield handle
    finally:
        process.send_signal(signal.SIGINT)  # serve run shuts the app and its local Ray down
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
