"""Tests for mesh.flowfile: parsing flow files into frozen data."""

from __future__ import annotations

import csv
import dataclasses
import io
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from support.meshdir import LOGIN_FLOW

from mesh.errors import FlowFileError
from mesh.flowfile import Flow, FlowSet, Line, load_flows, parse_flows

LOGIN_TSV = LOGIN_FLOW  # the design notes' login and feed, with a header

INDEX_CSV = (
    "index,Checking if signed in,server\n"
    "index,Generating list of questions,server\n"
    "index,Sending sign in email,emailservice\n"
)


def write(tmp_path: Path, content: str | bytes, name: str = "flows.csv") -> str:
    """Write *content* byte for byte (no newline translation) and return its path."""
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return str(path)


def load_error(tmp_path: Path, content: str | bytes) -> tuple[str, str]:
    """Load *content* from a file and return (path, error message)."""
    path = write(tmp_path, content)
    with pytest.raises(FlowFileError) as info:
        load_flows([path])
    return path, str(info.value)


def shape(flows: FlowSet) -> list[tuple[str, list[tuple[str, str]]]]:
    """The meaning of a FlowSet: request names with their (text, machine) lines."""
    return [(f.name, [(ln.text, ln.machine) for ln in f.lines]) for f in flows.flows.values()]


# --- the two example forms -------------------------------------------------------------


def test_tsv_example_with_header() -> None:
    """The login/feed TSV example loads into two requests with their lines in order."""
    flows = parse_flows(LOGIN_TSV)
    assert list(flows) == ["login", "feed"]
    assert len(flows) == 2
    assert "login" in flows
    assert "nope" not in flows
    login = flows["login"]
    assert [ln.index for ln in login.lines] == [0, 1, 2, 3, 4, 5]
    assert [ln.row for ln in login.lines] == [2, 3, 4, 5, 6, 7]
    assert login.lines[0].text == "User attempted login as :username and #password"
    assert login.machines == ("client", "server")
    assert login.secrets == frozenset({"password"})
    assert flows.machines == ("client", "server")
    assert flows.paths == ("<string>",)
    assert flows["feed"].lines[1] == Line(
        "feed", 1, "Retrieving feed information", "server", "<string>", 9
    )


def test_csv_example_without_header() -> None:
    """The index CSV example (no header, comma) loads; its first row is data."""
    flows = parse_flows(INDEX_CSV)
    index = flows["index"]
    assert [ln.text for ln in index.lines] == [
        "Checking if signed in",
        "Generating list of questions",
        "Sending sign in email",
    ]
    assert [ln.row for ln in index.lines] == [1, 2, 3]
    assert flows.machines == ("server", "emailservice")


def test_unknown_request_is_key_error() -> None:
    """Indexing a FlowSet with an unknown request raises KeyError."""
    with pytest.raises(KeyError):
        parse_flows(INDEX_CSV)["login"]


def test_load_flows_from_files(tmp_path: Path) -> None:
    """load_flows reads files and records each line's path as given."""
    a = write(tmp_path, LOGIN_TSV, "a.tsv")
    b = write(tmp_path, INDEX_CSV, "b.csv")
    flows = load_flows([a, Path(b)])
    assert list(flows) == ["login", "feed", "index"]
    assert flows.paths == (a, b)
    assert flows["index"].lines[0].path == b
    assert flows.machines == ("client", "server", "emailservice")


# --- header, BOM, line ends, blank lines -----------------------------------------------


@pytest.mark.parametrize(
    "header", ["Request,Log,Machine", "request,log,machine", " REQUEST , Log,MaChInE "]
)
def test_header_any_case(header: str) -> None:
    """A header row is recognised in any case and with padding, and is skipped."""
    flows = parse_flows(header + "\n" + INDEX_CSV)
    assert shape(flows) == shape(parse_flows(INDEX_CSV))
    assert flows["index"].lines[0].row == 2


def test_repeated_header_is_an_error(tmp_path: Path) -> None:
    """A header row after data (two files pasted together) is reported."""
    path, message = load_error(
        tmp_path, "Request,Log,Machine\n" + INDEX_CSV + "request,log,machine\n"
    )
    assert message.startswith(f"{path}:5: a header row")


def test_bom_is_skipped(tmp_path: Path) -> None:
    """A UTF-8 BOM neither becomes part of the header nor of the first request name."""
    path = write(tmp_path, "\ufeff" + INDEX_CSV)
    assert list(load_flows([path])) == ["index"]
    assert list(parse_flows("\ufeffRequest,Log,Machine\n" + INDEX_CSV)) == ["index"]


def test_crlf_line_ends(tmp_path: Path) -> None:
    """CRLF files load the same as LF files, rows included."""
    path = write(tmp_path, LOGIN_TSV.replace("\n", "\r\n"))
    assert load_flows([path])["feed"].lines[0].row == 8
    assert shape(load_flows([path])) == shape(parse_flows(LOGIN_TSV))


def test_blank_lines_skipped_and_rows_are_physical() -> None:
    """Blank and whitespace-only rows are skipped but still counted in row numbers."""
    text = "Request,Log,Machine\n\n  \n , ,\t\nindex,A,server\r\n\r\nindex,B,server\n\n"
    lines = parse_flows(text)["index"].lines
    assert [(ln.text, ln.row) for ln in lines] == [("A", 5), ("B", 7)]


def test_error_row_counts_header_and_blank_lines(tmp_path: Path) -> None:
    """An error on physical line 5 after a header and blank lines says :5:."""
    path, message = load_error(tmp_path, "Request,Log,Machine\n\nindex,A,server\n\nindex,B\n")
    assert message == f"{path}:5: expected 3 columns (Request, Log, Machine), found 2"


def test_trailing_empty_cells_tolerated() -> None:
    """Excel's trailing empty cells (a,b,c,,) do not count as columns."""
    flows = parse_flows("index,A,server,\nindex,B,server, ,\t,\n")
    assert [ln.machine for ln in flows["index"].lines] == ["server", "server"]


def test_cells_are_stripped() -> None:
    """Whitespace around cells is not part of names, texts or machines."""
    line = parse_flows("  index \t  A  text \t server  \n")["index"].lines[0]
    assert (line.request, line.text, line.machine) == ("index", "A  text", "server")


def test_old_mac_line_ends() -> None:
    """A lone CR ends a line too, for parsing and for row numbers."""
    assert [ln.row for ln in parse_flows("index,A,s\rindex,B,s\r")["index"].lines] == [1, 2]


# --- quoting -------------------------------------------------------------------------------


def test_quoted_comma_and_escaped_quote() -> None:
    """A quoted Log cell may contain the delimiter, and "" is one quote."""
    flows = parse_flows('index,"Checking a, b",server\nindex,"Said ""hi""",server\n')
    assert [ln.text for ln in flows["index"].lines] == ["Checking a, b", 'Said "hi"']


def test_space_before_quoted_cell() -> None:
    """A space after the comma does not stop a cell from being quoted."""
    assert parse_flows('index, "a, b", server\n')["index"].lines[0].text == "a, b"


def test_quotes_inside_unquoted_cell_are_text() -> None:
    """A quote in the middle of an unquoted cell is kept as written."""
    text = parse_flows('index\tHe said "hi"\tserver\n')["index"].lines[0].text
    assert text == 'He said "hi"'


def test_multiline_cell_row_is_where_record_starts(tmp_path: Path) -> None:
    """A quoted cell spanning lines counts its lines, and errors name the record's start."""
    flows = parse_flows('index,"two\nlines",server\nindex,after,server\n')
    assert [(ln.text, ln.row) for ln in flows["index"].lines] == [("two\nlines", 1), ("after", 3)]
    path, message = load_error(tmp_path, 'index,A,server\nindex,"B\nC"\n')
    assert message == f"{path}:2: expected 3 columns (Request, Log, Machine), found 2"


def test_delimiter_ignores_tabs_inside_quotes() -> None:
    """A tab inside a quoted CSV cell does not make the file TSV."""
    assert parse_flows('index,"a\tb",server\n')["index"].lines[0].text == "a\tb"


def test_delimiter_sees_past_multiline_first_cell() -> None:
    """A TSV file whose first cell is quoted across lines is still TSV."""
    flows = parse_flows('"two\nlines"\tA, b\tserver\n')
    assert [(ln.request, ln.text) for ln in flows.flows["two\nlines"].lines] == [
        ("two\nlines", "A, b")
    ]


def test_delimiter_skips_blank_tab_lines() -> None:
    """Whitespace-only lines, tabs included, do not decide the delimiter."""
    assert parse_flows("\t\t\n  \nindex,A b,server\n")["index"].lines[0].row == 3


# --- requests ----------------------------------------------------------------------------


def test_interleaved_requests() -> None:
    """Rows of different requests may interleave; each keeps its own file order."""
    text = "a,A0,m1\nb,B0,m2\na,A1,m3\nb,B1,m1\na,A2,m1\n"
    flows = parse_flows(text)
    assert list(flows) == ["a", "b"]
    assert [(ln.text, ln.index, ln.row) for ln in flows["a"].lines] == [
        ("A0", 0, 1),
        ("A1", 1, 3),
        ("A2", 2, 5),
    ]
    assert [(ln.text, ln.index) for ln in flows["b"].lines] == [("B0", 0), ("B1", 1)]
    assert flows["a"].machines == ("m1", "m3")
    assert flows.machines == ("m1", "m2", "m3")


def test_index_of() -> None:
    """index_of finds a line's position by its text and None for unknown text."""
    login = parse_flows(LOGIN_TSV)["login"]
    assert login.index_of("Testing password for :username") == 2
    assert login.index_of("Fetching feed information") is None


def test_openers_lines_with_and_texts() -> None:
    """FlowSet lookups cover first lines, shared texts across requests and all texts."""
    flows = parse_flows("a,Start,m\na,Shared,m\nb,Start,n\nb,Other,n\nc,Shared,m\n")
    assert flows.openers("Start") == ("a", "b")
    assert flows.openers("Shared") == ("c",)
    assert flows.openers("Other") == ()
    assert [(ln.request, ln.index) for ln in flows.lines_with("Shared")] == [("a", 1), ("c", 0)]
    assert flows.lines_with("missing") == ()
    assert flows.texts == frozenset({"Start", "Shared", "Other"})


def test_same_text_in_different_requests_is_fine() -> None:
    """Log texts need only be unique within a request."""
    flows = parse_flows("a,Same,m\nb,Same,m\n")
    assert flows["a"].index_of("Same") == flows["b"].index_of("Same") == 0


def test_frozen() -> None:
    """Loaded data cannot be changed in place."""
    flows = parse_flows(INDEX_CSV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        flows["index"].lines[0].text = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        flows.flows["other"] = flows["index"]  # type: ignore[index]


def test_same_content_compares_equal() -> None:
    """Two FlowSets parsed from the same content are equal; private caches do not matter."""
    assert parse_flows(LOGIN_TSV) == parse_flows(LOGIN_TSV)
    assert parse_flows(LOGIN_TSV) != parse_flows(INDEX_CSV)


def test_flow_rejects_foreign_lines() -> None:
    """A hand-built Flow whose lines are not its own, in order, is a programming error."""
    line = Line("a", 0, "A", "m", "<string>", 1)
    assert Flow("a", (line,)).lines == (line,)
    with pytest.raises(ValueError, match="does not belong"):
        Flow("b", (line,))
    with pytest.raises(ValueError, match="does not belong"):
        Flow("a", (line, Line("a", 1, "A", "m", "<string>", 2)))


# --- placeholders and rendering -------------------------------------------------------------


def test_placeholders_parsed() -> None:
    """Only :name / #name with an identifier after the sigil are placeholders."""
    line = Line("r", 0, "At 10:30 see http://x as :user #pw :user :_x1 #", "m", "p", 1)
    assert line.placeholders == ("user", "pw", "_x1")
    assert line.secrets == ("pw",)


def test_render_present_and_absent() -> None:
    """Present names are filled with str(value); absent ones stay as written."""
    line = Line("r", 0, "At 10:30 :user fetched :count items from http://x", "m", "p", 1)
    assert line.render({"user": "bob", "count": 3}) == "At 10:30 bob fetched 3 items from http://x"
    assert line.render({"count": 3}) == "At 10:30 :user fetched 3 items from http://x"
    assert line.render({}) == line.text


def test_render_without_placeholders_is_text() -> None:
    """A line without placeholders renders as its text whatever the context."""
    line = Line("r", 0, "Plain text", "m", "p", 1)
    assert line.render({"x": 1}) == "Plain text"


def test_render_hash_secret() -> None:
    """#name renders as *** when present and stays #name when absent."""
    login = parse_flows(LOGIN_TSV)["login"]
    assert login.render(0, {"username": "bob", "password": "hunter2"}) == (
        "User attempted login as bob and ***"
    )
    assert login.render(0, {"username": "bob"}) == "User attempted login as bob and #password"


def test_render_colon_secret_from_other_line() -> None:
    """:name is masked when another line of the flow writes #name."""
    flows = parse_flows("r,Got #token,a\nr,Using :token for :user,b\nother,Using :token,a\n")
    assert flows["r"].secrets == frozenset({"token"})
    ctx = {"token": "s3cr3t", "user": "bob"}
    assert flows["r"].render(1, ctx) == "Using *** for bob"
    assert flows["r"].lines[1].render(ctx, {"token"}) == "Using *** for bob"
    assert flows["r"].lines[1].render(ctx) == "Using s3cr3t for bob"
    # Secrecy is per request: another request's :token is not masked.
    assert flows["other"].render(0, ctx) == "Using s3cr3t"


def test_render_colon_secret_from_same_line() -> None:
    """A line with both #name and :name never shows the value, even rendered alone."""
    line = Line("r", 0, "#pw then :pw", "m", "p", 1)
    assert line.render({"pw": "x"}) == "*** then ***"


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("index,A\n", ":1: expected 3 columns (Request, Log, Machine), found 2"),
        ("index,A,m,extra\n", ":1: expected 3 columns (Request, Log, Machine), found 4"),
        ("index\n", ":1: expected 3 columns (Request, Log, Machine), found 1"),
        ("index,A,m\n ,B,m\n", ":2: the Request cell is empty"),
        ("index,A,m\nindex, ,m\n", ":2: the Log cell is empty"),
        ("index,A,m\nindex,B,\n", ":2: the Machine cell is empty"),
        ("index,A,m\nindex,B,,,\n", ":2: the Machine cell is empty"),
        ("index,next,m\n", ":1: log text 'next' is reserved"),
        ("index,A,my machine\n", ":1: machine name 'my machine' is not valid"),
        ("index,A,-m\n", ":1: machine name '-m' is not valid"),
        ("index,A,.m\n", ":1: machine name '.m' is not valid"),
        ("index,A,mé\n", ":1: machine name 'mé' is not valid"),
        ('index,"A,m\n', ":1: unterminated quoted cell"),
        ('index,A,m\nindex,"B"x,m\n', ':2: text after the closing "'),
        ('index,"B" ,m\n', ':1: text after the closing "'),
        ("index,A,m\nindex,B\x00,m\n", ":2: contains a NUL character"),
    ],
)
def test_bad_rows(tmp_path: Path, content: str, expected: str) -> None:
    """Each kind of bad row is reported with PATH:ROW: and what is wrong."""
    path, message = load_error(tmp_path, content)
    assert message.startswith(path + expected), message


def test_machine_names_allowed() -> None:
    """Machine names may use letters, digits, _ . - and start with a digit or _."""
    flows = parse_flows("r,A,web-1.eu_west\nr,B,_x\nr,C,9lives\n")
    assert flows.machines == ("web-1.eu_west", "_x", "9lives")


def test_duplicate_log_text(tmp_path: Path) -> None:
    """The same Log text twice in one request names the earlier line and row."""
    content = "Request,Log,Machine\nlogin,A,m\nlogin,B,m\nfeed,B,m\nlogin, B ,m\n"
    path, message = load_error(tmp_path, content)
    assert message == (
        f"{path}:5: log text 'B' is already line 1 of login (row 3); "
        "a request's log texts must be unique"
    )


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is named with no row."""
    path = str(tmp_path / "missing.csv")
    with pytest.raises(FlowFileError, match="no such flow file") as info:
        load_flows([path])
    assert str(info.value) == f"{path}: no such flow file"


def test_directory(tmp_path: Path) -> None:
    """A directory given as a flow file is reported as such."""
    with pytest.raises(FlowFileError) as info:
        load_flows([tmp_path])
    assert str(info.value) == f"{tmp_path}: is a directory, not a flow file"


@pytest.mark.parametrize(
    "content", ["", "\n\n", "\ufeff", "Request\tLog\tMachine\r\n\r\n", " , , \n"]
)
def test_no_lines(tmp_path: Path, content: str) -> None:
    """An empty file, or one with only a header and blank lines, has no lines."""
    path, message = load_error(tmp_path, content)
    assert message == f"{path}: flow file has no lines"


def test_not_utf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 is named, with the row of the first bad byte."""
    path, message = load_error(tmp_path, b"index,A,m\r\nindex,Caf\xe9,m\n")
    assert message.startswith(f"{path}:2: not UTF-8 text")


def test_utf16_is_reported(tmp_path: Path) -> None:
    """A UTF-16 file (BOM or not) is refused with a clear message, not garbage names."""
    _, message = load_error(tmp_path, INDEX_CSV.encode("utf-16"))
    assert "not UTF-8 text" in message
    path, message = load_error(tmp_path, INDEX_CSV.encode("utf-16-le"))
    assert message.startswith(f"{path}:1: contains a NUL character")


def test_duplicate_request_across_files(tmp_path: Path) -> None:
    """A request defined in two files names both places."""
    a = write(tmp_path, LOGIN_TSV, "a.tsv")
    b = write(tmp_path, "Request,Log,Machine\n\nother,X,m\nlogin,Y,m\n", "b.csv")
    with pytest.raises(FlowFileError) as info:
        load_flows([a, b])
    assert str(info.value) == f"{b}:4: request 'login' is already defined in {a}:2"


def test_same_file_twice(tmp_path: Path) -> None:
    """Listing one file twice is reported as that, not as duplicate requests."""
    a = write(tmp_path, INDEX_CSV)
    with pytest.raises(FlowFileError, match="listed twice"):
        load_flows([a, a])


def test_no_paths() -> None:
    """Loading nothing is an error rather than an empty FlowSet."""
    with pytest.raises(FlowFileError, match="no flow files given"):
        load_flows([])


def test_single_path_not_a_sequence(tmp_path: Path) -> None:
    """A bare path (a str is a sequence of characters) is refused, not split."""
    with pytest.raises(TypeError, match="sequence of paths"):
        load_flows(write(tmp_path, INDEX_CSV))


def test_error_has_no_csv_traceback() -> None:
    """csv.Error is wrapped without chaining, so no csv traceback is shown."""
    with pytest.raises(FlowFileError) as info:
        parse_flows('a,"b\n')
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


# --- digest --------------------------------------------------------------------------------


def test_digest_ignores_spelling() -> None:
    """Delimiter, quoting, whitespace, header, CRLF and interleaving don't change the digest."""
    base = parse_flows("a,Hello :x,m\na,Bye,n\nb,Other,m\n")
    variants = [
        "Request\tLog\tMachine\r\na\tHello :x\tm\r\na\tBye\tn\r\nb\tOther\tm\r\n",
        '"a","Hello :x", "m"\n\n  a , "Bye",n  \nb,Other,m',
        "a,Hello :x,m\nb,Other,m\na,Bye,n\n",
    ]
    for text in variants:
        assert parse_flows(text)["a"].digest == base["a"].digest
    assert len(base["a"].digest) == 16
    int(base["a"].digest, 16)


def test_digest_per_request() -> None:
    """Editing another request leaves a digest alone; editing this one changes it."""
    base = parse_flows("a,Hello,m\nb,Other,m\n")
    other_edited = parse_flows("a,Hello,m\nb,Changed,n\nb,More,m\n")
    assert other_edited["a"].digest == base["a"].digest
    assert other_edited["b"].digest != base["b"].digest
    assert parse_flows("a,Hello,n\nb,Other,m\n")["a"].digest != base["a"].digest
    assert parse_flows("a,Hello!,m\nb,Other,m\n")["a"].digest != base["a"].digest
    assert parse_flows("z,Hello,m\n")["z"].digest != base["a"].digest


# --- properties ---------------------------------------------------------------------------------

_CSV_ALPHABET = st.sampled_from([*'abR,\t"\n\r :#x\ufeff\x00 _.-', "next", "Request"])
_ANY_TEXT = st.one_of(st.text(), st.lists(_CSV_ALPHABET, max_size=60).map("".join))


@settings(max_examples=200, deadline=None)
@given(_ANY_TEXT)
def test_any_text_parses_or_fails_cleanly(text: str) -> None:
    """Any text gives a FlowSet or a FlowFileError naming the row it is about (or saying the
    text has no lines at all), never another exception."""
    try:
        flows = parse_flows(text)
    except FlowFileError as e:
        message = str(e)
        row = re.match(r"<string>:(\d+): \S", message)
        if row is None:
            assert message == "<string>: flow file has no lines"
        else:
            # A row that exists: counted from 1, at most one past the last physical line.
            assert 1 <= int(row.group(1)) <= len(text.splitlines()) + 1, message
    else:
        assert len(flows) > 0


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_on_disk_load_or_fail_naming_the_file(data: bytes) -> None:
    """Any file content (bad UTF-8, BOMs, NULs) gives flows or a FlowFileError naming the file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "flow.csv"
        path.write_bytes(data)
        try:
            load_flows([path])
        except FlowFileError as e:
            assert str(e).startswith(f"{path}:")


def _cell() -> st.SearchStrategy[str]:
    # No BOM: at the start of a file it is the encoding mark, stripped by design.
    chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r\t\ufeff")
    return st.text(chars, min_size=1, max_size=12).filter(lambda s: s == s.strip() and s != "")


_MACHINES = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,8}", fullmatch=True)


@st.composite
def _flow_model(draw: st.DrawFn) -> list[tuple[str, list[tuple[str, str]]]]:
    names = draw(st.lists(_cell(), min_size=1, max_size=4, unique=True))
    model = []
    for name in names:
        texts = draw(
            st.lists(
                _cell().filter(lambda s: s != "next" and not s.startswith("@")),
                min_size=1,
                max_size=5,
                unique=True,
            )
        )
        model.append((name, [(text, draw(_MACHINES)) for text in texts]))
    return model


def _write(model: list[tuple[str, list[tuple[str, str]]]], delimiter: str, header: bool) -> str:
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter)
    if header:
        writer.writerow(["Request", "Log", "Machine"])
    for name, lines in model:
        for text, machine in lines:
            writer.writerow([name, text, machine])
    return out.getvalue()


@settings(max_examples=200, deadline=None)
@given(_flow_model(), st.booleans())
def test_written_flows_parse_back(
    model: list[tuple[str, list[tuple[str, str]]]], header: bool
) -> None:
    """A valid flow written with csv.writer as CSV and as TSV parses back to the same flows."""
    if not header:
        first = [model[0][0], *model[0][1][0]]
        assume([c.casefold() for c in first] != ["request", "log", "machine"])
    as_csv = parse_flows(_write(model, ",", header))
    as_tsv = parse_flows(_write(model, "\t", header))
    assert shape(as_csv) == model
    assert as_csv == as_tsv
