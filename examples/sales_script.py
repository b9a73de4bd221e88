"""A sales script using prospect-mailer directly.

Run from the repository root:  .venv/bin/python examples/sales_script.py

With no configuration it writes messages to ./outbox and keeps the audit log, the suppression
list and the send claims in ./prospect-mailer.db. Set PROSPECT_MAILER_SMTP_URL and
PROSPECT_MAILER_BASE_URL to send for real. Running it twice sends nothing twice.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from prospect_mailer import Outcome, ProspectMailer, SendSummary, iter_prospects, load_campaign

HERE = Path(__file__).parent


def show(outcome: Outcome, summary: SendSummary) -> None:
    why = ", ".join(outcome.rule_ids) or outcome.smtp_reply or outcome.detail
    print(f"{summary.total:3}  {outcome.status:9}  {outcome.email:45}  {why}")


async def main() -> None:
    campaign = load_campaign(HERE / "campaign.toml")
    async with await ProspectMailer.from_settings() as mailer:
        summary = await mailer.send_many(
            iter_prospects(HERE / "prospects.csv"), campaign, progress=show
        )
    print(dict(summary.counts))
    for rule, count in summary.blocked_by_rule.most_common():
        print(f"  blocked by {rule}: {count}")


if __name__ == "__main__":
    asyncio.run(main())
