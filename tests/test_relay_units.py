"""The relay's pure parts and its edges: reply mapping, passwords, settings, DKIM, CLI, SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from relay_fixtures import (
    CAMPAIGN,
    MARIE,
    MakeRelayEnv,
    professional,
    relay_message,
    smtp_exchange,
    wire,
)
from smtp_fixtures import SMTPTestServer

from prospect_mailer.campaigns import load_relay_campaign, parse_campaign_ref
from prospect_mailer.cli import main
from prospect_mailer.config import load_settings
from prospect_mailer.errors import ConfigError
from prospect_mailer.models import Outcome
from prospect_mailer.relay import RelaySession
from prospect_mailer.relay_config import RelaySettings, hash_password, verify_password
from prospect_mailer.relay_handler import bare_line_break
from prospect_mailer.relay_replies import RecipientResult, message_reply, recipient_result
from prospect_mailer.relay_workers import bind_listeners, event_loop_factory
from prospect_mailer.store import Store
from prospect_mailer.transport import SMTPTransport

EXAMPLES = Path(__file__).parent.parent / "examples"


def outcome(status: str, **kw: object) -> Outcome:
    return Outcome(email="a@b.example", status=status, **kw)  # type: ignore[arg-type]


def test_outcomes_map_to_replies() -> None:
    r = recipient_result
    assert r("a", outcome("sent")).reply.startswith("250 2.0.0")
    assert r("a", outcome("duplicate")).kind == "duplicate"
    assert r("a", outcome("allowed")).reply.startswith("250 2.1.5")
    blocked = r("a", outcome("blocked", rule_ids=("SUPP_CHECK_AT_SEND",), detail="x\ny"))
    assert blocked.reply == "550 5.7.1 SUPP_CHECK_AT_SEND: x y"
    assert r("a", outcome("deferred", detail="down")).reply == "451 4.3.0 down"
    store_down = r("a", outcome("failed", rule_ids=("SUPP_CHECK_AT_SEND",), detail="store"))
    assert store_down.kind == "temporary"  # fail closed, but the client keeps the message
    refused = r("a", outcome("failed", smtp_code=552, smtp_reply="5.3.4 too big"))
    assert refused.reply == "552 5.3.4 too big"
    assert r("a", outcome("failed", smtp_code=550, smtp_reply="no")).reply == "550 5.0.0 no"
    composed = r("a", outcome("failed", detail="message could not be composed: bad"))
    assert composed.reply.startswith("554 5.6.0")


def test_message_reply_aggregates() -> None:
    ok = RecipientResult("a", "delivered", "250 2.0.0 delivered")
    dup = RecipientResult("b", "duplicate", "250 2.0.0 again")
    blocked = RecipientResult("c", "blocked", "550 5.7.1 R", ("R",))
    temp = RecipientResult("d", "temporary", "451 4.3.0 upstream down")
    assert message_reply([ok, blocked, temp]) == ("451 4.3.0 upstream down", [])
    assert message_reply([ok, dup]) == ("250 2.0.0 2 delivered (1 by an earlier attempt)", [])
    reply, dsn = message_reply([ok, blocked])
    assert reply.startswith("250 2.0.0")
    assert dsn == [blocked]
    assert message_reply([blocked]) == ("550 5.7.1 R", [])
    reply, dsn = message_reply([blocked, blocked])
    assert reply.startswith("550 5.7.1 every recipient blocked")
    assert dsn == []


def test_bare_line_breaks() -> None:
    assert bare_line_break(b"a\r\nb\r\n") is None
    assert bare_line_break(b"a\r\nb\n") == 4
    assert bare_line_break(b"a\rb\r\n") == 1
    assert bare_line_break(b"a\r\r\n") == 1


def test_password_hash_round_trip_and_refusals() -> None:
    stored = hash_password("s3cret")
    assert stored.startswith("scrypt$")
    assert "s3cret" not in stored
    assert verify_password(b"s3cret", stored)
    assert not verify_password(b"S3cret", stored)
    assert not verify_password(b"s3cret", "plain:s3cret")
    assert not verify_password(b"s3cret", "scrypt$1$2$3$!!$!!")
    with pytest.raises(ValueError, match="never a password"):
        RelaySettings(users=[{"username": "crm", "password_hash": "s3cret"}])  # type: ignore[list-item]


def test_relay_settings_from_toml_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "prospect-mailer.toml"
    config.write_text(
        '[relay]\nlisten = "0.0.0.0:2526"\nallowed_networks = ["10.0.0.0/8"]\n'
        '[relay.sender_campaigns]\n"CRM@Acme.example" = "spring:2"\n',
        "utf-8",
    )
    monkeypatch.setenv("PROSPECT_MAILER_CONFIG", str(config))
    monkeypatch.setenv("PROSPECT_MAILER_RELAY__MAX_RECIPIENTS", "7")
    s = load_settings()
    assert s.relay.listen == "0.0.0.0:2526"
    assert s.relay.max_recipients == 7
    assert s.relay.sender_campaigns == {"crm@acme.example": "spring:2"}
    assert parse_campaign_ref("spring:2") == ("spring", 2)
    monkeypatch.setenv("PROSPECT_MAILER_RELAY__ALLOWED_NETWORKS", '["not-a-network"]')
    with pytest.raises(ConfigError, match="allowed_networks"):
        load_settings()


def test_campaign_files_without_templates_and_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    relay_only = tmp_path / "relay-only.toml"
    relay_only.write_text(
        'id = "crm-2026"\nstep = 2\npurpose = "prospecting"\nsubject = "Offre"\n'
        'from = "ACME <ventes@acme.example>"\n[advertiser]\nid = "acme"\n',
        "utf-8",
    )
    assert load_relay_campaign(relay_only).from_name == "ACME"
    monkeypatch.setenv("PROSPECT_MAILER_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/db.db")
    monkeypatch.delenv("PROSPECT_MAILER_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["campaigns", "add", str(EXAMPLES / "campaign.toml"), str(relay_only)]) == 0
    assert main(["campaigns", "list"]) == 0
    out = capsys.readouterr().out
    assert "capteurs-printemps-2026" in out
    assert "crm-2026:2" in out
    bad = tmp_path / "bad.toml"
    bad.write_text('id = "x"\npurpose = "spam"\n', "utf-8")
    assert main(["campaigns", "add", str(bad)]) == 2


async def test_dkim_signature_covers_and_over_signs_list_unsubscribe(
    make_relay_env: MakeRelayEnv, smtpd_server: SMTPTestServer
) -> None:
    dkim = pytest.importorskip("dkim", reason="dkimpy not installed (the 'dkim' extra)")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from prospect_mailer.relay_dkim import DKIMSigner, DKIMTransport, signed_headers

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    txt = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    signer = DKIMSigner(pem, selector="s1", domain="acme.example")
    upstream = SMTPTransport(smtpd_server.host, smtpd_server.port, timeout=5)
    env = await make_relay_env(transport=DKIMTransport(upstream, signer))
    ex = await smtp_exchange(env.port, [MARIE], wire(relay_message(MARIE)))
    assert ex.data is not None
    assert ex.data[0] == 250, ex.data
    (data,) = env.received_by(MARIE)
    assert data.startswith(b"DKIM-Signature:")

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s1._domainkey.acme.example."
        return txt

    assert dkim.verify(data, dnsfunc=dns)
    header = data.split(b"\r\n\r\n", 1)[0].split(b"\r\nFrom:", 1)[0]
    covered = signed_headers(header)
    assert covered.count("list-unsubscribe") == 2  # over-signed: a second copy breaks it
    assert covered.count("list-unsubscribe-post") == 2
    # Appending a second List-Unsubscribe in transit invalidates the signature.
    forged = data.replace(b"\r\n\r\n", b"\r\nList-Unsubscribe: <https://evil.example/>\r\n\r\n", 1)
    assert not dkim.verify(forged, dnsfunc=dns)


def this_loop() -> str:
    """``uvloop`` or ``asyncio``: the kind of event loop this test runs on (see conftest)."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def test_event_loop_choice() -> None:
    assert event_loop_factory("asyncio") == ("asyncio", asyncio.new_event_loop)
    name, factory = event_loop_factory("auto")
    loop = factory()
    try:
        assert type(loop).__module__.startswith(name)
    finally:
        loop.close()
    with pytest.raises(ConfigError, match="auto, asyncio or uvloop"):
        event_loop_factory("trio")
    with pytest.raises(ValidationError, match="event_loop"):
        RelaySettings(event_loop="trio")  # type: ignore[arg-type]


def test_missing_uvloop_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    assert event_loop_factory("auto")[0] == "asyncio"
    with pytest.raises(ConfigError, match=r"pip install 'prospect-mailer\[fast\]'"):
        event_loop_factory("uvloop")


async def test_relay_command_serves_and_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    env = os.environ | {
        "PROSPECT_MAILER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/db.db",
        "PROSPECT_MAILER_OUTBOX_DIR": str(tmp_path / "outbox"),
        "PROSPECT_MAILER_SECRET_KEY": "k" * 32,
        "PROSPECT_MAILER_RELAY__CAMPAIGNS_DIR": str(tmp_path / "campaigns"),
        "PROSPECT_MAILER_RELAY__EVENT_LOOP": this_loop(),  # the relay runs on this test's kind
    }
    (tmp_path / "campaigns").mkdir()
    (tmp_path / "campaigns" / "crm.toml").write_text(
        'id = "crm"\npurpose = "prospecting"\nsubject = "Offre"\n'
        'from = "ventes@acme.example"\n[advertiser]\nid = "acme"\n',
        "utf-8",
    )
    env.pop("PROSPECT_MAILER_CONFIG", None)
    code = "from prospect_mailer.cli import main; raise SystemExit(main())"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, "relay", "--listen", "127.0.0.1:0",
        cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert "relay listening on 127.0.0.1:" in line, line
        assert line.rstrip().endswith(f"(event loop: {this_loop()})"), line
        port = int(line.split("127.0.0.1:", 1)[1].split(",", 1)[0])
        # No prospect registered: refused at RCPT, origin unknown.
        ex = await smtp_exchange(port, [MARIE], None)
        assert ex.rcpt[MARIE][0] == 550
        assert "RELAY_UNKNOWN_RECIPIENT" in ex.rcpt[MARIE][1]
        proc.send_signal(signal.SIGTERM)
        rest = (await asyncio.wait_for(proc.stdout.read(), 30)).decode()
        assert await proc.wait() == 0, rest
        assert "relay stopped" in rest
        assert await registered_campaigns(tmp_path) == ["crm"]  # campaigns_dir was registered
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_example_relay_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROSPECT_MAILER_CONFIG", str(EXAMPLES / "relay.toml"))
    relay = load_settings().relay
    assert relay.user("crm") is not None
    assert relay.sender_campaigns["claire.martin@acme-capteurs.example"]
    assert relay.campaigns_dir is None


async def registered_campaigns(folder: Path) -> list[str]:
    async with Store.connect(f"sqlite+aiosqlite:///{folder}/db.db") as store:
        return [c.id for c in await store.campaigns.list()]


async def test_relay_workers_share_the_port_and_stop_together(tmp_path: Path) -> None:
    env = os.environ | {
        "PROSPECT_MAILER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/db.db",
        "PROSPECT_MAILER_OUTBOX_DIR": str(tmp_path / "outbox"),
        "PROSPECT_MAILER_SECRET_KEY": "k" * 32,
        "PROSPECT_MAILER_RELAY__EVENT_LOOP": this_loop(),
    }
    env.pop("PROSPECT_MAILER_CONFIG", None)
    code = "from prospect_mailer.cli import main; raise SystemExit(main())"

    async def start() -> tuple[asyncio.subprocess.Process, int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, "relay", "--listen", "127.0.0.1:0", "--workers", "2",
            cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert proc.stdout is not None
        seen = ""
        while seen.count("listening on") < 3:  # the parent's line, then each worker's
            seen += (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        first = seen.split("relay listening on 127.0.0.1:", 1)[1]
        assert first.split(",", 1)[1].startswith(" 2 worker processes"), seen
        return proc, int(first.split(",", 1)[0]), seen

    async with Store.connect(f"sqlite+aiosqlite:///{tmp_path}/db.db") as store:
        await store.campaigns.upsert(CAMPAIGN)
        await store.prospects.upsert_many(professional(f"p{i}@radium.example") for i in range(12))
    proc, port, seen = await start()
    assert proc.stdout is not None
    try:
        assert "relay worker 0 listening" in seen
        assert "relay worker 1 listening" in seen
        assert seen.count(f"(event loop: {this_loop()})") == 2, seen
        ex = await smtp_exchange(port, [MARIE], None)
        assert ex.rcpt[MARIE][0] == 550  # not registered
        # Twelve messages at once, spread over both workers: each delivered once, one chain.
        sent = await asyncio.gather(
            *(
                smtp_exchange(
                    port,
                    [f"p{i}@radium.example"],
                    wire(relay_message(f"p{i}@radium.example", message_id=f"<w{i}@crm.example>")),
                )
                for i in range(12)
            )
        )
        assert all(ex.data is not None and ex.data[0] == 250 for ex in sent), sent
        proc.send_signal(signal.SIGTERM)
        rest = (await asyncio.wait_for(proc.stdout.read(), 30)).decode()
        assert await proc.wait() == 0, rest
        assert rest.count("stopped: in-flight messages finished") == 2, rest
        assert "relay stopped: every worker finished" in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 12
    async with Store.connect(f"sqlite+aiosqlite:///{tmp_path}/db.db") as store:
        assert (await store.audit.verify()).ok
        assert len(await store.audit.events(status="sent")) == 12

    # A worker that dies on its own takes the relay down loudly (exit 1), not half-staffed.
    proc, port, _ = await start()
    assert proc.stdout is not None
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 2
        os.kill(int(children[0]), signal.SIGKILL)
        rest = (await asyncio.wait_for(proc.stdout.read(), 30)).decode()
        assert await proc.wait() == 1, rest
        assert "exited by itself" in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="only Linux balances SO_REUSEPORT sockets"
)
def test_worker_listeners_spread_connections_and_refuse_a_taken_port() -> None:
    listeners = bind_listeners("127.0.0.1", 0, 2)
    try:
        assert len({id(s) for s in listeners}) == 2  # SO_REUSEPORT: one socket per worker
        port = listeners[0].getsockname()[1]
        assert listeners[1].getsockname()[1] == port
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        accepted = []
        for sock in listeners:
            sock.setblocking(False)
            n = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    sock.accept()[0].close()
                    n += 1
            accepted.append(n)
        for c in clients:
            c.close()
        # Spread by the kernel (all 40 on one socket: odds of 2 in 2^40), none lost.
        assert sum(accepted) == 40
        assert min(accepted) > 0, accepted
        # A second relay on the same port fails, as it does with one worker.
        for count in (1, 2):
            with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
                bind_listeners("127.0.0.1", port, count)
    finally:
        for sock in listeners:
            sock.close()
    with socket.create_server(("127.0.0.1", 0)) as plain:
        taken = plain.getsockname()[1]
        with pytest.raises(ConfigError, match="cannot listen"):
            bind_listeners("127.0.0.1", taken, 2)
    (single,) = bind_listeners("127.0.0.1", 0, 1)
    single.close()


async def test_short_dir_gives_aiosmtpd_the_same_tables(make_relay_env: MakeRelayEnv) -> None:
    """The session and handler list only their command, AUTH and hook methods in ``dir()``
    (aiosmtpd introspects both on every connection); its tables must come out the same."""
    env = await make_relay_env()
    fast = env.relay._make_session()

    class FullHandler(type(env.relay.handler)):  # type: ignore[misc]
        def __dir__(self) -> list[str]:
            return object.__dir__(self)

    class FullSession(RelaySession):
        def __dir__(self) -> list[str]:
            return object.__dir__(self)

    handler = copy.copy(env.relay.handler)
    handler.__class__ = FullHandler
    relay = copy.copy(env.relay)
    relay.handler = handler
    full = FullSession(relay, hostname="relay.test", loop=asyncio.get_running_loop())
    assert sorted(fast._smtp_methods) == sorted(full._smtp_methods)
    assert len(fast._smtp_methods) > 10
    assert sorted(fast._handle_hooks) == sorted(full._handle_hooks)
    assert sorted(fast._handle_hooks) == ["DATA", "MAIL", "RCPT", "exception"]
    auth = {name: impl.is_builtin for name, impl in fast._auth_methods.items()}
    assert auth == {name: impl.is_builtin for name, impl in full._auth_methods.items()}
    assert {"PLAIN", "LOGIN"} <= set(auth)
    assert [name for name, builtin in auth.items() if not builtin] == ["LOGIN", "PLAIN"]


async def test_a_multi_line_reply_leaves_in_one_write(make_relay_env: MakeRelayEnv) -> None:
    """EHLO's lines are held until the last one and written with it (aiosmtpd writes and
    drains each line: six system calls and segments per new session); a one-line reply is
    written at once, and the session goes on as before."""
    env = await make_relay_env()
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    try:
        assert (await reader.readline()).startswith(b"220 ")
        (session,) = env.relay._sessions
        real_write = session._writer.write
        writes: list[bytes] = []

        def counting(data: bytes) -> None:
            writes.append(bytes(data))
            real_write(data)

        session._writer.write = counting  # type: ignore[method-assign]
        writer.write(b"EHLO client.test\r\n")
        lines = [await asyncio.wait_for(reader.readline(), 10)]
        while lines[-1][3:4] == b"-":
            lines.append(await asyncio.wait_for(reader.readline(), 10))
        assert len(lines) >= 4
        assert all(line[:4] == b"250-" for line in lines[:-1])
        assert lines[-1] == b"250 HELP\r\n"
        assert writes == [b"".join(lines)]
        writer.write(b"NOOP\r\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"250 OK\r\n"
        assert writes[1:] == [b"250 OK\r\n"]
        assert session._held == []
    finally:
        writer.write(b"QUIT\r\n")
        await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await writer.wait_closed()
