"""The runtime's logger binds once per structlog configuration, and follows a new one."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from mesh.loggers import BoundOnce


def _configure(sink: io.StringIO) -> None:
    structlog.configure(
        processors=[structlog.processors.JSONRenderer()],
        logger_factory=structlog.WriteLoggerFactory(sink),
        cache_logger_on_first_use=False,
    )


def test_bound_once_reuses_its_logger_while_the_configuration_holds() -> None:
    """Two events under one configuration: one bound logger, both events written."""
    sink = io.StringIO()
    _configure(sink)
    log = BoundOnce("mesh")
    first = log.get()
    log.info("one", n=1)
    log.info("two", n=2)
    assert log.get() is first
    assert [json.loads(line)["event"] for line in sink.getvalue().splitlines()] == ["one", "two"]


def test_bound_once_follows_a_reconfiguration() -> None:
    """After structlog.configure, events go to the new chain, not the first one bound."""
    old, new = io.StringIO(), io.StringIO()
    _configure(old)
    log = BoundOnce("mesh")
    log.info("before")
    _configure(new)
    log.warning("after", n=3)
    assert [json.loads(line)["event"] for line in old.getvalue().splitlines()] == ["before"]
    assert json.loads(new.getvalue()) == {"event": "after", "n": 3}


def test_bound_once_unconfigured_uses_structlog_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before structlog is configured it pins nothing: the default logger prints."""
    structlog.reset_defaults()
    BoundOnce("mesh").info("plain event")
    out = capsys.readouterr().out
    assert "plain event" in out
