"""The prospect-mailer relay for the benchmark, on a prepared store.

``python -m bench.relay_server DB LISTEN_PORT UPSTREAM_PORT PROSPECTS [WORKERS [WRITER]]``
(WRITER ``thread`` or ``process``: the relay's ``writer`` setting) registers
campaign ``bench`` (bound to the sender ``ventes@acme.example``) and prospects
``{i}to@x.example`` (what ``smtp-source -N -t to@x.example`` sends to), then relays to the
upstream, in one process or in WORKERS processes sharing the port (``[relay] workers``).
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
import sys

from prospect_mailer import Prospect, ProspectMailer, SMTPTransport
from prospect_mailer.relay import RelayServer
from prospect_mailer.relay_config import RelaySettings
from prospect_mailer.relay_workers import bind_listeners, event_loop_factory, run_workers
from prospect_mailer.store import Store, sqlite_url
from prospect_mailer.tokens import TokenSigner

from .fixtures import bench_campaign, bench_prospect

CAMPAIGN = bench_campaign("bench", "{# relay #}")


def prospect(i: int) -> Prospect:
    return bench_prospect(f"{i}to@x.example")


async def prepare(db: str, prospects: int) -> None:
    async with Store.connect(sqlite_url(db)) as store:
        await store.campaigns.upsert(CAMPAIGN)
        for start in range(0, prospects + 1, 5000):
            await store.prospects.upsert_many(
                prospect(i) for i in range(start, min(prospects + 1, start + 5000))
            )


async def serve(
    db: str, listen: int, upstream: int, sock: socket.socket | None, writer: str
) -> None:
    async with Store.connect(sqlite_url(db), writer_process=writer == "process") as store:
        transport = SMTPTransport("127.0.0.1", upstream, start_tls=False, pool_size=16)
        mailer = ProspectMailer(
            store=store,
            transport=transport,
            signer=TokenSigner(["bench-key-0123456789abcdef"]),
            base_url="https://optout.acme.example",
            mailto_domain="optout.acme.example",
            transport_label="relay",
            concurrency=16,
        )
        settings = RelaySettings(
            listen=f"127.0.0.1:{listen}",
            sender_campaigns={"ventes@acme.example": "bench"},
            max_connections_per_client=1000,
            max_message_size=64 * 1024 * 1024,
        )
        relay = RelayServer(mailer, settings)
        await relay.start(sock)
        gc.collect()
        gc.freeze()  # as `prospect-mailer relay` does once started
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        if sock is None:
            print("ready", flush=True)
        await stop.wait()
        await relay.close()
        await mailer.close()
        await transport.close()


def main(db: str, listen: int, upstream: int, prospects: int, workers: int, writer: str) -> int:
    asyncio.run(prepare(db, prospects))
    # The event loop `prospect-mailer relay` takes (relay.event_loop = auto).
    _, new_loop = event_loop_factory("auto")

    def run(sock: socket.socket | None) -> None:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(serve(db, listen, upstream, sock, writer))

    if workers == 1:
        run(None)
        return 0
    return run_workers(
        bind_listeners("127.0.0.1", listen, workers),
        lambda sock, _i: run(sock),
        on_started=lambda: print("ready", flush=True),
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    args += ["1", "thread"][len(args) - 4 :]  # WORKERS and WRITER by default
    sys.exit(main(args[0], int(args[1]), int(args[2]), int(args[3]), int(args[4]), args[5]))
