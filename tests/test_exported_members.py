"""The public API is explicit: every public name of every module is exported (httpx habit)."""

from __future__ import annotations

import prospect_mailer


def test_all_names_exist() -> None:
    for name in prospect_mailer.__all__:
        assert hasattr(prospect_mailer, name), name


def test_no_public_name_missing_from_all() -> None:
    public = {
        name
        for name, value in vars(prospect_mailer).items()
        if not name.startswith("_")
        and getattr(value, "__module__", "").startswith("prospect_mailer")
    }
    missing = public - set(prospect_mailer.__all__)
    assert not missing, f"public names not in __all__: {sorted(missing)}"
