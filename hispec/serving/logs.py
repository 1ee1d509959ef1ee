"""hispec's log lines in a Serve replica: where Serve's own go (the replica's log file, and the
console of `serve run`), at INFO. Ray leaves the root logger at WARNING with no handler of its own,
so without this a replica's `log.info` (its KV layout, a rebuild, the API key setting) is lost."""

from __future__ import annotations

import logging


def log_like_serve() -> None:
    ours, serve = logging.getLogger("hispec"), logging.getLogger("ray.serve")
    ours.setLevel(logging.INFO)
    for handler in serve.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.propagate = not ours.handlers  # no Serve handlers (outside a replica): the root's handlers
