"""`serve run CONFIG` in a subprocess, waited on until both protocols answer (integration and GPU tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
HTTP_PORT, GRPC_PORT = 8000, 9000  # what the configs in deploy/ set
START_TIMEOUT_S = 240


@dataclass(frozen=True)
class Server:
    http: str
    grpc: str
    log: Path

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class ServerFailed(RuntimeError):
    pass


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


@contextlib.contextmanager
def running_server(config: str, log: Path) -> Iterator[Server]:
    """Starts `serve run config` (a local Ray cluster of its own) and stops it on exit."""
    busy = [p for p in (HTTP_PORT, GRPC_PORT) if not _port_free(p)]
    if busy:
        raise ServerFailed(f"ports {busy} are in use: stop the server holding them (e.g. `serve shutdown`) first")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    serve = Path(sys.executable).parent / "serve"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(serve), "run", config], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{HTTP_PORT}", f"127.0.0.1:{GRPC_PORT}", log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(server.http, server.grpc):
            if process.poll() is not None:
                raise ServerFailed(f"`serve run` exited with {process.returncode}:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerFailed(f"the server was not ready after {START_TIMEOUT_S} s:\n{server.log_tail()}")
            time.sleep(2)
        yield server
    finally:
        process.send_signal(signal.SIGINT)  # serve run shuts the app and its local Ray down
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
