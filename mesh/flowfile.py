"""Flow files: the linearized view of each request, turned into frozen data.

A flow file is a CSV or TSV table with the columns ``Request, Log, Machine``: one row
per log line, in the order the lines happen, naming the machine that runs each one.
People write these files by hand or export them from a spreadsheet, so the parser is
lenient about everything a spreadsheet or an editor adds (a BOM, CRLF, blank lines,
a header in any case, trailing empty cells) and strict about everything that would
make the mesh misbehave later (a missing cell, a duplicate log text, a bad machine
name).  Every such error names ``PATH:ROW:`` like a compiler, because the person who
has to fix it is looking at the file, not at a traceback.

Everything here is pure data: once loaded, a :class:`FlowSet` never changes, and the
only I/O is reading the files in :func:`load_flows`.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from types import MappingProxyType

from mesh.conditions import Condition, ConditionError, Each, parse_condition, parse_each
from mesh.errors import FlowFileError
from mesh.masking import MASK

__all__ = ["Flow", "FlowSet", "Line", "load_flows", "parse_flows"]

#: A flow file past this size is refused before it is parsed (``max_flow_file_bytes``):
#: thousands of rows, far more than a readable flow file has.
DEFAULT_MAX_FLOW_FILE_BYTES = 4 * 1024 * 1024

#: Logging this text hands a flow over to the machine of its next line, so it cannot
#: also be a line of its own.
_RESERVED_TEXT = "next"

_PLACEHOLDER = re.compile(r"([:#])([A-Za-z_][A-Za-z0-9_]*)")
_MACHINE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_HEADER = ["request", "log", "machine"]
_COLUMNS = "Request, Log, Machine"
#: Optional columns, only after a header row that names them (mesh/conditions.py).
_OPTIONAL = ("when", "each")
#: A Log cell ``@REQUEST`` runs that request as a sub-flow.
_SUB = "@"

#: One placeholder of a compiled template and the literal text that follows it:
#: ``(name, as_written, always_secret, literal_after)``.  A flat tuple rather than a
#: class because :meth:`Line.render` unpacks it on every executed line.
_Slot = tuple[str, str, bool, str]


def _compile(text: str) -> tuple[str, tuple[_Slot, ...], tuple[str, ...], tuple[str, ...]]:
    """Split a template once, at load time, so rendering is only joins and lookups.

    Returns the literal head, the slots, every placeholder name and the ``#`` names.
    A ``:name`` is marked always-secret when the same line also has ``#name``, so
    that a line rendered on its own still never shows that value.
    """
    matches = list(_PLACEHOLDER.finditer(text))
    hashed = {m.group(2) for m in matches if m.group(1) == "#"}
    head = text[: matches[0].start()] if matches else text
    slots: list[_Slot] = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        name = m.group(2)
        slots.append((name, m.group(0), name in hashed, text[m.end() : end]))
    names = tuple(dict.fromkeys(m.group(2) for m in matches))
    secrets = tuple(dict.fromkeys(m.group(2) for m in matches if m.group(1) == "#"))
    return head, tuple(slots), names, secrets


@dataclass(frozen=True, slots=True)
class Line:
    """One row of a flow file: a log line of a request and the machine that runs it.

    ``placeholders`` and ``secrets`` are derived from ``text`` rather than passed in,
    so they can never disagree with the template they describe.
    """

    request: str
    index: int
    text: str
    machine: str
    path: str
    row: int
    #: Its ``When`` cell: the row runs only when this holds (None: always).
    when: Condition | None = None
    #: Its ``Each`` cell: the row runs once per element of a list (None: once).
    each: Each | None = None
    placeholders: tuple[str, ...] = field(init=False)
    secrets: tuple[str, ...] = field(init=False)
    #: The request a ``@REQUEST`` row runs as a sub-flow; "" for an ordinary row.
    sub: str = field(init=False)
    _head: str = field(init=False, repr=False, compare=False)
    _slots: tuple[_Slot, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sub", self.text[1:] if self.text.startswith(_SUB) else "")
        head, slots, names, secrets = _compile(self.text)
        object.__setattr__(self, "placeholders", names)
        object.__setattr__(self, "secrets", secrets)
        object.__setattr__(self, "_head", head)
        object.__setattr__(self, "_slots", slots)

    def render(self, context: Mapping[str, object], secrets: AbstractSet[str] = frozenset()) -> str:
        """Fill the template from *context*, masking every secret name.

        A name missing from *context* stays as written, so a half-filled line still
        shows which value was missing instead of failing inside a logging call.
        *secrets* are the names secret anywhere in the flow (see :attr:`Flow.secrets`);
        prefer :meth:`Flow.render`, which passes them.
        """
        if not self._slots:
            return self.text
        out = [self._head]
        for name, written, always_secret, after in self._slots:
            if name in context:
                out.append(MASK if always_secret or name in secrets else str(context[name]))
            else:
                out.append(written)
            out.append(after)
        return "".join(out)


@dataclass(frozen=True, slots=True)
class Flow:
    """Every line of one request, in order.

    ``secrets`` and ``digest`` are derived from the lines: a name written ``#name``
    anywhere in the request is secret on every line of it, because a value that must
    not be logged in one place must not be logged in any other.
    """

    name: str
    lines: tuple[Line, ...]
    secrets: frozenset[str] = field(init=False)
    digest: str = field(init=False)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)
    _machines: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _controlled: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, int] = {}
        for i, line in enumerate(self.lines):
            if line.request != self.name or line.index != i or line.text in index:
                raise ValueError(
                    f"line {line!r} does not belong at index {i} of request {self.name!r}"
                )
            if not line.sub:  # a sub-flow row is no line code logs; it may repeat
                index[line.text] = i
        object.__setattr__(
            self,
            "_controlled",
            any(ln.when is not None or ln.each is not None or ln.sub for ln in self.lines),
        )
        object.__setattr__(self, "secrets", frozenset(s for ln in self.lines for s in ln.secrets))
        object.__setattr__(self, "digest", _digest(self.name, self.lines))
        object.__setattr__(self, "_index", index)
        object.__setattr__(
            self, "_machines", tuple(dict.fromkeys(line.machine for line in self.lines))
        )

    @property
    def machines(self) -> tuple[str, ...]:
        """The machines this request touches, in order of first appearance."""
        return self._machines

    @property
    def controlled(self) -> bool:
        """Whether any row has a condition, a fan-out or a sub-flow: the runtime's plain
        path (every line in order) is for the flows that have none."""
        return self._controlled

    @property
    def calls(self) -> tuple[str, ...]:
        """The requests its ``@REQUEST`` rows run as sub-flows, in order."""
        return tuple(dict.fromkeys(line.sub for line in self.lines if line.sub))

    def index_of(self, text: str) -> int | None:
        """Where a logged text falls in this request; ``None`` if it is not a line of it."""
        return self._index.get(text)

    def render(self, index: int, context: Mapping[str, object]) -> str:
        """Render line *index* with this request's secrets masked."""
        return self.lines[index].render(context, self.secrets)


def _digest(name: str, lines: Sequence[Line]) -> str:
    """Fingerprint what a request *means*, not how its file is spelled.

    Only the name and each line's text and machine count (and its ``When`` and ``Each``
    cells, when it has them): delimiter, quoting, whitespace, line ends and other
    requests do not, so two machines agree on a request's version exactly when they
    would run it the same way.
    """
    rows: list[list[str]] = []
    for line in lines:
        row = [line.text, line.machine]
        if line.when is not None or line.each is not None:
            when = "" if line.when is None else line.when.text
            row += [when, "" if line.each is None else line.each.text]
        rows.append(row)
    normal = json.dumps([name, rows])
    return hashlib.sha256(normal.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class FlowSet:
    """Every request loaded from one or more flow files.

    The lookups a running mesh does on each log call (``texts``, :meth:`openers`,
    :meth:`lines_with`) are precomputed here once, because they sit on the hot path
    of a structlog processor.
    """

    flows: Mapping[str, Flow]
    paths: tuple[str, ...]
    texts: frozenset[str] = field(init=False)
    _openers: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)
    _lines_with: dict[str, tuple[Line, ...]] = field(init=False, repr=False, compare=False)
    _machines: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        flows = MappingProxyType(dict(self.flows))
        for name, flow in flows.items():
            if flow.name != name:
                raise ValueError(f"flow {flow.name!r} is filed under {name!r}")
        openers: dict[str, list[str]] = {}
        lines_with: dict[str, list[Line]] = {}
        for flow in flows.values():
            if flow.lines:
                openers.setdefault(flow.lines[0].text, []).append(flow.name)
            for line in flow.lines:
                lines_with.setdefault(line.text, []).append(line)
        # Machines in the order a reader of the files meets them, not request by request.
        order = {path: i for i, path in enumerate(self.paths)}
        every = sorted(
            (line for flow in flows.values() for line in flow.lines),
            key=lambda line: (order.get(line.path, len(order)), line.row),
        )
        object.__setattr__(self, "flows", flows)
        object.__setattr__(self, "paths", tuple(self.paths))
        object.__setattr__(self, "texts", frozenset(lines_with))
        object.__setattr__(self, "_openers", {k: tuple(v) for k, v in openers.items()})
        object.__setattr__(self, "_lines_with", {k: tuple(v) for k, v in lines_with.items()})
        object.__setattr__(self, "_machines", tuple(dict.fromkeys(ln.machine for ln in every)))

    def __getitem__(self, request: str) -> Flow:
        return self.flows[request]

    def __contains__(self, request: object) -> bool:
        return request in self.flows

    def __iter__(self) -> Iterator[str]:
        return iter(self.flows)

    def __len__(self) -> int:
        return len(self.flows)

    @property
    def machines(self) -> tuple[str, ...]:
        """Every machine named in the files, in the order the files name them."""
        return self._machines

    def openers(self, text: str) -> tuple[str, ...]:
        """The requests that a log call with *text* would start."""
        return self._openers.get(text, ())

    def lines_with(self, text: str) -> tuple[Line, ...]:
        """Every line, across requests, whose template is *text*."""
        return self._lines_with.get(text, ())


def parse_flows(text: str, path: str = "<string>") -> FlowSet:
    """Parse one flow file's content; *path* only names it in errors and on each line."""
    return _merge([(path, _parse(text, path))])


def load_flows(paths: Sequence[str | os.PathLike[str]], *, max_bytes: int | None = None) -> FlowSet:
    """Read, parse and merge flow files; a request may be defined in only one of them.

    Files are read whole and decoded here, not by the csv module, so that every
    failure (missing, a directory, not UTF-8) becomes a :class:`FlowFileError` that
    names the file.
    """
    if isinstance(paths, str | bytes | os.PathLike):
        raise TypeError("load_flows() takes a sequence of paths; wrap a single path in a list")
    names = [os.fspath(p) for p in paths]
    if not names:
        raise FlowFileError("no flow files given")
    seen: dict[str, str] = {}
    parsed: list[tuple[str, dict[str, list[Line]]]] = []
    for name in names:
        real = os.path.realpath(name)
        if real in seen:
            raise FlowFileError(f"{name}: flow file is listed twice (also as {seen[real]})")
        seen[real] = name
        parsed.append((name, _parse(_read(name, max_bytes), name)))
    return _merge(parsed)


def _read(path: str, max_bytes: int | None = None) -> str:
    try:
        with open(path, "rb") as f:
            # One byte past the limit is enough to know; a huge file is never read whole.
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except FileNotFoundError:
        raise FlowFileError(f"{path}: no such flow file") from None
    except OSError as e:
        if os.path.isdir(path):
            raise FlowFileError(f"{path}: is a directory, not a flow file") from None
        raise FlowFileError(f"{path}: cannot read flow file: {e.strerror or e}") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise FlowFileError(
            f"{path}: flow file is over the {max_bytes:,}-byte limit"
            " (max_flow_file_bytes in mesh.toml)"
        )
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        # The bytes before the bad one are valid, so decoding them finds the row cheaply.
        before = data[: e.start].decode("utf-8")
        row = _row_at(before, len(before))
        raise FlowFileError(
            f"{path}:{row}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8"
        ) from None


def _row_at(text: str, offset: int) -> int:
    """The 1-based physical line of *offset*, counting ``\\n``, ``\\r\\n`` and ``\\r``."""
    before = text[:offset]
    return before.count("\n") + before.count("\r") - before.count("\r\n") + 1


def _merge(parsed: Sequence[tuple[str, dict[str, list[Line]]]]) -> FlowSet:
    """Join files' requests, refusing a request that two files both define.

    Merging two definitions would silently pick one; the person who wrote them
    needs to know which two rows disagree.
    """
    flows: dict[str, Flow] = {}
    for path, requests in parsed:
        for name, lines in requests.items():
            other = flows.get(name)
            if other is not None:
                before = other.lines[0]
                raise FlowFileError(
                    f"{path}:{lines[0].row}: request {name!r} is already defined in "
                    f"{before.path}:{before.row}"
                )
            flows[name] = Flow(name, tuple(lines))
    for flow in flows.values():
        for line in flow.lines:
            if line.sub and line.sub not in flows:
                raise FlowFileError(
                    f"{line.path}:{line.row}: {line.text!r} runs request {line.sub!r} as a"
                    " sub-flow, but no flow file defines it"
                )
    return FlowSet(flows, tuple(path for path, _ in parsed))


def _parse(text: str, path: str) -> dict[str, list[Line]]:
    """One file's requests in order of first appearance, each with its lines in order."""
    requests: dict[str, list[Line]] = {}
    by_text: dict[tuple[str, str], Line] = {}
    first = True
    extra: tuple[str, ...] = ()  # the optional columns the header names, in its order
    for row, raw in _records(text, path):
        cells = [cell.strip() for cell in raw]
        if not any(cells):
            continue
        while len(cells) > 3 and not cells[-1]:
            cells.pop()
        if [cell.casefold() for cell in cells[:3]] == _HEADER:
            if first:
                first = False
                extra = _header(cells[3:], path, row)
                continue
            raise FlowFileError(
                f"{path}:{row}: a header row ({_COLUMNS}) may only be the first row; "
                "were two files pasted together?"
            )
        first = False
        if len(cells) < 3 or len(cells) > 3 + len(extra):
            columns = _COLUMNS + "".join(f", {c.title()}" for c in extra)
            expected = f"3 to {3 + len(extra)}" if extra else "3"
            raise FlowFileError(
                f"{path}:{row}: expected {expected} columns ({columns}), found {len(cells)}"
                + (
                    "; optional columns (When, Each) need a header row naming them"
                    if len(cells) > 3 and not extra
                    else ""
                )
            )
        request, log, machine = cells[:3]
        for column, value in zip(("Request", "Log", "Machine"), cells, strict=False):
            if not value:
                raise FlowFileError(f"{path}:{row}: the {column} cell is empty")
        optional = dict(zip(extra, cells[3:], strict=False))
        when, each = _control(optional, path, row)
        if log.startswith(_SUB) and not log[len(_SUB) :].strip():
            raise FlowFileError(
                f"{path}:{row}: a Log cell {_SUB}REQUEST names the request to run as a"
                " sub-flow, and this one names none"
            )
        if log == _RESERVED_TEXT:
            raise FlowFileError(
                f"{path}:{row}: log text {_RESERVED_TEXT!r} is reserved: "
                "logging it hands the flow to the machine of the next line"
            )
        if not _MACHINE.fullmatch(machine):
            raise FlowFileError(
                f"{path}:{row}: machine name {machine!r} is not valid: use letters, digits, "
                "'_', '.' and '-', not starting with '.' or '-'"
            )
        earlier = None if log.startswith(_SUB) else by_text.get((request, log))
        if earlier is not None:
            raise FlowFileError(
                f"{path}:{row}: log text {log!r} is already line {earlier.index} of "
                f"{request} (row {earlier.row}); a request's log texts must be unique"
            )
        lines = requests.setdefault(request, [])
        line = Line(request, len(lines), log, machine, path, row, when, each)
        lines.append(line)
        by_text[request, log] = line
    if not requests:
        raise FlowFileError(f"{path}: flow file has no lines")
    return requests


def _header(cells: Sequence[str], path: str, row: int) -> tuple[str, ...]:
    """The optional columns a header row names after the first three (any case, any order)."""
    names: list[str] = []
    for cell in cells:
        name = cell.casefold()
        if name not in _OPTIONAL:
            raise FlowFileError(
                f"{path}:{row}: unknown column {cell!r} in the header; after {_COLUMNS}"
                " the optional columns are When and Each"
            )
        if name in names:
            raise FlowFileError(f"{path}:{row}: column {cell!r} is named twice in the header")
        names.append(name)
    return tuple(names)


def _control(
    optional: Mapping[str, str], path: str, row: int
) -> tuple[Condition | None, Each | None]:
    """A row's parsed When and Each cells (None where empty or absent)."""
    when = each = None
    try:
        if optional.get("when"):
            when = parse_condition(optional["when"])
        if optional.get("each"):
            each = parse_each(optional["each"])
    except ConditionError as e:
        raise FlowFileError(f"{path}:{row}: {e}") from None
    return when, each


def _records(text: str, path: str) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(row, cells)`` per CSV record, *row* being where the record starts.

    Lines are split here rather than by the csv module so that ``\\r``, ``\\r\\n``
    and ``\\n`` all count as one physical line, and ``reader.line_num`` then tells
    where each record ends (and so where the next one starts).
    """
    text = text.removeprefix("\ufeff")
    nul = text.find("\0")
    if nul >= 0:
        raise FlowFileError(
            f"{path}:{_row_at(text, nul)}: contains a NUL character; "
            "is this a UTF-16 or binary file?"
        )
    physical = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines = [line + "\n" for line in physical[:-1]]
    if physical[-1]:
        lines.append(physical[-1])
    delimiter = _delimiter("".join(lines))
    reader = csv.reader(lines, delimiter=delimiter, strict=True, skipinitialspace=True)
    row = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise FlowFileError(f"{path}:{row}: {_explain(e, delimiter)}") from None
        yield row, cells
        row = reader.line_num + 1


def _delimiter(text: str) -> str:
    """Tab if the first non-blank line has a tab outside quoted cells, else comma.

    The line is read as a record, not as a physical line: a quoted first cell that
    spans lines must not hide the tabs after it, and a tab inside a quoted CSV cell
    must not turn the file into TSV.  A quote opens a cell only at its start, as in
    the csv module.  *text* has ``\\n`` line ends only.
    """
    quoted = False
    cell_start = True
    tab = content = False
    i = 0
    while i < len(text):
        c = text[i]
        if quoted:
            if c == '"':
                if text.startswith('"', i + 1):
                    i += 1
                else:
                    quoted = False
        elif c == "\n":
            if content:
                break
            tab = False
            cell_start = True
        elif c == "\t":
            tab = cell_start = True
        elif c == ",":
            content = cell_start = True
        elif c == '"' and cell_start:
            quoted = content = True
        elif not c.isspace():
            content = True
            cell_start = False
        i += 1
    return "\t" if tab and content else ","


def _explain(error: csv.Error, delimiter: str) -> str:
    """Say what the csv module means, in terms of the cell a person has to fix."""
    message = str(error)
    shown = "tab" if delimiter == "\t" else repr(delimiter)
    if message == "unexpected end of data":
        return 'unterminated quoted cell: a cell opened with " is never closed'
    if message.startswith("field larger than field limit"):
        return f"cell too long ({message}); is a quoted cell never closed?"
    if "expected after" in message:
        return (
            f'text after the closing " of a quoted cell (expected a {shown}, not even a space); '
            'inside a quoted cell write a quote as ""'
        )
    return f"malformed {'TSV' if delimiter == chr(9) else 'CSV'}: {message}"
