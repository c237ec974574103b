"""``mesh diagram`` and ``mesh call --diagram``: flows and runs as sequence diagrams."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from support.chromium import ARTIFACTS, Chromium
from support.cli import run_mesh
from support.meshdir import LOGIN_FLOW, MeshDir, password_of
from support.peers import Peers

from mesh.flowfile import parse_flows
from mesh.result import Step
from mesh.tools import diagram

SVG = "{http://www.w3.org/2000/svg}"
REPO = Path(__file__).parent.parent

#: Three machines, met in the order worker, server, mailer; text Mermaid, XML
#: and HTML would each misread if it were not escaped.
AWKWARD_FLOW = (
    "r,Start <job> & count :n,worker\n"
    'r,"Ask ""server""; wait",server\n'
    "r,Mail #token to :who,mailer\n"
    "r,Back on worker,worker\n"
)


def _groups(svg: ET.Element, cls: str) -> list[ET.Element]:
    return [g for g in svg.iter(f"{SVG}g") if cls in g.get("class", "").split()]


def test_mermaid_of_the_login_flow() -> None:
    """One participant per machine, lines as notes, hops as arrows labelled with the line."""
    flows = parse_flows(LOGIN_FLOW)
    assert diagram.to_mermaid(diagram.from_flow(flows["login"])) == (
        "sequenceDiagram\n"
        "    title login\n"
        "    participant client\n"
        "    participant server\n"
        "    Note over client: 0. User attempted login as :username and #35;password\n"
        "    client->>server: 1. Received request to login as :username\n"
        "    Note over server: 2. Testing password for :username\n"
        "    Note over server: 3. Setting session for :username\n"
        "    Note over server: 4. Finish handling user login\n"
        "    server-->>client: 5. Login successful\n"
    )


def test_text_is_escaped_for_mermaid_and_svg() -> None:
    """Characters Mermaid or XML would parse come out as codes, and read back intact."""
    picture = diagram.from_flow(parse_flows(AWKWARD_FLOW)["r"])
    assert picture.participants == ("worker", "server", "mailer")
    text = diagram.to_mermaid(picture)
    assert 'worker->>server: 1. Ask "server"#59; wait' in text
    assert "Note over worker: 0. Start #lt;job#gt; & count :n" in text
    assert "server->>mailer: 2. Mail #35;token to :who" in text
    assert "mailer-->>worker: 3. Back on worker" in text

    svg = ET.fromstring(diagram.to_svg(picture))
    machines = [g.get("data-machine") for g in _groups(svg, "participant")]
    assert machines == ["worker", "server", "mailer"]
    labels = ["".join(g.itertext()) for g in svg.iter(f"{SVG}g") if g.get("data-line")]
    assert labels == [
        "0. Start <job> & count :n",
        '1. Ask "server"; wait',
        "2. Mail #token to :who",
        "3. Back on worker",
    ]
    assert [g.get("class") for g in svg.iter(f"{SVG}g") if g.get("data-line")] == [
        "note",
        "message call",
        "message call",
        "message back",
    ]


def test_machine_names_mermaid_cannot_take_get_an_alias() -> None:
    """A machine name Mermaid would misread (a keyword, a keyword's prefix, a dash) is aliased."""
    flows = parse_flows("r,one,end\nr,two,email-service\nr,three,parser\nr,four,web\n")
    text = diagram.to_mermaid(diagram.from_flow(flows["r"]))
    assert (
        "    participant m0 as end\n"
        "    participant m1 as email-service\n"
        "    participant m2 as parser\n"
        "    participant web\n"
    ) in text
    assert "m0->>m1: 1. two" in text
    assert "m2->>web: 3. four" in text


def test_run_diagram_marks_the_slowest_hop() -> None:
    """A run shows each step's machine, duration and hop time; the slowest row is marked."""
    flow = parse_flows(LOGIN_FLOW)["login"]
    steps = [
        Step(0, "User attempted login as ada and ***", "client", 100.000, 0.001),
        Step(1, "Received request to login as ada", "server", 100.101, 0.002),  # a 100 ms hop
        Step(2, "Testing password for ada", "server", 100.103, 0.020),
        Step(3, "Setting session for ada", "server", 100.123, 0.003),
        Step(4, "Finish handling user login", "server", 100.126, 0.001),
        Step(5, "Login successful", "client", 100.128, 0.001),
    ]
    picture = diagram.from_run(flow, steps, "0123456789abcdef")
    text = diagram.to_mermaid(picture)
    assert "    title login 01234567 (6 steps, 129.00 ms end to end)\n" in text
    assert (
        "    rect rgb(255, 224, 214)\n"
        "        client->>server: 1. Received request to login as ada"
        " (2.00 ms + 100.00 ms hop, slowest)\n"
        "    end\n"
    ) in text
    assert "    Note over server: 2. Testing password for ada (20.00 ms)\n" in text
    assert "server-->>client: 5. Login successful (1.00 ms + 1.00 ms hop)" in text
    svg = ET.fromstring(diagram.to_svg(picture))
    slow = [g.get("data-line") for g in svg.iter(f"{SVG}g") if g.get("data-slowest")]
    assert slow == ["1"]
    bars = {g.get("data-line"): "".join(g.itertext()) for g in _groups(svg, "duration")}
    assert bars == {
        "0": "1.00 ms",
        "1": "102.00 ms",
        "2": "20.00 ms",
        "3": "3.00 ms",
        "4": "1.00 ms",
        "5": "2.00 ms",
    }


def test_cli_writes_each_format(tmp_path: Path) -> None:
    """Mermaid on stdout by default (Markdown for several requests); -o picks the format."""
    config = REPO / "mesh.toml"
    one = run_mesh("diagram", "index", "-c", config)
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith("sequenceDiagram\n    title index\n")
    assert "server->>emailservice: 2. Sending sign in email" in one.stdout
    every = run_mesh("diagram", "-c", config)
    assert every.stdout.count("```mermaid\n") == 3
    svg_path = tmp_path / "login.svg"
    done = run_mesh("diagram", "login", "-c", config, "-o", svg_path)
    assert done.returncode == 0, done.stderr
    svg = ET.parse(svg_path).getroot()
    assert len(_groups(svg, "participant")) == 2
    page = tmp_path / "flows.html"
    done = run_mesh("diagram", "-c", config, "--format", "html", "-o", page)
    assert done.returncode == 0, done.stderr
    assert page.read_text(encoding="utf-8").count("<svg ") == 3
    bad = run_mesh("diagram", "logn", "-c", config)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "mesh diagram: no flow 'logn' in the flow files (known: login, feed, index)"
    ]


def test_readme_pictures_are_what_mesh_diagram_draws() -> None:
    """The README's Mermaid of the login flow is the current output of mesh diagram (the
    docs site draws its pictures with mesh diagram when it is built)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    drawn = run_mesh("diagram", "login", "-c", REPO / "mesh.toml")
    assert drawn.returncode == 0, drawn.stderr
    assert f"```mermaid\n{drawn.stdout}```\n" in readme


def test_html_renders_offline_in_headless_chromium(chromium: Chromium, tmp_path: Path) -> None:
    """Chromium renders the page with nothing fetched: one SVG participant per machine."""
    page = tmp_path / "flows.html"
    done = run_mesh("diagram", "-c", REPO / "mesh.toml", "--format", "html", "-o", page)
    assert done.returncode == 0, done.stderr
    dom = chromium.dump_dom(page.as_uri())
    assert dom.count("<svg ") == 3
    sections = dom.split("<section ")[1:]
    expected = {"login": 2, "feed": 2, "index": 2}
    for section, (request, machines) in zip(sections, expected.items(), strict=True):
        assert f'data-title="{request}"' in section
        assert section.count('class="participant"') == machines
    shot = chromium.screenshot(page.as_uri(), ARTIFACTS / "diagram-flows.png")
    print(f"screenshot: {shot}")
    # The standalone SVG is strict XML to a browser: a parse error would show instead.
    svg_path = tmp_path / "index.svg"
    run_mesh("diagram", "index", "-c", REPO / "mesh.toml", "-o", svg_path)
    svg_dom = chromium.dump_dom(svg_path.as_uri())
    assert "parsererror" not in svg_dom
    assert svg_dom.count('class="participant"') == 2


def test_call_draws_the_run(login_mesh: MeshDir, peers: Peers, tmp_path: Path) -> None:
    """mesh call --diagram draws the real run: its machines, rendered lines and durations."""
    peers.start(login_mesh, "server")
    out = tmp_path / "run.svg"
    done = run_mesh(
        "call", "login", "username=ada", f"password={password_of('ada')}",
        "-c", login_mesh.config, "--json", "--diagram", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    svg = ET.parse(out).getroot()
    assert [g.get("data-machine") for g in _groups(svg, "participant")] == ["client", "server"]
    rows = [g for g in svg.iter(f"{SVG}g") if g.get("data-line") and g.get("data-machine")]
    assert [(int(g.get("data-line", "")), g.get("data-machine")) for g in rows] == [
        (s["index"], s["machine"]) for s in result["steps"]
    ]
    assert "".join(rows[0].itertext()).startswith("0. User attempted login as ada and ***")
    assert password_of("ada") not in out.read_text(encoding="utf-8")
    assert len(_groups(svg, "duration")) == 6
    assert len([g for g in svg.iter(f"{SVG}g") if g.get("data-slowest")]) == 1
    mermaid = tmp_path / "run.mmd"
    again = run_mesh(
        "call", "login", "username=ada", f"password={password_of('ada')}",
        "-c", login_mesh.config, "--diagram", mermaid,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    text = mermaid.read_text(encoding="utf-8")
    assert text.startswith("sequenceDiagram\n    title login ")
    assert "client->>server: 1. Received request to login as ada (" in text


# -- any text makes a well-formed picture -----------------------------------------------------

#: Every code point, surrogates and noncharacters included: what a context value may hold
#: (a surrogate is what Python makes of bytes in argv that are not UTF-8).
ANY_CHAR = st.characters(codec=None, categories=None)
#: Text both XML 1.0 and HTML carry as it is: no control characters but tab and newline
#: (``\r`` a parser reads as ``\n``), no surrogates or noncharacters (``Cn``). It must read
#: back unchanged.
XML_CHAR = st.characters(exclude_categories=("Cc", "Cs", "Cn"), include_characters="\t\n")


def _run_picture(label: str, machine: str, title: str) -> diagram.Diagram:
    steps = [
        Step(0, label, machine, 100.0, 0.001),
        Step(1, "second " + label, "other", 100.002, 0.001),
    ]
    flow = parse_flows("r,first,a\nr,second,b\n")["r"]
    picture = diagram.from_run(flow, steps, "f1")
    return diagram.Diagram(title, picture.participants, picture.events)


def _svg_and_html(picture: diagram.Diagram) -> list[tuple[str, ET.Element]]:
    """The SVG file and the HTML page of ``picture``, each written as UTF-8 and parsed as XML."""
    out = []
    for fmt in ("svg", "html"):
        data = diagram.render([picture, picture], fmt, title=picture.title).encode("utf-8")
        out.append((fmt, ET.fromstring(data)))
    return out


@settings(max_examples=300, deadline=None)
@given(label=st.text(ANY_CHAR), machine=st.text(ANY_CHAR, min_size=1), title=st.text(ANY_CHAR))
def test_any_text_gives_well_formed_svg_and_html(label: str, machine: str, title: str) -> None:
    """A context value, a machine name or a title holding any character (a control character
    such as U+0001 or U+0000, a lone surrogate, a noncharacter) still makes an SVG and an HTML
    page that encode as UTF-8 and parse as XML: before, U+0001 in a value broke `--diagram`."""
    assume(machine != "other")
    for _, root in _svg_and_html(_run_picture(label, machine, title)):
        texts = "".join(root.itertext()) + "".join(
            v for el in root.iter() for v in el.attrib.values()
        )
        assert not any(
            (ord(c) < 0x20 and c not in "\t\n\r") or 0x7F <= ord(c) <= 0x9F for c in texts
        ), texts


@settings(max_examples=200, deadline=None)
@given(label=st.text(XML_CHAR, min_size=1))
def test_text_xml_can_carry_reads_back_unchanged(label: str) -> None:
    """Text XML can carry as it is reads back from the SVG and the page exactly as given."""
    for fmt, root in _svg_and_html(_run_picture(label, "a", label)):
        rows = [
            "".join(g.itertext())
            for g in root.iter()
            if g.tag.endswith("g") and g.get("data-line") == "0" and g.get("data-machine")
        ]
        assert rows and all(row.startswith(f"0. {label} (") for row in rows), (fmt, rows)


def test_call_diagram_with_control_characters_parses(
    login_mesh: MeshDir, peers: Peers, tmp_path: Path
) -> None:
    """mesh call --diagram of a run whose context holds U+0001 and U+0000 writes an SVG and an
    HTML page that parse; the characters show as visible escapes."""
    peers.start(login_mesh, "server")
    username = "ada\u0001x\u0000y"
    for name in ("run.svg", "run.html"):
        out = tmp_path / name
        done = run_mesh(
            "call", "login", f"username:={json.dumps(username)}",
            f"password:={json.dumps(password_of(username))}",
            "-c", login_mesh.config, "--diagram", out,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        root = ET.parse(out).getroot()
        labels = ["".join(g.itertext()) for g in root.iter() if g.get("data-line") == "1"]
        assert labels and labels[0].startswith(
            "1. Received request to login as ada\\x01x\\x00y ("
        ), labels
