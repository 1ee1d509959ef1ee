"""Resident memory of a local Ray Serve server's processes, read from /proc (Linux).

A `serve run` server is a tree of processes: `serve run` starts a Ray node (gcs_server, raylet),
whose raylet starts the workers that Serve turns into its controller (`ray::ServeController`),
proxy (`ray::ProxyActor`, which listens on the HTTP and gRPC ports) and replicas
(`ray::ServeReplica:<app>:<deployment>`); a HiSpec engine replica starts the engine process
(`hispec.serving.engine_process`) as its child. The server's memory is the RSS of the Serve
processes and all their descendants; Ray's own daemons are not counted.

Which tree: the one under `--server-pid` (e.g. the `serve run` process) when given; otherwise
the Ray node whose proxy listens on one of the target ports (several servers may run on one
machine); otherwise, if no listener can be found, every Serve process of this user.

RSS counts shared pages in each process that maps them (the same library in five workers counts
five times): it overstates the total, but its growth between two samples is what a leak shows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SERVE_TITLES = ("ray::ServeReplica", "ray::ServeController", "ray::ProxyActor")
PROC = Path("/proc")


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    uid: int
    title: str  # the command line (Ray workers rewrite theirs to `ray::<actor>`)


def process_table() -> dict[int, Process]:
    """Every process this user can see, by pid (processes that exit while read are skipped)."""
    table = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            uid = entry.stat().st_uid
        except OSError:
            continue
        # stat: "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        table[int(entry.name)] = Process(int(entry.name), ppid, uid, title)
    return table


def descendants(table: dict[int, Process], roots: set[int]) -> set[int]:
    """`roots` (those still alive) and every process below them."""
    children: dict[int, list[int]] = {}
    for process in table.values():
        children.setdefault(process.ppid, []).append(process.pid)
    found, todo = set(), [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def is_serve_process(process: Process) -> bool:
    return process.title.startswith(SERVE_TITLES)


def rss_bytes(pid: int) -> int | None:
    """VmRSS of a process; None if it is gone (or a kernel thread without one)."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def listening_pids(port: int) -> set[int]:
    """Processes of this user holding a TCP socket that listens on `port` (any address)."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()  # sl local_address rem_address st ... inode
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    pids = set()
    if not inodes:
        return pids
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                pids.add(int(entry.name))
        except OSError:  # another user's process, or gone
            continue
    return pids


@dataclass(frozen=True)
class Snapshot:
    total_bytes: int
    processes: dict[int, tuple[str, int]]  # pid -> (title, rss bytes)


@dataclass(frozen=True)
class ServerProcesses:
    """Where a server's processes are: the subtree of `root`, or (root None) all of this user's."""

    root: int | None
    how: str  # how the root was found, for the report

    def pids(self) -> dict[int, str]:
        """pid -> title of the Serve processes in scope and their descendants (with `--server-pid`
        and no Serve process below it: the whole subtree)."""
        table = process_table()
        if self.root is None:
            scope = {pid for pid, p in table.items() if p.uid == os.getuid()}
        else:
            scope = descendants(table, {self.root})
        serve = {pid for pid in scope if is_serve_process(table[pid])}
        chosen = descendants(table, serve) if serve or self.root is None else scope
        return {pid: table[pid].title for pid in sorted(chosen)}

    def snapshot(self) -> Snapshot:
        processes = {}
        for pid, title in self.pids().items():
            rss = rss_bytes(pid)
            if rss is not None:
                processes[pid] = (title, rss)
        return Snapshot(sum(rss for _, rss in processes.values()), processes)


def find_server(server_pid: int | None, ports: list[int]) -> ServerProcesses:
    """The server to watch: under `server_pid`, else the Ray node (its raylet) of whatever listens
    on one of `ports`, else every Serve process of this user."""
    if server_pid is not None:
        if not (PROC / str(server_pid)).exists():
            raise ValueError(f"--server-pid {server_pid}: no such process")
        return ServerProcesses(server_pid, f"--server-pid {server_pid}")
    table = process_table()
    for port in ports:
        for pid in sorted(listening_pids(port)):
            ancestor = pid
            while ancestor in table and ancestor > 1:
                if "raylet" in table[ancestor].title.split(" ", 1)[0]:
                    return ServerProcesses(ancestor, f"the Ray node (raylet pid {ancestor}) whose process {pid} "
                                                     f"listens on port {port}")
                ancestor = table[ancestor].ppid
            return ServerProcesses(pid, f"process {pid}, which listens on port {port} (no raylet above it)")
    return ServerProcesses(None, f"every {'/'.join(SERVE_TITLES)} process of uid {os.getuid()} "
                                 f"(nothing found listening on ports {ports})")
