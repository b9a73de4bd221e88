"""Several relay processes on one listening socket (``[relay] workers = N``).

One Python process runs its event loop on one core: the GIL keeps a second core idle however
many sessions are open. With ``workers > 1`` the parent binds one listening socket per worker
on the same port (``SO_REUSEPORT``: the kernel spreads new connections over them by a hash of
the client's address and port), forks that many workers that each accept on their own socket
and run a complete relay: own event loop, store connections, upstream pool. One socket shared
by every worker would not spread the load: asyncio accepts every pending connection at each
wake-up, so the worker that wakes first takes a whole burst (10 sessions opened at once: 8 or
9 on one worker, measured). Elsewhere than on Linux (whose ``SO_REUSEPORT`` is the one that
balances), the workers share one socket. Nothing is shared but
the socket and the database, and the database already serialises what must be (claims, the
audit chain, suppression), exactly as for several relays started by hand.

The parent only supervises: SIGTERM or SIGINT is passed on to every worker (each finishes its
in-flight transactions, as a single relay does), and if a worker dies on its own the others are
stopped and the parent exits non-zero, so that a service manager restarts the whole relay
rather than leave it running short-handed unnoticed. Linux and other POSIX systems only (fork).

Per-worker limits: ``max_connections_per_client`` is counted by each worker.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from types import FrameType
from typing import Any, cast

from .errors import ConfigError

__all__ = ["bind_listeners", "event_loop_factory", "run_workers"]

log = logging.getLogger("prospect_mailer.relay")


def event_loop_factory(choice: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The event loop a relay process runs on: ``(name, factory)`` for ``choice``.

    ``auto`` takes uvloop (libuv, in C) when it is installed and asyncio's own loop otherwise;
    uvloop took about 10% off the relay's CPU per 2 KB message (2.33 -> 2.1 ms, measured with
    ``smtp-source`` against ``bench.relay_server``).

    Raises:
        ConfigError: ``uvloop`` asked for but not installed, or an unknown choice.
    """
    if choice not in ("auto", "asyncio", "uvloop"):
        raise ConfigError(f"relay.event_loop must be auto, asyncio or uvloop, not {choice!r}")
    if choice != "asyncio":
        try:
            import uvloop  # optional: the "fast" extra
        except ImportError as exc:
            if choice == "uvloop":
                raise ConfigError(
                    "relay.event_loop = uvloop, but uvloop is not installed: "
                    "pip install 'prospect-mailer[fast]' (Linux and macOS)"
                ) from exc
        else:
            factory: Any = uvloop.new_event_loop
            return "uvloop", factory
    return "asyncio", asyncio.new_event_loop


def bind_listeners(host: str, port: int, count: int, *, backlog: int = 1024) -> list[socket.socket]:
    """``count`` listening sockets on one ``host:port`` (port 0: the system picks one).

    With ``count > 1`` on Linux, ``count`` distinct ``SO_REUSEPORT`` sockets; otherwise one
    socket, listed ``count`` times.

    Raises:
        ConfigError: the address cannot be bound (in use, not local...).
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # Only Linux spreads connections over SO_REUSEPORT sockets; macOS and the BSDs give them
    # all to one socket (FreeBSD's balancing option is another one), so the workers share one.
    reuse_port = count > 1 and sys.platform.startswith("linux")
    sockets: list[socket.socket] = []
    try:
        if reuse_port and port != 0:
            # SO_REUSEPORT would let a second relay started by mistake share the port with
            # this one (same user) instead of failing: a plain bind first fails if anything
            # listens there, as a single-worker relay's bind does.
            socket.create_server((host, port), family=family).close()
        for _ in range(count if reuse_port else 1):
            sockets.append(
                socket.create_server(
                    (host, port), family=family, backlog=backlog, reuse_port=reuse_port
                )
            )
            port = sockets[0].getsockname()[1]  # port 0: the others join the port picked
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"relay cannot listen on {host}:{port}: {exc}") from exc
    return sockets if reuse_port else sockets * count


def _worker(
    main: Callable[[socket.socket, int], None], listeners: Sequence[socket.socket], i: int
) -> None:
    # The parent's forwarding handlers were copied by fork: a worker stops on signals its
    # own way (its event loop installs handlers for a graceful stop).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    own = listeners[i]
    for sock in listeners:
        if sock is not own:
            sock.close()  # another worker's: connections queued there are that worker's
    main(own, i)


def run_workers(
    listeners: Sequence[socket.socket],
    worker_main: Callable[[socket.socket, int], None],
    *,
    on_started: Callable[[], None] | None = None,
) -> int:
    """Fork one process per listener running ``worker_main(listeners[index], index)``; wait.

    ``listeners`` come from :func:`bind_listeners`. Call it before any thread or event loop
    exists in this process (fork copies only the calling thread). Returns the exit code for
    the parent: 0 when every worker stopped cleanly after a signal, else 1.
    """
    workers = len(listeners)
    if workers < 1:
        raise ValueError("workers must be at least 1")
    context = multiprocessing.get_context("fork")
    procs = [
        context.Process(target=_worker, args=(worker_main, listeners, i), name=f"relay-worker-{i}")
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
        for sock in {id(s): s for s in listeners}.values():
            sock.close()
