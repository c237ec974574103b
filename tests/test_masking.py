"""Secrets masked by key and scrubbed from other values (mesh/masking.py)."""

from __future__ import annotations

from mesh.masking import masked


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
