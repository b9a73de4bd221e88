"""The send pipeline's group commits in a child process, off the event loop's GIL.

In one process the writer thread (:class:`~prospect_mailer.store.fastwrite.SQLiteWriter`)
competes with the event loop for the GIL: each statement releases it while SQLite works, and
takes it back only when the loop lets go. Through the relay (2 KB messages, 10 sessions) a
transaction of about four sends then took 4.5-6.5 ms of which about 2 were work, each send
waited about 12 ms for each of its two commits, and the loop sat idle a quarter of the time.
Measured in the same run, the relay did 273 msgs/s with the writer thread, and 380-413
msgs/s with a stand-in writer that cost the loop nothing and answered after 2-4 ms.

:class:`ProcessWriter` runs the same transactions (the same code:
:class:`~prospect_mailer.store.fastwrite.SendsCommit` through ``SQLiteWriter``'s transaction)
in a child process (``main`` here, with the database file's path) that owns its own
connection: the work goes over a pipe pickled, one transaction at a time, the answers come
back in order. Only the send pipeline's group commit goes there (``Store.open(...,
writer_process=True)``); every other write keeps the writer thread, SQLite's write lock
ordering them as it orders several processes.

Failing closed: if the child ends (killed, out of memory), every commit waiting for it fails
with :class:`~prospect_mailer.errors.StoreError`, so nothing is sent for those claims (a claim
not made is a send not made), and the log says why. Such a commit may or may not have been
written: SQLite's journal keeps the file whole either way, and the claim's state tells which.
The next commit starts a new child (at most one start a second; until then commits fail the
same way). The child ignores SIGINT and SIGTERM, which reach a whole process group
(Ctrl-C, a service manager): it ends when the parent closes its end of the pipe, after the
commits already sent to it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import pickle
import signal
import sqlite3
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from ..errors import StoreError
from .fastwrite import SQLiteWriter

__all__ = ["ProcessWriter"]

log = logging.getLogger("prospect_mailer.store")

T = TypeVar("T")

_HEADER = struct.Struct(">I")  # each frame: its length, then a pickle
#: Seconds the child has to open its connection and answer.
START_TIMEOUT = 30.0
#: Seconds the child has to finish the commits sent to it once the parent closes.
STOP_TIMEOUT = 15.0
#: The child's program (``-c``, not ``-m``: the package imports this module first).
_CHILD = (
    "import sys; from prospect_mailer.store.writer_process import main; "
    "sys.exit(main(sys.argv[1:]))"
)
#: The child imports this package from where the parent found it.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class ProcessWriter:
    """Transactions on a SQLite file, run in a child process (see the module doc).

    Use :meth:`start`; :meth:`run` has the signature of ``SQLiteWriter.run``, except that
    ``work`` must be picklable (plain data and a module-level callable).
    """

    #: Seconds between two starts of the child: one that keeps dying is not restarted in a
    #: loop (the commits meanwhile fail, closed).
    RESTART_INTERVAL = 1.0

    def __init__(self, path: str, proc: asyncio.subprocess.Process) -> None:
        """Wrap a started child; use :meth:`start` instead."""
        self._path = path
        self._proc = proc
        self._started_at = time.monotonic()
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._ended: str | None = None  # why the child takes no more work
        self._closed = False
        self._restarting = asyncio.Lock()
        self._reader = asyncio.create_task(self._read(proc))

    @classmethod
    async def start(cls, path: str) -> ProcessWriter:
        """Start the child for the database file ``path`` and wait until it has opened it.

        Raises:
            StoreError: the child could not be started or could not open the database.
        """
        return cls(path, await _spawn(path))

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._proc.pid

    async def run(self, what: str, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work(connection)`` in one transaction in the child.

        A child that ended is started again first (at most once a :attr:`RESTART_INTERVAL`).

        Raises:
            StoreError: the database failed, ``work`` could not be pickled, the store is
                closed, or the child ended (nothing is written then, or, for a commit in
                flight as it ended, perhaps all of it) and could not be started again.
            InvalidInputError: raised by ``work`` (nothing is written).
        """
        if self._ended is not None or self._closed:
            await self._restart(what)  # a live child afterwards, or StoreError
        try:
            data = pickle.dumps((what, work), protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise StoreError(
                f"{what} failed: the work cannot go to the writer process: {exc}"
            ) from exc
        if self._ended is not None or self._closed:  # ended meanwhile: nobody would answer
            raise StoreError(f"{what} failed: {self._ended or 'the store is closed'}")
        proc = self._proc
        assert proc.stdin is not None
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        try:
            proc.stdin.write(_HEADER.pack(len(data)) + data)
            await proc.stdin.drain()
        except (ConnectionError, OSError):
            proc.kill()  # its reader sees the end and fails every waiting commit
        return await future

    async def _restart(self, what: str) -> None:
        async with self._restarting:
            if self._closed:
                raise StoreError(f"{what} failed: the store is closed")
            if self._ended is None:
                return  # another commit started it again meanwhile
            if time.monotonic() - self._started_at < self.RESTART_INTERVAL:
                raise StoreError(f"{what} failed: {self._ended}")
            self._started_at = time.monotonic()
            try:
                proc = await _spawn(self._path)
            except StoreError as exc:
                raise StoreError(f"{what} failed: {self._ended}; {exc}") from exc
            if self._closed:  # closed while it started
                await _stop(proc)
                raise StoreError(f"{what} failed: the store is closed")
            self._proc, self._ended = proc, None
            self._reader = asyncio.create_task(self._read(proc))
            log.warning("the writer process was started again (pid %d)", proc.pid)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        reason = "the writer process ended"
        try:
            while True:
                ok, value = await _frame(proc)
                if not self._waiting:
                    raise pickle.UnpicklingError("an answer nobody waits for")
                future = self._waiting.popleft()
                if future.done():
                    continue  # its caller was cancelled; the work was done all the same
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
        except asyncio.IncompleteReadError:
            code = await proc.wait()
            if not self._closed:
                reason = f"the writer process ended unexpectedly (exit code {code})"
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            reason = f"the writer process answered wrongly: {exc}"
            proc.kill()
        finally:
            self._end(reason)

    def _end(self, reason: str) -> None:
        """The child takes no more work: fail every commit still waiting (fail closed)."""
        if self._ended is None:
            self._ended = reason
            if not self._closed:
                log.error(
                    "%s: the commits in flight failed (nothing sent for their claims); "
                    "the next commit starts it again",
                    reason,
                )
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(StoreError(f"recording sends failed: {reason}"))

    async def close(self) -> None:
        """Let the child finish the work sent to it and end. Idempotent."""
        self._closed = True
        async with self._restarting:  # not while a restart is under way
            await _stop(self._proc)
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self._end("the store is closed")


async def _spawn(path: str) -> asyncio.subprocess.Process:
    """Start a child for ``path``; returns once it has opened the database.

    Raises:
        StoreError: it could not be started or could not open the database.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            path,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
    except OSError as exc:
        raise StoreError(f"could not start the writer process: {exc}") from exc
    try:
        ok, value = await asyncio.wait_for(_frame(proc), START_TIMEOUT)
    except (TimeoutError, asyncio.IncompleteReadError, OSError, pickle.UnpicklingError) as exc:
        proc.kill()
        code = await proc.wait()
        reason = "timed out" if isinstance(exc, TimeoutError) else f"exit code {code}"
        raise StoreError(f"the writer process did not start ({reason})") from exc
    if not ok:
        await _stop(proc)
        raise StoreError(f"the writer process could not open {path}: {value}")
    return proc


async def _frame(proc: asyncio.subprocess.Process) -> tuple[bool, Any]:
    assert proc.stdout is not None
    (size,) = _HEADER.unpack(await proc.stdout.readexactly(_HEADER.size))
    answer = pickle.loads(await proc.stdout.readexactly(size))  # noqa: S301 - our own child
    if not (isinstance(answer, tuple) and len(answer) == 2):
        raise pickle.UnpicklingError("not an answer")
    return bool(answer[0]), answer[1]


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """Close the child's input (it ends after the work already sent) and wait for it."""
    if proc.stdin is not None and not proc.stdin.is_closing():
        proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
    except TimeoutError:
        log.error("the writer process did not end within %.0f s: killed", STOP_TIMEOUT)
        proc.kill()
        await proc.wait()


def _answer(out: BinaryIO, ok: bool, value: object) -> None:
    try:
        data = pickle.dumps((ok, value), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # an exception that does not pickle
        data = pickle.dumps((False, StoreError(f"{type(value).__name__}: {value} ({exc})")))
    out.write(_HEADER.pack(len(data)) + data)
    out.flush()


def main(argv: list[str]) -> int:
    """The child: ``main([database file])``, requests on stdin, answers on stdout."""
    if len(argv) != 1:
        print("usage: writer_process.main([DATABASE])", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the parent ends us by closing the pipe
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print goes to stderr, never into the answers
    inp = sys.stdin.buffer
    writer = SQLiteWriter(argv[0])
    try:
        writer.open()
    except StoreError as exc:
        _answer(out, False, exc)
        return 1
    _answer(out, True, None)
    try:
        while head := inp.read(_HEADER.size):
            size = _HEADER.unpack(head)[0] if len(head) == _HEADER.size else -1
            body = inp.read(size) if size >= 0 else b""
            if size < 0 or len(body) != size:
                print("writer process: truncated request", file=sys.stderr)
                return 1
            try:
                what, work = pickle.loads(body)  # noqa: S301 - from our own parent
                result = writer.transaction(what, work)
            except Exception as exc:
                _answer(out, False, exc)
            else:
                _answer(out, True, result)
    finally:
        writer.close()
    return 0
