"""``prospect-mailer serve``: the unsubscribe handler (:mod:`prospect_mailer.web`) under uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from ..config import load_settings
from ..errors import ConfigError
from ..web import create_app
from .app import EXIT_BLOCKED, app, console

__all__ = ["parse_listen", "serve"]


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` -> ``(host, port)``; port 0 lets the system choose.

    Raises:
        ConfigError: not of that form.
    """
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


@app.command()
def serve(
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on.")] = "127.0.0.1:8080",
    certfile: Annotated[
        Path | None,
        typer.Option(help="TLS certificate (PEM) to serve HTTPS without a reverse proxy."),
    ] = None,
    keyfile: Annotated[
        Path | None, typer.Option(help="TLS private key (PEM) for --certfile.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the unsubscribe pages and the RFC 8058 one-click endpoint.

    Mail links are PROSPECT_MAILER_BASE_URL/unsubscribe/TOKEN: publish this server there,
    usually behind an HTTPS reverse proxy.

    GET /healthz answers 200 when the store answers. Ctrl-C or SIGTERM stops it cleanly
    (uvicorn then re-raises the signal, as a server should). Exit 1 if it cannot start.

    Example: prospect-mailer serve --listen 127.0.0.1:8080
    """
    host, port = parse_listen(listen)
    if (certfile is None) != (keyfile is None):
        raise ConfigError("--certfile and --keyfile go together")
    settings = load_settings()
    asgi = create_app(settings)  # checks the signing keys now, not at the first request
    config = uvicorn.Config(
        asgi,
        host=host,
        port=port,
        lifespan="on",
        log_level=log_level,
        proxy_headers=False,  # nothing here depends on the client address
        server_header=False,
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits 3 when the app's startup (opening the store) fails
        server.started = False
    if not server.started:
        console.print("[bold red]error:[/] the unsubscribe server did not start (see above)")
        raise typer.Exit(EXIT_BLOCKED)
