"""What a finished flow shows: secrets masked by key and scrubbed from other values."""

from __future__ import annotations

from mesh.result import FlowResult, Step, masked


def test_masked_hides_secret_keys_and_their_values_elsewhere() -> None:
    """A secret's key shows ***, and its value is scrubbed inside other strings, nested too."""
    context = {
        "password": "hunter22",
        "note": "typed hunter22 twice",
        "nested": {"log": ["ok", "again hunter22"]},
        "count": 3,
    }
    assert masked(context, frozenset({"password"})) == {
        "password": "***",
        "note": "typed *** twice",
        "nested": {"log": ["ok", "again ***"]},
        "count": 3,
    }


def test_short_secret_values_are_not_scrubbed_from_text() -> None:
    """Values under 4 characters are masked by key only, so ordinary words survive."""
    assert masked({"pin": "ab", "word": "cabin"}, frozenset({"pin"})) == {
        "pin": "***",
        "word": "cabin",
    }


def test_repr_of_a_result_never_shows_a_secret() -> None:
    """Printing a FlowResult masks its secrets; the context itself keeps them."""
    result = FlowResult(
        "login",
        "f1",
        {"username": "ada", "password": "lovelace"},
        (Step(0, "User ada", "client", 0.0, 0.001),),
        frozenset({"password"}),
    )
    assert "lovelace" not in repr(result)
    assert "'password': '***'" in repr(result)
    assert result.context["password"] == "lovelace"
    assert result.steps[0].ms == 1.0
