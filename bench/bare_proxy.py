"""A bare aiosmtpd -> aiosmtplib forwarding proxy with a pooled upstream (the baseline relay).

What a home-made relay gets: no rules, no footers, no audit; it still answers 250 only
after the upstream accepted. ``python -m bench.bare_proxy LISTEN_PORT UPSTREAM_PORT [LOOP]``
(LOOP: ``asyncio``, the default and the baseline, or ``uvloop``, for comparison).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP


class Forward:
    def __init__(self, upstream_port: int, pool_size: int = 16) -> None:
        self.port = upstream_port
        self.pool: asyncio.LifoQueue[aiosmtplib.SMTP] = asyncio.LifoQueue()
        self.slots = asyncio.Semaphore(pool_size)

    async def _client(self) -> aiosmtplib.SMTP:
        while not self.pool.empty():
            client = self.pool.get_nowait()
            if client.is_connected:
                return client
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, start_tls=False)
        await client.connect()
        return client

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        async with self.slots:
            client = await self._client()
            try:
                await client.sendmail(envelope.mail_from, envelope.rcpt_tos, envelope.content)
            except (aiosmtplib.SMTPException, OSError):
                client.close()
                return "451 4.3.0 upstream failed"
            self.pool.put_nowait(client)
        return "250 2.0.0 forwarded"


async def main(listen: int, upstream: int) -> None:
    handler = Forward(upstream)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bare-proxy", data_size_limit=None), "127.0.0.1", listen
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    # Not importing prospect_mailer: the baseline carries nothing of ours (nor its memory).
    new_loop = asyncio.new_event_loop
    if sys.argv[3:] == ["uvloop"]:
        import uvloop

        new_loop = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(main(int(sys.argv[1]), int(sys.argv[2])))
