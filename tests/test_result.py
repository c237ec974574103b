"""What a finished flow shows: its repr masks secrets (masking itself: test_masking.py)."""

from __future__ import annotations

from mesh.result import FlowResult, Step


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
