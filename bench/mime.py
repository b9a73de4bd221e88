"""The MIME step alone: footers into a client's message, CPU µs per call, in one process each.

    python -m bench.mime [--calls 2000] [--sizes 2k,100k] [--shapes alt-8bit,alt-qp,mixed-b64]
                         [--against HEAD]

Baseline: what a script without us does with the standard library, ``policy.default`` parse,
``get_content``/``set_content`` of each text part with the footer appended, the two
List-Unsubscribe headers, and serialisation (``stdlib``). Ours: ``apply_compliance(bytes)``
plus the transport's serialisation (``full``); the relay's path, on the bytes (``bytes``:
:func:`prospect_mailer.rawmime.apply_compliance_bytes`, what the relay runs for plain header
blocks) and its email-package fallback for one recipient (``relay``: ``parse_message(bytes)``,
``parse_message(message)`` in ``send``, ``apply_compliance(message)``, serialisation); and the
steps on their own (``parse_message``, ``check_headers_safe``,
``apply_compliance``). ``--against REF`` also runs ours from a git ref (e.g. ``HEAD``) and shows
each of ours as a ratio to it.

Messages: 2k (text+HTML ~2 KB) or 100k (~100 KB), in three shapes: ``alt-8bit``
(multipart/alternative, UTF-8 8bit, what ``bench.relay`` sends), ``alt-qp`` (the same,
quoted-printable) and ``mixed-b64`` (multipart/mixed: alternative in base64 plus a 30 KB PDF
attachment). Every call gets a different message (boundary, Message-ID, Subject, Date), as on a
real relay, so no cache can answer from a previous call.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import quopri
import random
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from email import policy
from email.header import Header
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime
from pathlib import Path

from .common import ROOT, Result, body_texts, emit, measure_end, measure_start, print_table

URL = "https://optout.acme.example/unsubscribe/" + "t" * 150
MAILTO = "mailto:unsubscribe+abcdefghijklmnopqrstuvwxyz234567@optout.acme.example"
DISTINCT = 200  # messages built per run; calls cycle through them
KINDS = ("stdlib", "bytes", "full", "relay", "parse", "check", "apply")
LABELS = {
    "stdlib": "stdlib default parse+footer+serialise",
    "bytes": "relay: apply_compliance_bytes (rawmime)",
    "full": "apply_compliance(bytes)+serialise",
    "relay": "relay fallback (2 parses, apply, serialise)",
    "parse": "parse_message(bytes)",
    "check": "check_headers_safe",
    "apply": "apply_compliance(bytes)",
}


def _encode(data: bytes, cte: str) -> bytes:
    if cte == "base64":
        return base64.encodebytes(data).replace(b"\n", b"\r\n")
    if cte == "quoted-printable":
        return quopri.encodestring(data).replace(b"\n", b"\r\n")  # hard breaks: CRLF
    return data.replace(b"\n", b"\r\n")


def _leaf(sub: str, body: str, cte: str) -> bytes:
    head = f"Content-Type: text/{sub}; charset=utf-8\r\nContent-Transfer-Encoding: {cte}\r\n\r\n"
    return head.encode() + _encode(body.encode("utf-8"), cte)


def _multipart(sub: str, boundary: str, *parts: bytes) -> bytes:
    out = f'Content-Type: multipart/{sub}; boundary="{boundary}"\r\n\r\n'.encode()
    for part in parts:
        out += f"--{boundary}\r\n".encode() + part.rstrip(b"\r\n") + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def build_message(i: int, size: str, shape: str) -> bytes:
    """Message ``i`` (wire form, CRLF) of a size class and shape; every ``i`` differs."""
    text, html = body_texts(size)
    tag = f"{i}.{random.getrandbits(64):016x}"
    subject = Header(f"Capteurs connectés n°{i}", "utf-8").encode()
    head = (
        "From: ACME Ventes <ventes@acme.example>\r\n"
        f"To: prospect{i}@x.example\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <bench-{tag}@acme.example>\r\n"
        f"Date: {format_datetime(datetime(2026, 1, 1, tzinfo=UTC))}\r\n"
        "MIME-Version: 1.0\r\n"
    ).encode()
    cte = {"alt-8bit": "8bit", "alt-qp": "quoted-printable", "mixed-b64": "base64"}[shape]
    alt = _multipart(
        "alternative", f"=_alt_{tag}", _leaf("plain", text, cte), _leaf("html", html, cte)
    )
    if shape != "mixed-b64":
        return head + alt
    pdf = random.Random(i).randbytes(30 * 1024)
    att = (
        b'Content-Type: application/pdf; name="catalogue.pdf"\r\n'
        b'Content-Disposition: attachment; filename="catalogue.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + _encode(pdf, "base64")
    )
    return head + _multipart("mixed", f"=_mix_{tag}", alt, att)


def stdlib_inject(data: bytes, text_footer: str, html_footer: str) -> bytes:
    """The baseline: the standard library's default policy, used the obvious way."""
    msg = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(msg, EmailMessage)
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in ("text/plain", "text/html") and not part.is_attachment():
            assert isinstance(part, EmailMessage)
            body = part.get_content()
            cte = str(part.get("Content-Transfer-Encoding", "7bit")).lower()
            footer = html_footer if ctype == "text/html" else "\n" + text_footer
            part.set_content(
                body + footer,
                subtype=ctype[5:],
                charset=part.get_content_charset("utf-8"),
                cte="quoted-printable" if cte == "7bit" else cte,
            )
    del msg["List-Unsubscribe"]
    msg["List-Unsubscribe"] = f"<{URL}>, <{MAILTO}>"
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def one(kind: str, size: str, shape: str, calls: int, tag: str) -> Result:
    """Time ``calls`` calls of one configuration in this process."""
    from prospect_mailer.compliance import FooterContext, FooterRenderer, apply_compliance
    from prospect_mailer.mime import check_headers_safe, parse_message

    footers = FooterRenderer().render(
        FooterContext(
            locale="fr",
            advertiser_legal_name="ACME SAS",
            advertiser_postal_address="1 rue de la Paix, 75002 Paris",
            advertiser_contact="dpo@acme.example",
            unsubscribe_url=URL,
            unsubscribe_mailto=MAILTO,
            source_name="Annuaire des entreprises",
            source_type="public",
            collection_method="annuaire",
            collected_at=None,
            first_contact=True,
            campaign_id="bench",
        )
    )
    now = datetime.now(UTC)

    def apply(message: EmailMessage | bytes) -> EmailMessage:
        return apply_compliance(
            message,
            footers,
            list_unsubscribe_url=URL,
            list_unsubscribe_mailto=MAILTO,
            message_id_domain="acme.example",
            now=now,
        )

    def wire(msg: EmailMessage) -> bytes:  # prospect_mailer.transport.wire_bytes
        return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))

    messages = [build_message(i, size, shape) for i in range(DISTINCT)]

    def raw(data: bytes) -> object:
        from prospect_mailer.rawmime import apply_compliance_bytes

        done = apply_compliance_bytes(
            data,
            footers,
            list_unsubscribe_url=URL,
            list_unsubscribe_mailto=MAILTO,
            message_id_domain="acme.example",
            now=now,
        )
        assert done is not None, "the byte level declined a benchmark message"
        return done

    work: dict[str, Callable[[int], object]] = {
        "stdlib": lambda i: stdlib_inject(messages[i], footers.text, footers.html),
        "bytes": lambda i: raw(messages[i]),
        "full": lambda i: wire(apply(messages[i])),
        "relay": lambda i: wire(apply(parse_message(parse_message(messages[i])))),
        "parse": lambda i: parse_message(messages[i]),
        "apply": lambda i: apply(messages[i]),
    }
    if kind == "check":
        parsed = [parse_message(m) for m in messages]
        work["check"] = lambda i: check_headers_safe(parsed[i])
    call = work[kind]
    for i in range(min(20, calls)):  # warm up imports and code paths
        call(i % DISTINCT)
    start = measure_start()
    for i in range(calls):
        call(i % DISTINCT)
    name = f"{tag}{LABELS[kind]} {size} {shape}"
    result = measure_end(name, calls, start)
    if kind != "stdlib" and not tag:
        result.baseline = (
            f"{LABELS['stdlib']} {size} {shape}" if kind in ("bytes", "full", "relay") else None
        )
    return result


def run_child(config: str, args: list[str], old: Path | None) -> Result:
    """One configuration in a fresh interpreter (``old``: import prospect_mailer from there)."""
    env = dict(os.environ)
    cwd = ROOT
    if old is not None:
        # The working directory comes first on sys.path, so the old package wins there.
        cwd, env["PYTHONPATH"] = old, str(ROOT)
    out = subprocess.run(
        [sys.executable, "-m", "bench.mime", "--one", config, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"bench.mime {config} failed:\n{out.stdout}\n{out.stderr}")
    return Result(**json.loads(out.stdout.strip().splitlines()[-1]))


def export_ref(ref: str, into: Path) -> None:
    """Write ``prospect_mailer`` and ``templates`` as of git ``ref`` under ``into``."""
    data = subprocess.run(
        ["git", "archive", "--format=tar", ref, "prospect_mailer", "templates"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    tar_path = into / "ref.tar"
    tar_path.write_bytes(data)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000, help="calls per 2k configuration")
    ap.add_argument("--sizes", default="2k,100k")
    ap.add_argument("--shapes", default="alt-8bit,alt-qp,mixed-b64")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--against", metavar="REF", help="also time ours as of this git ref")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "mime.json")
    a = ap.parse_args()
    if a.one:
        kind, size, shape = a.one.split(":")
        emit(one(kind, size, shape, a.calls, a.tag))
        return
    kinds = [k for k in KINDS if k in a.kinds.split(",")]
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        old = None
        if a.against:
            old = Path(tmp)
            export_ref(a.against, old)
        for size in a.sizes.split(","):
            calls = a.calls if size == "2k" else max(50, a.calls // 10)
            for shape in a.shapes.split(","):
                for kind in kinds:
                    config = f"{kind}:{size}:{shape}"
                    args = ["--calls", str(calls)]
                    if old is not None and kind != "stdlib":
                        ref = run_child(config, [*args, "--tag", f"{a.against} "], old)
                        results.append(ref)
                    mine = run_child(config, args, None)
                    if old is not None and kind != "stdlib":
                        mine.baseline = ref.name
                    results.append(mine)
    print_table(
        "MIME step, one message per call (CPU µs/msg = µs per call; ratio = speed-up)",
        results,
        a.json,
    )


if __name__ == "__main__":
    main()
