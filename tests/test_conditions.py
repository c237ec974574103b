"""The When/Each columns and the @REQUEST form of a flow file: the grammar, table by table,
and a property: any file with the new columns loads or fails naming PATH:ROW:."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.control import CHECKOUT_FLOW

from mesh.conditions import ConditionError, parse_condition, parse_each
from mesh.errors import FlowFileError
from mesh.flowfile import load_flows, parse_flows

CHECKOUT = CHECKOUT_FLOW

HOLDS: list[tuple[str, dict[str, Any], bool]] = [
    ("verified", {"verified": True}, True),
    ("verified", {"verified": 0}, False),
    ("verified", {}, False),
    ("not verified", {}, True),
    ("not verified", {"verified": "yes"}, False),
    ('status == "paid"', {"status": "paid"}, True),
    ('status == "paid"', {"status": "PAID"}, False),
    ('status == "paid"', {}, False),
    ('status != "paid"', {}, True),
    ("n == 1", {"n": 1.0}, True),
    ("n == 1", {"n": True}, False),
    ("flag == true", {"flag": 1}, False),
    ("flag == true", {"flag": True}, True),
    ("x == null", {"x": None}, True),
    ("x == null", {}, False),
    ("x != null", {}, True),
    ("n < 5", {"n": 4}, True),
    ("n < 5", {"n": 5}, False),
    ("n <= 5", {"n": 5}, True),
    ("n > -1.5", {"n": -1}, True),
    ("n >= 1e3", {"n": 1000}, True),
    ("n < 5", {"n": "4"}, False),
    ("n < 5", {"n": False}, False),
    ("n < 5", {}, False),
    ('c in ["x", 2, null]', {"c": 2}, True),
    ('c in ["x", 2, null]', {"c": None}, True),
    ('c in ["x", 2, null]', {"c": "y"}, False),
    ('c in ["x"]', {}, False),
    ("a and b or c", {"c": 1}, True),
    ("a and b or c", {"a": 1}, False),
    ("a or b and c", {"a": 1}, True),
    ("a or b and c", {"b": 1}, False),
    ("not a and not b", {}, True),
    ('s == "say \\"hi\\""', {"s": 'say "hi"'}, True),
]


@pytest.mark.parametrize(("text", "context", "expected"), HOLDS)
def test_condition_holds(text: str, context: dict[str, Any], expected: bool) -> None:
    assert parse_condition(text).holds(context) is expected


MALFORMED = [
    "",
    "a ==",
    'a < "x"',
    "a < true",
    "and",
    "a b",
    "a in [1",
    "a in []",
    "a in 1",
    "(a)",
    "a = 1",
    "not",
    "not not a",
    "a == 1 and",
    "a == b",
    "a == 'x'",
    "a == 01",
    "a.b == 1",
    "__import__('os')",
    "true",
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_condition(text: str) -> None:
    with pytest.raises(ConditionError):
        parse_condition(text)


def test_each_cells() -> None:
    assert parse_each("items").key == "items"
    assert parse_each("items").results == "items_results"
    assert parse_each("items as reserved").results == "reserved"
    for bad in ["", "items as", "items reserved", "a as b as c", "1x", "items as index"]:
        with pytest.raises(ConditionError):
            parse_each(bad)


def test_the_example_loads() -> None:
    flows = parse_flows(CHECKOUT, "shop.tsv")
    lines = flows["checkout"].lines
    assert [str(ln.when) if ln.when else "" for ln in lines] == [
        "",
        "",
        "",
        "charged",
        "not charged",
    ]
    assert lines[1].each is not None and lines[1].each.results == "items_results"
    assert lines[3].sub == "receipt"
    assert flows["checkout"].controlled
    assert flows["checkout"].calls == ("receipt",)
    assert not flows["receipt"].controlled


def test_columns_any_case_any_order() -> None:
    a = parse_flows("request,log,machine,EACH,when\nr,x,m,items,ok\n")
    b = parse_flows("Request,Log,Machine,When,Each\nr,x,m,ok,items\n")
    assert a["r"].lines[0].when == b["r"].lines[0].when
    assert a["r"].lines[0].each == b["r"].lines[0].each
    assert a["r"].digest == b["r"].digest


def test_digest_counts_conditions_and_not_plain_files() -> None:
    plain = parse_flows("r,x,m\nr,y,n\n")
    with_header = parse_flows("Request,Log,Machine,When\nr,x,m\nr,y,n\n")
    assert plain["r"].digest == with_header["r"].digest
    conditional = parse_flows("Request,Log,Machine,When\nr,x,m\nr,y,n,ok\n")
    assert conditional["r"].digest != plain["r"].digest


@pytest.mark.parametrize(
    ("content", "row", "words"),
    [
        ("r,x,m,ok\n", 1, "need a header row"),
        ("Request,Log,Machine,Where\nr,x,m\n", 1, "unknown column 'Where'"),
        ("Request,Log,Machine,When,when\nr,x,m\n", 1, "named twice"),
        ("Request,Log,Machine,When\nr,x,m,ok,more\n", 2, "expected 3 to 4 columns"),
        ("Request,Log,Machine,When\nr,x,m\nr,y,m,a ==\n", 3, "ends too early"),
        ("Request,Log,Machine,Each\nr,x,m,a b\n", 2, "is not KEY"),
        ("Request,Log,Machine\nr,x,m\nr,@nope,m\n", 3, "no flow file defines it"),
        ("Request,Log,Machine\nr,@,m\n", 2, "names none"),
        ("Request,Log,Machine,When\nr,x,m\nRequest,Log,Machine,When\n", 3, "only be the first"),
    ],
)
def test_bad_control_cells(tmp_path: Path, content: str, row: int, words: str) -> None:
    path = tmp_path / "flows.csv"
    path.write_text(content)
    with pytest.raises(FlowFileError) as info:
        load_flows([str(path)])
    assert str(info.value).startswith(f"{path}:{row}: ")
    assert words in str(info.value)


def test_sub_flow_rows_may_repeat() -> None:
    flows = parse_flows("r,x,m\nr,@s,m\nr,@s,n\ns,y,m\n")
    assert [ln.sub for ln in flows["r"].lines] == ["", "s", "s"]


# -- any file with the new columns loads, or fails naming PATH:ROW: ---------------------

_cell = st.one_of(
    st.sampled_from(
        [
            "",
            "ok",
            "not ok",
            "n < 3",
            'k == "v"',
            "a and b or c",
            "x in [1, 2]",
            "items",
            "items as out",
            "@sub",
            "@",
            "@main",
            "a ==",
            "in [",
            "as",
        ]
    ),
    st.text(alphabet='abn <=>!"[],@ 1', max_size=12),
)


@settings(max_examples=200, deadline=None)
@given(
    columns=st.permutations(["When", "Each"]).flatmap(
        lambda p: st.integers(0, 2).map(lambda n: p[:n])
    ),
    rows=st.lists(
        st.tuples(
            st.sampled_from(["main", "sub"]),
            _cell,
            st.sampled_from(["web", "db", "bad name"]),
            _cell,
            _cell,
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_any_file_loads_or_names_its_row(columns: list[str], rows: list[tuple[str, ...]]) -> None:
    header = "\t".join(["Request", "Log", "Machine", *columns])
    body = "\n".join(
        "\t".join([r[0], r[1], r[2], *r[3 : 3 + len(columns)]]).replace("\n", " ") for r in rows
    )
    content = f"{header}\n{body}\n"
    try:
        parse_flows(content, "p.tsv")
    except FlowFileError as exc:
        assert re.match(r"p\.tsv:\d+: ", str(exc)), str(exc)


def test_a_condition_is_shown_and_hashed_in_one_spelling() -> None:
    """Spacing between tokens does not count; spacing inside a string literal does."""
    assert str(parse_condition("x   in [ 1 ,2 ]")) == "x in [1, 2]"
    assert str(parse_condition("not  a and b<3")) == "not a and b < 3"
    assert str(parse_condition('s == "a  b"')) == 's == "a  b"'
    one = parse_flows('Request,Log,Machine,When\nr,x,m,"s == ""a  b"""\n')
    two = parse_flows('Request,Log,Machine,When\nr,x,m,"s == ""a b"""\n')
    same = parse_flows('Request,Log,Machine,When\nr,x,m,"s==""a  b"""\n')
    assert one["r"].digest != two["r"].digest
    assert one["r"].digest == same["r"].digest
