"""The structlog processor in one process: inline flows, "next", violations, secrets.

Every flow here runs on one machine, so no peer is needed; what crosses machines
is tested in test_e2e.py with real peer processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

import mesh
from mesh.registry import Registry

FLOWS = """\
Request\tLog\tMachine
local\tStarting for :username with #password\tserver
local\tMiddle step for :username\tserver
local\tComputing total\tserver
local\tFinished with :total\tserver
other\tOther opener\tserver
other\tOther second\tserver
dup\tShared opener\tserver
dup2\tShared opener\tserver
remote\tRemote opener\tclient
remote\tRemote work\tserver
"""

Events = list[dict[str, Any]]


@pytest.fixture
def events() -> Iterator[Events]:
    """structlog routed through the mesh processor, capturing what would be printed."""
    captured: Events = []

    def capture(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        captured.append({**event_dict, "level": method})
        raise structlog.DropEvent

    structlog.configure(
        processors=[
            mesh.processor,
            structlog.contextvars.merge_contextvars,
            mesh.mask_secrets,
            capture,
        ]
    )
    yield captured
    structlog.reset_defaults()


def _connect(tmp_path: Path, reg: Registry, *, strict: bool = True) -> Iterator[mesh.Node]:
    (tmp_path / "flow.tsv").write_text(FLOWS)
    (tmp_path / "mesh.toml").write_text(
        f'flow = "flow.tsv"\nstrict = {str(strict).lower()}\n'
        '[machines]\nserver = "127.0.0.1:1"\nclient = ""\n'
    )
    node = mesh.connect(tmp_path / "mesh.toml", machine="server", registry=reg)
    yield node
    node.close()


@pytest.fixture
def reg() -> Registry:
    r = Registry()

    @r.handler("local", "Computing total")
    def total(ctx: dict[str, Any]) -> None:
        structlog.get_logger().info("next", total=ctx.get("a", 0) + ctx.get("b", 0))

    return r


@pytest.fixture
def node(tmp_path: Path, events: Events, reg: Registry) -> Iterator[mesh.Node]:
    yield from _connect(tmp_path, reg)


def _texts(events: Events) -> list[str]:
    return [e["event"] for e in events]


def test_start_runs_local_lines_and_handlers(node: mesh.Node, events: Events) -> None:
    """node.start emits every line in order, runs the handler, returns context and steps."""
    result = node.start("local", username="ada", password="s3cret!", a=2, b=3)
    assert result.context["total"] == 5
    assert [s.index for s in result.steps] == [0, 1, 2, 3]
    assert _texts(events) == [
        "Starting for ada with ***",
        "Middle step for ada",
        "Computing total",
        "Finished with 5",
    ]
    assert {e["flow_id"] for e in events} == {result.flow_id}
    assert [e["line_index"] for e in events] == [0, 1, 2, 3]


def test_inline_flow_as_in_the_design_notes(node: mesh.Node, events: Events) -> None:
    """Inline code logs lines and "next"; handlers run inside "next"; context is readable."""
    log = structlog.get_logger()
    log.info("Starting for :username with #password", username="ada", password="s3cret!")
    log.info("next", a=1)
    log.info("Middle step for :username")
    log.info("next", b=41)  # runs "Computing total" here, then stops at line 3 (no handler)
    assert mesh.current_context()["total"] == 42
    log.info("Finished with :total")
    log.info("next")
    assert _texts(events) == [
        "Starting for ada with ***",
        "Middle step for ada",
        "Computing total",
        "Finished with 42",
    ]
    assert all("s3cret!" not in repr(e) for e in events)
    assert all(e.get("password", "***") == "***" for e in events)


def test_line_out_of_turn_names_expected_and_actual(node: mesh.Node, events: Events) -> None:
    """Logging line 3 when the flow is at line 1 raises FlowViolation naming both."""
    log = structlog.get_logger()
    log.info("Starting for :username with #password", username="ada", password="pw")
    log.info("next")
    with pytest.raises(mesh.FlowViolation) as err:
        log.info("Finished with :total")
    assert "line 1 'Middle step for :username'" in str(err.value)
    assert "'Finished with :total' was logged" in str(err.value)


def test_non_strict_turns_violations_into_warnings(
    tmp_path: Path, events: Events, reg: Registry
) -> None:
    """With strict = false a line out of turn is a warning event, not an exception."""
    for _node in _connect(tmp_path, reg, strict=False):
        log = structlog.get_logger()
        log.info("Starting for :username with #password", username="ada", password="pw")
        log.info("next")
        log.info("Finished with :total")
        warnings = [e for e in events if e["event"] == "mesh.flow_violation"]
        assert len(warnings) == 1
        assert "Finished with :total" in warnings[0]["problem"]


def test_next_outside_a_flow_is_a_violation(node: mesh.Node, events: Events) -> None:
    """Logging "next" with no active flow raises FlowViolation."""
    with pytest.raises(mesh.FlowViolation, match=r"no flow is active"):
        structlog.get_logger().info("next")


def test_later_line_without_a_flow_is_a_violation(node: mesh.Node, events: Events) -> None:
    """A flow line other than line 0 with no active flow says a flow starts at line 0."""
    with pytest.raises(mesh.FlowViolation, match=r"local line 1.*starts at its line 0"):
        structlog.get_logger().info("Middle step for :username")


def test_text_opening_several_requests_cannot_start_a_flow(node: mesh.Node, events: Events) -> None:
    """A line 0 shared by two requests is ambiguous inline."""
    with pytest.raises(mesh.FlowViolation, match=r"opens several requests \(dup, dup2\)"):
        structlog.get_logger().info("Shared opener")


def test_line_zero_of_another_machine_cannot_start_here(node: mesh.Node, events: Events) -> None:
    """Inline code cannot start a flow whose line 0 belongs to another machine."""
    with pytest.raises(mesh.FlowViolation, match="runs on client, not on server"):
        structlog.get_logger().info("Remote opener")


def test_non_json_value_fails_at_the_call_site(node: mesh.Node, events: Events) -> None:
    """Logging "next" with a value that cannot travel raises ContextError naming the key."""
    log = structlog.get_logger()
    log.info("Starting for :username with #password", username="ada", password="pw")
    with pytest.raises(mesh.ContextError, match="'conn'"):
        log.info("next", conn=object())


def _forgets_next(ctx: dict[str, Any]) -> None:
    structlog.get_logger().info("working")


def _nexts_twice(ctx: dict[str, Any]) -> None:
    log = structlog.get_logger()
    log.info("next", first=True)
    log.info("next", second=True)


@pytest.mark.parametrize(
    ("handler", "problem"),
    [
        (_forgets_next, "returned without logging"),
        (_nexts_twice, '"next" logged twice for other line 0'),
    ],
)
def test_handler_breaking_the_next_rule_is_a_violation(
    tmp_path: Path, events: Events, reg: Registry, handler: Any, problem: str
) -> None:
    """A handler that returns without "next", or logs it twice, fails the flow, naming
    its line."""
    reg.handler("other", "Other opener")(handler)

    for node in _connect(tmp_path, reg):
        with pytest.raises(mesh.FlowViolation) as err:
            node.start("other")
        assert isinstance(err.value, mesh.FlowError)
        assert err.value.line_index == 0
        assert err.value.line == "Other opener"
        assert problem in str(err.value)


def test_handler_logs_its_following_line_inline(
    tmp_path: Path, events: Events, reg: Registry
) -> None:
    """A handler may log "next" and then the following local line itself."""

    @reg.handler("other", "Other opener")
    def both(ctx: dict[str, Any]) -> None:
        log = structlog.get_logger()
        log.info("next", first=True)
        log.info("Other second", second=True)
        log.info("next")

    for node in _connect(tmp_path, reg):
        result = node.start("other")
    assert result.context == {"first": True, "second": True}
    assert [s.index for s in result.steps] == [0, 1]
    assert _texts(events) == ["Other opener", "Other second"]


def test_handler_error_scrubs_secret_values(tmp_path: Path, events: Events, reg: Registry) -> None:
    """An exception message carrying a secret reaches the caller and the log masked."""

    @reg.handler("local", "Middle step for :username")
    def leaky(ctx: dict[str, Any]) -> None:
        raise ValueError(f"bad password {ctx['password']}")

    for node in _connect(tmp_path, reg):
        with pytest.raises(mesh.FlowError) as err:
            node.start("local", username="ada", password="hunter22")
    assert "hunter22" not in str(err.value)
    assert "bad password ***" in str(err.value)
    assert err.value.error_type == "ValueError"
    assert all("hunter22" not in repr(e) for e in events)


def test_secret_inside_containers_and_objects_is_scrubbed(
    tmp_path: Path, events: Events, reg: Registry
) -> None:
    """A secret value inside a list, dict, tuple or an object's repr is masked in the event."""

    class Holder:
        def __init__(self, value: str) -> None:
            self.value = value

        def __repr__(self) -> str:
            return f"Holder({self.value})"

    @reg.handler("local", "Middle step for :username")
    def leaky(ctx: dict[str, Any]) -> None:
        pw = ctx["password"]
        structlog.get_logger().info(
            "leak", items=[pw, {"deep": pw}], pair=(1, pw), obj=Holder(pw), n=3
        )
        structlog.get_logger().info("next")

    for node in _connect(tmp_path, reg):
        node.start("local", username="ada", password="hunter22")
    [leak] = [e for e in events if e["event"] == "leak"]
    assert leak["items"] == ["***", {"deep": "***"}]
    assert leak["pair"] == (1, "***")
    assert leak["obj"] == "Holder(***)"
    assert leak["n"] == 3
    assert all("hunter22" not in repr(e) for e in events)


def test_non_flow_events_pass_untouched(node: mesh.Node, events: Events) -> None:
    """An ordinary event goes through unchanged, with no flow fields."""
    structlog.get_logger().info("hello", x=1)
    assert events == [{"event": "hello", "x": 1, "level": "info"}]


def test_concurrent_starts_do_not_share_context(node: mesh.Node, events: Events) -> None:
    """Flows started from many threads at once keep their own context."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> int:
        return int(node.start("local", username=f"u{i}", password="pw", a=i, b=i).context["total"])

    with ThreadPoolExecutor(16) as pool:
        totals = list(pool.map(one, range(200)))
    assert totals == [2 * i for i in range(200)]


def test_connect_refuses_a_chain_without_the_processor(tmp_path: Path, reg: Registry) -> None:
    """structlog configured without mesh.processor is an error at connect, not silence."""
    structlog.configure(processors=[structlog.processors.JSONRenderer()])
    try:
        with pytest.raises(mesh.ConfigError, match=r"without mesh\.processor"):
            list(_connect(tmp_path, reg))
    finally:
        structlog.reset_defaults()


def test_debug_next_works_below_the_output_level(
    tmp_path: Path, reg: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    """configure_logging(level="warning") still routes log.debug("next")."""

    @reg.handler("other", "Other opener")
    def quiet(ctx: dict[str, Any]) -> None:
        structlog.get_logger().debug("next", quiet=True)

    mesh.configure_logging(level="warning")
    try:
        for node in _connect(tmp_path, reg):
            assert node.start("other").context == {"quiet": True}
    finally:
        structlog.reset_defaults()
    assert "Other opener" not in capsys.readouterr().out


def test_handler_cannot_log_a_line_that_has_its_own_handler(
    tmp_path: Path, events: Events, reg: Registry
) -> None:
    """A handler logging the next line, which has a handler of its own, is refused."""

    @reg.handler("local", "Middle step for :username")
    def eager(ctx: dict[str, Any]) -> None:
        log = structlog.get_logger()
        log.info("next")
        log.info("Computing total")

    for node in _connect(tmp_path, reg):
        with pytest.raises(mesh.FlowViolation, match=r"has its own handler, .*total"):
            node.start("local", username="ada", password="pw")


def test_handler_cannot_log_a_line_of_another_machine(
    tmp_path: Path, events: Events, reg: Registry
) -> None:
    """A handler logging a following line owned elsewhere is told where it runs."""

    @reg.handler("remote", "Remote opener")
    def reach(ctx: dict[str, Any]) -> None:
        log = structlog.get_logger()
        log.info("next")
        log.info("Remote work")

    (tmp_path / "flow.tsv").write_text(FLOWS)
    (tmp_path / "mesh.toml").write_text(
        'flow = "flow.tsv"\n[machines]\nserver = "127.0.0.1:1"\nclient = ""\n'
    )
    node = mesh.connect(tmp_path / "mesh.toml", machine="client", registry=reg)
    try:
        with pytest.raises(mesh.FlowViolation, match=r"runs on server, not client"):
            node.start("remote")
    finally:
        node.close()


def test_connect_refuses_the_processor_after_merge_contextvars(
    tmp_path: Path, reg: Registry
) -> None:
    """mesh.processor after merge_contextvars would copy context variables into flows."""
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, mesh.processor])
    try:
        with pytest.raises(mesh.ConfigError, match=r"put mesh\.processor first"):
            list(_connect(tmp_path, reg))
    finally:
        structlog.reset_defaults()


def test_local_lines_stop_at_the_deadline(tmp_path: Path, events: Events, reg: Registry) -> None:
    """A slow local handler is not killed, but the flow times out before its next line."""
    import time

    @reg.handler("local", "Middle step for :username")
    def slow(ctx: dict[str, Any]) -> None:
        time.sleep(0.3)
        structlog.get_logger().info("next")

    for node in _connect(tmp_path, reg):
        with pytest.raises(mesh.FlowTimeout, match=r"before line 2 'Computing total'") as err:
            node.start("local", username="ada", password="pw", timeout=0.1)
    assert err.value.machine == "server"
    assert err.value.line_index == 2
    assert "Computing total" not in _texts(events)


def test_inline_flow_ending_without_a_last_next_is_complete(
    node: mesh.Node, events: Events
) -> None:
    """Logging the last line and then a new flow's line 0 is no abandoned flow."""
    log = structlog.get_logger()
    log.info("Other opener")
    log.info("next")
    log.info("Other second")  # the last line; no "next" after it
    log.info("Other opener")
    assert [e for e in events if e["event"] == "mesh.flow_abandoned"] == []
    log.info("Starting for :username with #password", username="ada", password="pw")
    abandoned = [e for e in events if e["event"] == "mesh.flow_abandoned"]
    assert len(abandoned) == 1
    assert abandoned[0]["request"] == "other"
