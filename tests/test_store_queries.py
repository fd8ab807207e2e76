"""The store's statements are written once and rendered per database (``store.dialect``):
these check the rendering itself, without a database; ``test_store.py`` runs them."""

from __future__ import annotations

import pytest

from voice_trio.store import queries
from voice_trio.store.dialect import render
from voice_trio.store.postgres import POSTGRES
from voice_trio.store.records import CallQuery
from voice_trio.store.sqlite import SQLITE

TEMPLATES = {
    name: value
    for name, value in vars(queries).items()
    if name.isupper() and isinstance(value, str) and name != "LIST_ORDER"
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_statement_renders_in_both_dialects(name: str) -> None:
    sqlite, postgres = render(TEMPLATES[name], SQLITE), render(TEMPLATES[name], POSTGRES)
    for text in (sqlite, postgres):
        assert "{" not in text and "}" not in text
    assert "%(" not in sqlite and "now()" not in sqlite
    assert ":now" not in postgres


def test_the_clock_and_spans_are_each_databases_own() -> None:
    assert render(queries.FORGET_EVENTS, SQLITE) == (
        "DELETE FROM webhook_events WHERE seen_at < :now - :event_ttl"
    )
    assert render(queries.FORGET_EVENTS, POSTGRES) == (
        "DELETE FROM webhook_events WHERE seen_at < now() - make_interval(secs => %(event_ttl)s)"
    )
    assert set(SQLITE.clock()) == {"now"} and POSTGRES.clock() == {}


def test_an_unknown_slot_format_is_refused() -> None:
    with pytest.raises(ValueError, match="minutes"):
        render("SELECT {x:minutes}", SQLITE)


def test_list_filters_appear_only_when_set_and_in_order() -> None:
    bare = CallQuery(limit=20, after=None, since=None, until=None, status=None, phone=None)
    template, params = queries.list_calls(bare, SQLITE)
    assert " WHERE " not in template and params["limit"] == 21
    full = CallQuery(
        limit=5, after=(10.5, "v3:x"), since=1.0, until=99.0, status="ended", phone="+57"
    )
    template, params = queries.list_calls(full, POSTGRES)
    where = template.split(" WHERE ", 1)[1].split(" ORDER BY ")[0].split(" AND ")
    assert [w.split()[0] for w in where] == [
        "(created_at,",
        "created_at",
        "created_at",
        "status",
        "(from_number",
    ]
    assert where[1].startswith("created_at >=") and where[2].startswith("created_at <")
    assert params["after_created_at"].timestamp() == 10.5 and params["since"].timestamp() == 1.0
