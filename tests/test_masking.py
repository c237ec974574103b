"""Secrets masked by key and scrubbed from other values (mesh/masking.py)."""

from __future__ import annotations

from mesh.masking import masked, scrub, scrub_any, scrub_fields, secret_values


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


BACKSLASHED = r"C:\Users\ada\pw-2024"


def test_escaped_forms_are_scrubbed() -> None:
    """A secret with backslashes and quotes is scrubbed as repr, ascii and JSON write it, and
    escaped twice (the repr of a repr); before, only the raw text was."""
    import json

    secret = BACKSLASHED + "\"'\u00e9\u0001"
    forms = secret_values({"pw": secret}, frozenset({"pw"}))
    for shown in (
        secret,
        repr(secret),
        ascii(secret),
        json.dumps(secret),
        json.dumps(secret, ensure_ascii=False),
        repr(repr(secret)),
        json.dumps(repr(secret)),
        str(KeyError(secret)),
        f"{[secret]!r}",
    ):
        cleaned = scrub(shown, forms)
        assert "pw-2024" not in cleaned, (shown, cleaned)
        assert "***" in cleaned


def test_a_secret_as_a_key_is_scrubbed() -> None:
    """A secret used as a dict key is scrubbed in the context shown and in a log event's
    values and keys; two keys that both scrub to *** keep both values."""
    token = "sess-9f8e7d6c"
    context = {"token": token, "sessions": {token: "ada", "x" + token: "bob"}, token: 1}
    assert masked(context, frozenset({"token"})) == {
        "token": "***",
        "sessions": {"***": "ada", "x***": "bob"},
        "***": 1,
    }
    forms = secret_values(context, frozenset({"token"}))
    event = {"event": "by token", token: "ada", "*** (2)": 0, "nested": [{token: 1}]}
    scrub_fields(event, forms)
    assert event == {"event": "by token", "*** (2)": 0, "nested": [{"***": 1}], "***": "ada"}


def test_numbers_are_scrubbed_by_their_text() -> None:
    """pin:=482913 is the number 482913: under another key, in a list, a tuple, a dict key,
    a float's text or a string, it shows *** as the string "482913" would."""
    context = {
        "pin": 482913,
        "copy": 482913,
        "list": [1, 482913, (482913,)],
        "text": "pin 482913",
        "keyed": {482913: "x"},
        "bigger": 14829130,
        "line_index": 2,
        "flag": True,
    }
    assert masked(context, frozenset({"pin"})) == {
        "pin": "***",
        "copy": "***",
        "list": [1, "***", ("***",)],
        "text": "pin ***",
        "keyed": {"***": "x"},
        "bigger": "1***0",
        "line_index": 2,
        "flag": True,
    }
    forms = secret_values({"pin": "482913"}, frozenset({"pin"}))  # the same value as a string
    assert scrub_any(482913, forms) == "***"
    assert scrub_any(482913.5, forms) == "***.5"
    unrelated = secret_values({"pin": "hunter22"}, frozenset({"pin"}))
    assert not unrelated.numeric  # numbers are not even looked at
    assert scrub_any(482913, unrelated) == 482913


def test_unchanged_values_are_returned_as_they_are() -> None:
    """scrub_any returns the very object when nothing needed scrubbing (the processor's cheap
    test), for containers and numbers too."""
    forms = secret_values({"pin": 482913}, frozenset({"pin"}))
    for value in ({"a": [1, 2]}, [1, "x"], (1, 2), 7, 1.5, "text", None, True):
        assert scrub_any(value, forms) is value
