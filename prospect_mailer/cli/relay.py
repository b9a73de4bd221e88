"""``prospect-mailer relay`` (the SMTP relay) and ``prospect-mailer campaigns add|list``."""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..campaigns import campaign_ref, load_relay_campaign, register_campaigns
from ..config import Settings, load_settings
from ..models import Campaign
from ..relay import RelayServer
from ..relay_config import RelaySettings, hash_password, parse_listen
from ..relay_workers import bind_listeners, event_loop_factory, run_workers
from ..store import Store
from .app import app, console

relay_app = typer.Typer(
    help="The drop-in SMTP relay: point a CRM or script at it instead of your SMTP server.",
)
app.add_typer(relay_app, name="relay")
campaigns_app = typer.Typer(help="Campaigns registered for the relay.", no_args_is_help=True)
app.add_typer(campaigns_app, name="campaigns")


@relay_app.callback(invoke_without_command=True)
def relay(
    ctx: typer.Context,
    listen: Annotated[
        str | None, typer.Option(help="host:port to listen on (default 127.0.0.1:2525)")
    ] = None,
    upstream: Annotated[
        str | None,
        typer.Option(
            help="smtp://, smtps:// or smtp+starttls://user:pass@host:port "
            "(default: relay.upstream, else smtp_url, else the outbox folder)"
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1, max=64, help="relay processes sharing the port, e.g. one per core (default 1)"
        ),
    ] = None,
) -> None:
    """Run the relay until SIGTERM or Ctrl-C (in-flight messages are finished first).

    Example: prospect-mailer relay --listen 127.0.0.1:2525 --upstream smtp+starttls://u:p@mx:587
    """
    if ctx.invoked_subcommand is not None:
        return
    settings = load_settings()
    changes: dict[str, object] = {}
    if listen:
        changes["listen"] = listen
    if upstream:
        changes["upstream"] = upstream
    if workers is not None:
        changes["workers"] = workers
    if changes:
        merged = RelaySettings.model_validate(settings.relay.model_dump() | changes)
        settings = settings.model_copy(update={"relay": merged})
    count = settings.relay.workers
    loop_name, new_loop = event_loop_factory(settings.relay.event_loop)
    if count == 1:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(_serve(settings, loop_name=loop_name))
        return
    listeners = bind_listeners(*parse_listen(settings.relay.listen), count)
    host, port = listeners[0].getsockname()[:2]

    def started() -> None:
        # Flushed at once: scripts and tests wait for this line to connect.
        print(f"relay listening on {host}:{port}, {count} worker processes", flush=True)

    def worker(sock: socket.socket, index: int) -> None:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(_serve(settings, sock, index, loop_name=loop_name))

    code = run_workers(listeners, worker, on_started=started)
    print("relay stopped: every worker finished", flush=True)
    raise typer.Exit(code)


async def _serve(
    settings: Settings, sock: socket.socket | None = None, index: int = 0, *, loop_name: str
) -> None:
    server = await RelayServer.from_settings(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await server.start(sock)
        except BaseException:
            await server.close()
            raise
        # This process is the relay: what start-up loaded (modules, templates, settings) lives
        # as long as it does. Out of the collector's sight, full collections only walk what
        # messages allocate (about 5-10% of the relay's CPU on a 2 KB message).
        gc.collect()
        gc.freeze()
        where = "the outbox " + str(settings.outbox_dir)
        if settings.relay.upstream or settings.smtp_url:
            where = repr(getattr(server.handler.dsn_transport, "host", "upstream SMTP"))
        who = f"relay worker {index}" if sock is not None else "relay"
        # Flushed at once: scripts and tests wait for this line to connect.
        print(
            f"{who} listening on {server.host}:{server.port}, delivering to {where} "
            f"(event loop: {loop_name})",
            flush=True,
        )
        await server.serve_until(stop)
        print(f"{who} stopped: in-flight messages finished, store closed", flush=True)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


@relay_app.command("hash-password")
def hash_password_command(
    stdin: Annotated[bool, typer.Option("--stdin", help="read the password from stdin")] = False,
) -> None:
    """Print the hash of a relay AUTH password (password_hash of a relay user in the config).

    Example: prospect-mailer relay hash-password
    """
    if stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    if not password:
        raise typer.BadParameter("the password is empty")
    print(hash_password(password))


@campaigns_app.command("add")
def campaigns_add(
    files: Annotated[list[Path], typer.Argument(help="campaign TOML files")],
) -> None:
    """Register campaigns for the relay (replacing the same id and step).

    Every file is checked before any is registered. Example: prospect-mailer campaigns add
    examples/campaign.toml
    """
    campaigns = [load_relay_campaign(f) for f in files]
    settings = load_settings()

    async def run() -> None:
        async with Store.connect(settings.database_url) as store:
            await register_campaigns(store, campaigns)

    asyncio.run(run())
    for c in campaigns:
        console.print(f"registered {escape(campaign_ref(c))} ({escape(c.advertiser.id)})")


@campaigns_app.command("list")
def campaigns_list() -> None:
    """List the registered campaigns. Example: prospect-mailer campaigns list"""
    settings = load_settings()

    async def run() -> list[Campaign]:
        async with Store.connect(settings.database_url) as store:
            return await store.campaigns.list()

    campaigns = asyncio.run(run())
    table = Table(title=f"{len(campaigns)} registered campaign(s)")
    for column in ("reference (X-Prospect-Campaign)", "advertiser", "purpose", "from"):
        table.add_column(column)
    for c in campaigns:
        table.add_row(
            escape(campaign_ref(c)),
            escape(c.advertiser.id),
            escape(c.purpose or "MISSING"),
            escape(c.from_address),
        )
    console.print(table)
