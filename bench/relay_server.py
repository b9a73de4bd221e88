"""The prospect-mailer relay for the benchmark, on a prepared store.

``python -m bench.relay_server DB LISTEN_PORT UPSTREAM_PORT PROSPECTS`` registers campaign
``bench`` (bound to the sender ``ventes@acme.example``) and prospects ``{i}to@x.example``
(what ``smtp-source -N -t to@x.example`` sends to), then relays to the upstream.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from prospect_mailer import Prospect, ProspectMailer, SMTPTransport
from prospect_mailer.relay import RelayServer
from prospect_mailer.relay_config import RelaySettings
from prospect_mailer.store import Store, sqlite_url
from prospect_mailer.tokens import TokenSigner

from .fixtures import bench_campaign, bench_prospect

CAMPAIGN = bench_campaign("bench", "{# relay #}")


def prospect(i: int) -> Prospect:
    return bench_prospect(f"{i}to@x.example")


async def main(db: str, listen: int, upstream: int, prospects: int) -> None:
    async with Store.connect(sqlite_url(db)) as store:
        await store.campaigns.upsert(CAMPAIGN)
        for start in range(0, prospects + 1, 5000):
            await store.prospects.upsert_many(
                prospect(i) for i in range(start, min(prospects + 1, start + 5000))
            )
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
        await relay.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await relay.close()
        await mailer.close()
        await transport.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
