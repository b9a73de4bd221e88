"""FooterRenderer reuses a rendering for contexts that differ only by their links.

Every result must equal a fresh rendering of the same templates (a renderer with the cache
bypassed); templates that use a link other than verbatim, or include others, are rendered
each time.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from factories import footer_context
from hypothesis import given, settings
from hypothesis import strategies as st

from prospect_mailer import compliance
from prospect_mailer.compliance import FooterContext, FooterRenderer, build_list_unsubscribe
from prospect_mailer.errors import ConfigError, InvalidMessageError

BASE = footer_context(source_name="Salon Pro Events", source_type="partner")


def fresh(renderer: FooterRenderer, ctx: FooterContext) -> tuple[str, str]:
    """The rendering without any cache."""
    names = (f"footer.{ctx.locale}.txt.j2", f"footer.{ctx.locale}.html.j2")
    return renderer._render(names, renderer.template_context(ctx))


token = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.", min_size=1)


@settings(max_examples=60, deadline=None)
@given(
    tok=token,
    short=token,
    mailto=st.booleans(),
    first=st.booleans(),
    locale=st.sampled_from(["fr", "en"]),
    amp=st.booleans(),
)
def test_cached_footers_equal_fresh_ones(
    tok: str, short: str, mailto: bool, first: bool, locale: str, amp: bool
) -> None:
    renderer = FooterRenderer()
    query = "?a=1&b=2" if amp else ""  # escaped differently in HTML: must be swapped escaped
    for i in range(3):  # the first fills the cache, the next ones use it
        ctx = replace(
            BASE,
            locale=locale,  # type: ignore[arg-type]
            unsubscribe_url=f"https://unsub.example.com/u/{tok}{i}{query}",
            unsubscribe_mailto=f"mailto:unsubscribe+{short}{i}@example.com" if mailto else None,
            first_contact=first,
        )
        got = renderer.render(ctx)
        assert (got.text, got.html) == fresh(renderer, ctx)
    assert len(renderer._footers) == 1


def test_values_the_templates_read_are_part_of_the_key() -> None:
    renderer = FooterRenderer()
    a = renderer.render(BASE)
    b = renderer.render(replace(BASE, source_name="Autre Salon"))
    assert "Salon Pro Events" in a.text
    assert "Autre Salon" in b.text
    assert "Salon Pro Events" not in b.text
    # A value no shipped template reads (the recipient's name) shares the rendering.
    renderer.render(replace(BASE, recipient_name="Zoé"))
    assert len(renderer._footers) == 2


def write(folder: Path, locale: str, text: str, html: str) -> None:
    (folder / f"footer.{locale}.txt.j2").write_text(text, encoding="utf-8")
    (folder / f"footer.{locale}.html.j2").write_text(html, encoding="utf-8")


HTML = (
    '<div class="prospect-mailer-footer"><p class="pm-origin">o</p>'
    '<p class="pm-objection">x</p><p class="pm-optout">{{ advertiser_legal_name }} '
    '<a href="{{ unsubscribe_url }}">stop</a></p></div>'
)


@pytest.mark.parametrize(
    "text",
    [
        # reads the link's length: not verbatim, so never served from the cache
        "-- \n{{ advertiser_legal_name }} {{ unsubscribe_url }} ({{ unsubscribe_url|length }})",
        # a test on the link
        "-- \n{{ advertiser_legal_name }} {{ unsubscribe_url }}"
        "{% if 'AAAA' in unsubscribe_url %} A{% endif %}",
    ],
)
def test_templates_using_links_otherwise_are_rendered_each_time(tmp_path: Path, text: str) -> None:
    write(tmp_path, "fr", text, HTML)
    renderer = FooterRenderer([tmp_path])
    for url in ("https://u.example/AAAA", "https://u.example/bbbbbbbbbbbb"):
        ctx = replace(BASE, unsubscribe_url=url)
        got = renderer.render(ctx)
        assert (got.text, got.html) == fresh(renderer, ctx)
    assert set(renderer._footers.values()) == {False}


def test_templates_that_include_others_are_not_cached(tmp_path: Path) -> None:
    (tmp_path / "part.j2").write_text("{{ recipient_name }}", encoding="utf-8")
    write(
        tmp_path,
        "fr",
        "-- \n{{ advertiser_legal_name }} {{ unsubscribe_url }} {% include 'part.j2' %}",
        HTML,
    )
    renderer = FooterRenderer([tmp_path])
    assert renderer.render(replace(BASE, recipient_name="Ann")).text.endswith("Ann")
    assert renderer.render(replace(BASE, recipient_name="Bob")).text.endswith("Bob")
    assert renderer._footers == {}


# --- the footer path's shortcuts give what the long way gives ------------------------------------


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_oneline_shortcut_is_the_line_by_line_collapse(value: str) -> None:
    lines = [" ".join(line.split()) for line in value.splitlines()]
    assert compliance._oneline(value) == " ".join(line for line in lines if line)
    assert compliance._oneline(value, sep=", ") == ", ".join(line for line in lines if line)


@settings(max_examples=1000, deadline=None)
@given(st.text("abc.-_:@[]/?#%0123456789", max_size=30))
def test_host_check_is_urlsplits(rest: str) -> None:
    """The unsubscribe URL is refused exactly when urlsplit finds no host in it (or raises)."""
    url = "https://" + rest
    try:
        expected: bool | type[Exception] = bool(urlsplit(url).hostname)
    except ValueError:
        expected = ValueError
    try:
        build_list_unsubscribe(url, None)
        got: bool | type[Exception] = True
    except InvalidMessageError:
        got = False
    except ValueError:
        got = ValueError
    assert got == expected


@pytest.mark.parametrize(
    ("which", "text", "html", "what"),
    [
        ("txt", lambda t: t.replace("-- \n", "--\n", 1), None, "start with a '-- ' line"),
        ("txt", lambda t: t.replace(BASE.unsubscribe_url, "x"), None, "show the unsubscribe URL"),
        ("html", None, lambda h: h.replace('href="', 'data-x="'), "link the unsubscribe URL"),
        ("html", None, lambda h: h.replace('class="', 'klass="', 1), "have an element of class"),
    ],
)
def test_each_missing_footer_element_is_named(which: str, text: Any, html: Any, what: str) -> None:
    footers = FooterRenderer().render(BASE)
    names = (f"footer.{BASE.locale}.txt.j2", f"footer.{BASE.locale}.html.j2")
    compliance._verify_footers(footers.text, footers.html, BASE, names)  # as rendered: fine
    broken_text = text(footers.text) if text else footers.text
    broken_html = html(footers.html) if html else footers.html
    with pytest.raises(ConfigError, match=rf"footer\.{BASE.locale}\.{which}\.j2.* must {what}"):
        compliance._verify_footers(broken_text, broken_html, BASE, names)
