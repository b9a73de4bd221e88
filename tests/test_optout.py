"""OptOutService: the one path every objection takes."""

from __future__ import annotations

import re

from factories import CAMPAIGN, KEY, b2b
from test_mailer import make_mailer

from prospect_mailer.optout import OptOutService
from prospect_mailer.store import Store
from prospect_mailer.tokens import TokenSigner
from prospect_mailer.transport import MemoryTransport


def mailto_token(transport: MemoryTransport, index: int) -> str:
    header = str(transport.sent[index].message["List-Unsubscribe"])
    m = re.search(r"mailto:unsubscribe\+([a-z2-7]+)@", header)
    assert m, header
    return m.group(1)


async def test_mailto_of_an_earlier_send_still_works_after_a_forced_resend(db: Store) -> None:
    """Regression: a forced resend took the claim over and orphaned the first mail's token."""
    transport = MemoryTransport()
    mailer = make_mailer(db, transport)
    first = await mailer.send(b2b("a@x.example"), CAMPAIGN)
    second = await mailer.send(b2b("a@x.example"), CAMPAIGN, force=True)
    assert (first.status, second.status) == ("sent", "sent")
    optout = OptOutService(db, TokenSigner([KEY]))
    result = await optout.from_short_token(mailto_token(transport, 0), channel="mailto")
    assert result.recipient_hash == b2b("a@x.example").address.key_hash
    assert result.send_id == first.send_id
    again = await mailer.send(b2b("a@x.example"), CAMPAIGN, force=True)
    await mailer.close()
    assert again.status == "blocked"
    assert again.rule_ids == ("SUPP_CHECK_AT_SEND",)
