"""The campaign registry of the SMTP relay: campaign TOML files registered in the store.

The relay binds each message to a *registered* campaign (``X-Prospect-Campaign`` header, or at
``MAIL FROM`` by sender address or AUTH user), so it can check every rule before delivering. A
campaign is named by a reference: ``spring-2026`` (step 1) or ``spring-2026:2`` (a follow-up).

Relay campaign files are the library's campaign files (:func:`~prospect_mailer.files.
load_campaign`) except that the templates may be left out: the SMTP client brings the message.
"""

from __future__ import annotations

import tomllib
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import DataFileError
from .files import load_campaign
from .models import Campaign
from .store import Store

__all__ = [
    "RELAY_BODY_PLACEHOLDER",
    "campaign_ref",
    "load_campaign_dir",
    "load_relay_campaign",
    "parse_campaign_ref",
    "register_campaigns",
]

#: Stands in for the templates of a relay-only campaign (the model requires a body source);
#: never rendered, since the relay sends the client's own message.
RELAY_BODY_PLACEHOLDER = "{# relay campaign: the SMTP client supplies the message #}"


def parse_campaign_ref(ref: str) -> tuple[str, int]:
    """``"spring"`` -> ``("spring", 1)``; ``"spring:2"`` -> ``("spring", 2)``.

    Raises:
        ValueError: an empty id or a step that is not a positive integer.
    """
    cid, sep, step = ref.strip().partition(":")
    if not cid or (sep and (not step.isdigit() or int(step) < 1)):
        raise ValueError(f"campaign reference must be 'id' or 'id:step', not {ref!r}")
    return cid, int(step) if sep else 1


def campaign_ref(campaign: Campaign) -> str:
    """The reference naming ``campaign`` (``id``, or ``id:step`` after the first step)."""
    return campaign.id if campaign.step == 1 else f"{campaign.id}:{campaign.step}"


def load_relay_campaign(path: str | Path) -> Campaign:
    """Read a campaign TOML file for the relay (templates optional).

    Raises:
        DataFileError: as :func:`~prospect_mailer.files.load_campaign`, naming the key.
    """
    p = Path(path)
    try:
        data: dict[str, Any] = tomllib.loads(p.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return load_campaign(p)  # reports the problem in the library's words
    if data.get("text_template") or data.get("html_template"):
        return load_campaign(p)
    # No template: validate the same fields with the placeholder body (the library's loader
    # insists on template files, which a relay campaign does not have).
    if "from" in data:
        name, addr = parseaddr(str(data.pop("from")))
        data.setdefault("from_address", addr or "")
        if name:
            data.setdefault("from_name", name)
    data["text_template"] = RELAY_BODY_PLACEHOLDER
    try:
        return Campaign.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "-"
        raise DataFileError(err["msg"], path=str(path), column=loc) from exc


def load_campaign_dir(directory: Path) -> list[Campaign]:
    """Load every ``*.toml`` campaign file of ``directory`` (sorted by name).

    Raises:
        DataFileError: the folder is missing, or a file is invalid (naming it and the key).
    """
    if not directory.is_dir():
        raise DataFileError("campaigns_dir is not a folder", path=str(directory))
    return [load_relay_campaign(p) for p in sorted(directory.glob("*.toml"))]


async def register_campaigns(store: Store, campaigns: list[Campaign]) -> None:
    """Register ``campaigns`` (each replaces any with the same id and step).

    Load them all first (:func:`load_relay_campaign`), so that a bad file changes nothing.

    Raises:
        StoreError: the database failed.
    """
    for campaign in campaigns:
        await store.campaigns.upsert(campaign)
