"""`serve run CONFIG` in a subprocess, waited on until both protocols answer (integration and GPU tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTTP_PORT, GRPC_PORT = 8000, 9000  # what the configs in deploy/ set
START_TIMEOUT_S = 240


@dataclass(frozen=True)
class Server:
    http: str
    grpc: str
    log: Path
    pid: int | None = None  # the `serve run` process (its Ray cluster's processes descend from it)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def processes(self, title_prefix: str) -> set[int]:
        """Pids of this server's own Ray processes whose title starts with `title_prefix` (e.g.
        `ray::StageActor`, `ray::ServeReplica:hispec:HiSpecEngine`): descendants of its `serve run`,
        since other servers on this machine may run the same actors."""
        table = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], check=True, capture_output=True, text=True).stdout
        parent, args = {}, {}
        for line in table.splitlines():
            pid, ppid, *rest = line.split(None, 2)
            parent[int(pid)], args[int(pid)] = int(ppid), rest[0] if rest else ""

        def ours(pid: int) -> bool:
            seen = set()
            while pid not in seen and pid > 1:
                if pid == self.pid:
                    return True
                seen.add(pid)
                pid = parent.get(pid, 0)
            return False

        return {pid for pid, a in args.items() if a.startswith(title_prefix) and ours(pid)}


    def rss_bytes(self) -> int:
        """Resident memory of this server's Serve processes and their children (the engine process)."""
        from hispec.bench.server_memory import ServerProcesses

        return ServerProcesses(self.pid, "the test's `serve run`").snapshot().total_bytes


class ServerFailed(RuntimeError):
    pass


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _ready(http: str, grpc_target: str, api_key: str | None = None) -> bool:
    import grpc

    from hispec.rpc import hispec_pb2 as pb
    from hispec.rpc import hispec_pb2_grpc as rpc

    try:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if requests.get(f"{http}/healthz", timeout=5, headers=headers).status_code != 200:
            return False
        metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        with grpc.insecure_channel(grpc_target) as channel:
            return rpc.HiSpecStub(channel).Health(pb.HealthRequest(), timeout=10, metadata=metadata).serving
    except (requests.RequestException, grpc.RpcError):
        return False


def _config_on_ports(config: str, http_port: int | None, grpc_port: int | None,
                     tmp: Path, args: dict | None = None) -> tuple[str, int, int]:
    """(config to run, its HTTP port, its gRPC port): `config` itself, or a copy of it in `tmp`
    with the requested ports where they differ from its own and `args` merged into its app's args."""
    with open(ROOT / config) as f:
        spec = yaml.safe_load(f)
    own_http = spec.get("http_options", {}).get("port", HTTP_PORT)
    own_grpc = spec.get("grpc_options", {}).get("port", GRPC_PORT)
    http_port = own_http if http_port is None else http_port
    grpc_port = own_grpc if grpc_port is None else grpc_port
    if (http_port, grpc_port) == (own_http, own_grpc) and not args:
        return config, http_port, grpc_port
    if args:
        spec["applications"][0].setdefault("args", {}).update(args)
    spec.setdefault("http_options", {})["port"] = http_port
    spec.setdefault("grpc_options", {})["port"] = grpc_port
    copy = tmp / Path(config).name
    copy.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(copy), http_port, grpc_port


@contextlib.contextmanager
def running_server(config: str, log: Path, http_port: int | None = None,
                   grpc_port: int | None = None, env: dict[str, str] | None = None,
                   args: dict | None = None) -> Iterator[Server]:
    """Starts `serve run config` (a local Ray cluster of its own) and stops it on exit. With
    `http_port`/`grpc_port`, serves on those instead of the config's (from a copy of the config),
    so that a second server can run beside one on the usual ports. `env` adds environment variables
    (the Ray cluster's processes inherit them), `args` overrides entries of the application's args."""
    with tempfile.TemporaryDirectory(prefix="hispec-serve-") as tmp:
        config, http_port, grpc_port = _config_on_ports(config, http_port, grpc_port, Path(tmp), args)
        with _serve(config, log, http_port, grpc_port, env or {}) as server:
            yield server


@contextlib.contextmanager
def server_for_tests(config: str, log_dir: Path, **kwargs) -> Iterator[Server]:
    """`running_server` for a pytest fixture: a server that does not start fails the test with its log."""
    import pytest

    try:
        with running_server(config, Path(log_dir) / "serve.log", **kwargs) as handle:
            yield handle
    except ServerFailed as error:
        pytest.fail(str(error))


@contextlib.contextmanager
def _serve(config: str, log: Path, http_port: int, grpc_port: int, extra_env: dict[str, str]) -> Iterator[Server]:
    busy = [p for p in (http_port, grpc_port) if not _port_free(p)]
    if busy:
        raise ServerFailed(f"ports {busy} are in use: stop the server holding them (e.g. `serve shutdown`) first")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | extra_env
    serve = Path(sys.executable).parent / "serve"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(serve), "run", config], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log, process.pid)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(server.http, server.grpc, extra_env.get("HISPEC_API_KEY")):
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
