"""Several relay processes on one listening socket (``[relay] workers = N``).

One Python process runs its event loop on one core: the GIL keeps a second core idle however
many sessions are open. With ``workers > 1`` the parent binds the listening socket, forks that
many workers that each accept on it (the kernel hands every new connection to one of them) and
run a complete relay: own event loop, store connections, upstream pool. Nothing is shared but
the socket and the database, and the database already serialises what must be (claims, the
audit chain, suppression), exactly as for several relays started by hand.

The parent only supervises: SIGTERM or SIGINT is passed on to every worker (each finishes its
in-flight transactions, as a single relay does), and if a worker dies on its own the others are
stopped and the parent exits non-zero, so that a service manager restarts the whole relay
rather than leave it running short-handed unnoticed. Linux and other POSIX systems only (fork).

Per-worker limits: ``max_connections_per_client`` is counted by each worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
from collections.abc import Callable
from multiprocessing.connection import wait
from types import FrameType
from typing import cast

from .errors import ConfigError

__all__ = ["bind_listener", "run_workers"]

log = logging.getLogger("prospect_mailer.relay")


def bind_listener(host: str, port: int, *, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: the system picks one).

    Raises:
        ConfigError: the address cannot be bound (in use, not local...).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        raise ConfigError(f"relay cannot listen on {host}:{port}: {exc}") from exc


def _worker(main: Callable[[socket.socket, int], None], listener: socket.socket, i: int) -> None:
    # The parent's forwarding handlers were copied by fork: a worker stops on signals its
    # own way (its event loop installs handlers for a graceful stop).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    main(listener, i)


def run_workers(
    listener: socket.socket,
    workers: int,
    worker_main: Callable[[socket.socket, int], None],
    *,
    on_started: Callable[[], None] | None = None,
) -> int:
    """Fork ``workers`` processes running ``worker_main(listener, index)``; wait for them.

    Call it before any thread or event loop exists in this process (fork copies only the
    calling thread). Returns the exit code for the parent: 0 when every worker stopped cleanly
    after a signal, else 1.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    context = multiprocessing.get_context("fork")
    procs = [
        context.Process(target=_worker, args=(worker_main, listener, i), name=f"relay-worker-{i}")
        for i in range(workers)
    ]
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                os.kill(p.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for p in procs:
            p.start()
        if on_started is not None:
            on_started()
        code = 0
        running = {p.sentinel: p for p in procs}
        while running:
            for sentinel in wait(list(running)):
                p = running.pop(cast(int, sentinel))
                p.join()
                if not stopping:
                    log.error(
                        "relay: %s exited by itself (code %s); stopping the others", p.name,
                        p.exitcode,
                    )  # fmt: skip
                    code = 1
                    forward(signal.SIGTERM, None)
                elif p.exitcode != 0:
                    code = 1
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        listener.close()
