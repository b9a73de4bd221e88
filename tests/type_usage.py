"""Type-checked usage of the public API, as a user writes it (checked by mypy --strict).

Not a test module: `make typecheck` runs mypy on it, so an API change that breaks typical
user code fails the gate.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from prospect_mailer import (
    Outcome,
    ProspectMailer,
    SendSummary,
    iter_prospects,
    load_campaign,
    load_settings,
)


def on_progress(outcome: Outcome, summary: SendSummary) -> None:
    if outcome.status == "blocked":
        print(outcome.email, ",".join(outcome.rule_ids), summary.total)


async def main(folder: Path) -> int:
    campaign = load_campaign(folder / "campaign.toml")
    settings = load_settings(outbox_dir=folder / "outbox")
    async with await ProspectMailer.from_settings(settings) as mailer:
        first = next(iter_prospects(folder / "prospects.csv"))
        one: Outcome = await mailer.send(first, campaign)
        summary = await mailer.send_many(
            iter_prospects(folder / "prospects.csv"), campaign, progress=on_progress
        )
        async for outcome in mailer.iter_send([first], campaign, force=True):
            print(outcome.status, outcome.message_id)
    return summary.counts["sent"] + (1 if one.status == "sent" else 0)


if __name__ == "__main__":
    asyncio.run(main(Path("examples")))
