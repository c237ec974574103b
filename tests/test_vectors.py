"""The digest's test vectors (``protos/mesh/v1/testdata/digests.json``) against the code.

A client in another language computes ``ContinueRequest.digest`` from the wire protocol's
docs and checks itself against these vectors; so the vectors must be what the Python peers
compute, case by case, or a client that follows them would be refused by every peer. Each
step of the documented algorithm is checked on its own: the file's rows to each request's
lines, the lines to the text hashed, that text to the digest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from mesh.flowfile import Line, parse_flows

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "protos" / "mesh" / "v1" / "testdata" / "digests.json"


def _cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads(VECTORS.read_text(encoding="utf-8"))["cases"]
    return cases


def _row(line: Line) -> list[str]:
    """A row as the digest hashes it: ``[log, machine]``, and its When and Each cells (in
    their canonical spelling) when it has either (docs/wire-protocol.md#digest)."""
    if line.when is None and line.each is None:
        return [line.text, line.machine]
    when = "" if line.when is None else line.when.text
    return [line.text, line.machine, when, "" if line.each is None else line.each.text]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"][:60])
def test_each_vector_is_what_a_peer_computes(case: dict[str, Any]) -> None:
    """A flow file in this spelling gives these requests, in this order, with these lines
    and secrets; the text hashed is their documented JSON, and the digest the peers send and
    check is the first 16 hex digits of its SHA-256."""
    flows = parse_flows(case["file"], "vector")
    assert list(flows) == [r["request"] for r in case["requests"]]
    for want in case["requests"]:
        flow = flows[want["request"]]
        lines = [_row(line) for line in flow.lines]
        assert lines == want["lines"]
        assert list(dict.fromkeys(s for ln in flow.lines for s in ln.secrets)) == want["secrets"]
        assert json.dumps([flow.name, lines]) == want["hashed"]
        assert want["hashed"].isascii()
        assert hashlib.sha256(want["hashed"].encode("utf-8")).hexdigest()[:16] == want["digest"]
        assert flow.digest == want["digest"]


def test_the_vectors_cover_every_spelling_a_flow_file_has() -> None:
    """The forms the docs promise a digest ignores are each in some case: a BOM, CRLF and
    CR line ends, a header and none, quoting, blank lines, interleaved requests, text beyond
    the BMP, secrets; and a request spelled several ways has one digest."""
    cases = _cases()
    files = [c["file"] for c in cases]
    for form in ("\ufeff", "\r\n", '""', "\t", "REQUEST", "Request\tLog\tMachine", "#"):
        assert any(form in f for f in files), form
    assert any("\r" in f and "\r\n" not in f for f in files)  # CR alone
    assert any(not f.lower().lstrip("\ufeff \r\n").startswith("request") for f in files)
    assert any(any(ord(ch) > 0xFFFF for ch in f) for f in files)
    assert any("\n\n" in f.replace("\r", "\n") for f in files)  # a blank line
    digests: dict[str, set[str]] = {}
    for case in cases:
        for request in case["requests"]:
            digests.setdefault(request["request"], set()).add(request["digest"])
    assert digests["login"] == {"93fb13f2200bbc72"}  # four spellings, one digest
    assert sum(1 for c in cases for r in c["requests"] if r["request"] == "login") >= 4
    assert any(r["secrets"] for c in cases for r in c["requests"])
    # Control flow: rows with When or Each cells hash as quadruples, others as pairs.
    rows = [row for c in cases for r in c["requests"] for row in r["lines"]]
    assert any(len(row) == 4 and row[2] for row in rows)  # a condition
    assert any(len(row) == 4 and row[3] for row in rows)  # a fan-out
    assert any(row[0].startswith("@") for row in rows)  # a sub-flow row
