"""The tools around the flow file, for rows with conditions, fan-out and sub-flows:
``mesh check``, ``mesh diagram`` and ``mesh scaffold``, run as a user runs them."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from support.cli import run_mesh
from support.control import CHECKOUT_FLOW

from mesh.flowfile import parse_flows
from mesh.tools import diagram

SHOP = CHECKOUT_FLOW

CONFIG = """flow = "flow.tsv"
[machines]
web = ""
inventory = "127.0.0.1:1"
payments = "127.0.0.1:2"
mailer = "127.0.0.1:3"
"""


def project(tmp_path: Path, flows: str) -> Path:
    (tmp_path / "flow.tsv").write_text(flows, encoding="utf-8")
    (tmp_path / "mesh.toml").write_text(CONFIG, encoding="utf-8")
    return tmp_path


def test_check_prints_each_rows_control(tmp_path: Path) -> None:
    done = run_mesh("check", cwd=project(tmp_path, SHOP))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "control" in out
    assert "each items → items_results" in out
    assert "when charged; runs receipt" in out
    assert "when not charged" in out
    assert "fan-out" in out


def test_check_finds_recursion_without_a_condition(tmp_path: Path) -> None:
    flows = SHOP + "loop\tGoing round\tpayments\nloop\t@loop\tpayments\n"
    done = run_mesh("check", cwd=project(tmp_path, flows))
    assert done.returncode != 0
    assert "flow.tsv:10: loop → loop calls itself as a sub-flow with no condition" in done.stderr


def test_check_finds_a_sub_flow_that_cannot_reach_an_address_less_machine(
    tmp_path: Path,
) -> None:
    flows = SHOP + "refund\tRefunding :total\tpayments\nrefund\t@receipt\tpayments\n"
    done = run_mesh("check", cwd=project(tmp_path, flows))
    assert done.returncode != 0
    assert 'flow.tsv:10: refund line 1 "@receipt" runs receipt on payments' in done.stderr
    assert "runs on web, which has no address" in done.stderr


def test_check_finds_a_fan_out_to_an_address_less_machine(tmp_path: Path) -> None:
    """An Each row of web (no address) reached from payments: only web can start it."""
    flows = "Request\tLog\tMachine\tEach\nr\tStart\tpayments\nr\tEach item\tweb\titems\n"
    done = run_mesh("check", cwd=project(tmp_path, flows))
    assert "r reaches web only when started by web" in done.stderr


def test_scaffold_reads_the_item_and_skips_sub_flow_rows(tmp_path: Path) -> None:
    root = project(tmp_path, SHOP)
    done = run_mesh("scaffold", "checkout", "--out", "svc.py", cwd=root)
    assert done.returncode == 0, done.stderr
    assert "4 handlers for checkout" in done.stdout
    text = (root / "svc.py").read_text(encoding="utf-8")
    assert 'item = ctx["item"]' in text
    assert "@receipt" not in text
    assert 'ctx["items_results"]' in text
    compile(text, "svc.py", "exec")


def test_mermaid_draws_conditions_fan_out_and_sub_flows() -> None:
    flow = parse_flows(SHOP)["checkout"]
    text = diagram.to_mermaid(diagram.from_flow(flow))
    assert (
        "    loop each item of items\n        web->>inventory: 1. Reserving :sku\n    end\n"
    ) in text
    assert "    alt charged\n" in text
    assert "(calls receipt: its own diagram)" in text
    assert (
        "    else not charged\n        Note over web: 4. Payment declined for :user\n    end\n"
        in (text)
    )
    lone = parse_flows("Request,Log,Machine,When\nr,a,x\nr,b,y,ok\n")["r"]
    assert "    opt ok\n        x->>y: 1. b\n    end\n" in diagram.to_mermaid(
        diagram.from_flow(lone)
    )
    svg = diagram.to_svg(diagram.from_flow(flow))
    assert "[when charged]" in svg and "[each item of items]" in svg
    tree = ET.fromstring(svg)
    frames = {
        g.get("data-line"): "".join(g.itertext())
        for g in tree.iter("{http://www.w3.org/2000/svg}g")
        if g.get("class") == "frame"
    }
    assert frames == {"1": "loop items", "3": "opt charged", "4": "opt not charged"}
