"""Group commit for the audit log: many concurrent writers, one transaction per batch.

Each caller of :meth:`AuditWriter.write` waits until *its* event is committed (durable before
the caller proceeds, e.g. before handing a message to SMTP). Meanwhile the writer drains
whatever other coroutines queued while the previous batch was committing, up to ``max_batch``
events, into the next :meth:`AuditLog.append` call: one lock, one fsync for many events.

Ordering and uniqueness still come from the database (the chain head lock); the queue only
groups work. Several writers, in one process or many, may share a database.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from ..errors import StoreError
from .audit import AuditLog
from .audit_records import AuditEvent, AuditRecord

__all__ = ["AuditWriter"]

_Item = tuple[dict[str, object], "asyncio.Future[AuditRecord]"]


class AuditWriter:
    """Batches concurrent :meth:`write` calls into grouped commits.

    Use as an async context manager (``async with store.audit.writer() as writer``), or call
    :meth:`start` and :meth:`close`. Closing flushes every event already accepted.

    Args:
        log: the audit log to append to.
        max_batch: most events in one transaction.
    """

    def __init__(self, log: AuditLog, *, max_batch: int = 500) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._log = log
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        #: Number of transactions committed (for tests and metrics).
        self.batches = 0

    def start(self) -> None:
        """Start the background task (in the running event loop).

        Raises:
            StoreError: the writer was closed.
        """
        if self._closing:
            raise StoreError("the audit writer is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="prospect-mailer-audit-writer"
            )

    async def write(self, event: AuditEvent) -> AuditRecord:
        """Append ``event`` and return its record once committed.

        Raises:
            InvalidInputError: the event cannot be stored (only this caller fails).
            StoreError: the writer is closed or not started, or the batch's transaction
                failed (every caller of that batch gets the error).
        """
        if self._closing or self._task is None:
            raise StoreError("the audit writer is not running")
        row = event._row()  # validate here, so a bad event fails only its own caller
        future: asyncio.Future[AuditRecord] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((row, future))
        return await future

    async def _run(self) -> None:
        try:
            done = False
            while not done:
                first = await self._queue.get()
                if first is None:
                    return
                batch = [first]
                while len(batch) < self._max_batch and not self._queue.empty():
                    item = self._queue.get_nowait()
                    if item is None:
                        done = True  # flush what is queued, then stop
                        break
                    batch.append(item)
                await self._commit(batch)
        finally:
            # Only reached with items left if the task itself was cancelled: nobody waits
            # forever.
            self._closing = True
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if item is not None and not item[1].done():
                    item[1].set_exception(StoreError("the audit writer stopped before writing"))

    async def _commit(self, batch: list[_Item]) -> None:
        try:
            records = await self._log._append_rows([row for row, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                if not future.done():
                    future.set_exception(StoreError("the audit writer was cancelled"))
            raise
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    # One exception object per waiter: each gets its own traceback.
                    error = StoreError(
                        str(exc) if isinstance(exc, StoreError) else f"audit write failed: {exc}"
                    )
                    error.__cause__ = exc
                    future.set_exception(error)
            return
        self.batches += 1
        for (_, future), record in zip(batch, records, strict=True):
            if not future.done():  # the caller may have been cancelled meanwhile
                future.set_result(record)

    async def close(self) -> None:
        """Stop accepting events, commit everything already accepted, stop the task.

        Idempotent.
        """
        self._closing = True
        task = self._task
        if task is None or task.done():
            return
        self._queue.put_nowait(None)
        await asyncio.shield(task)

    async def __aenter__(self) -> AuditWriter:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
