"""``mesh scaffold``: from a new flow file to running handlers on real peers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support.cli import ruff_as_a_user, run_mesh
from support.meshdir import MeshDir
from support.peers import Peers

from mesh.flowfile import parse_flows
from mesh.tools.scaffold import function_name, render_module

#: A request nobody has written code for: three machines, a hand back to the
#: address-less originator, a secret, and a value (account_id) first rendered
#: in the middle of the flow.
SIGNUP_FLOW = (
    "Request\tLog\tMachine\n"
    "signup\tSignup requested for :email with #password\tweb\n"
    "signup\tCreating account for :email\taccounts\n"
    "signup\tStoring password hash\taccounts\n"
    "signup\tSending welcome mail to :email for account :account_id\tmailer\n"
    "signup\tSignup done for :account_id\tweb\n"
)

RUFF = Path(sys.executable).parent / "ruff"


def _signup_mesh(mesh_dir: MeshDir) -> None:
    mesh_dir.flow(SIGNUP_FLOW)
    mesh_dir.write_config({"web": False, "accounts": True, "mailer": True})


def _ruff(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Ruff run from ``cwd``: it resolves first-party packages from there."""
    return subprocess.run(
        [str(RUFF), *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=cwd,
    )


def test_scaffolded_flow_runs_end_to_end(mesh_dir: MeshDir, peers: Peers, tmp_path: Path) -> None:
    """A new flow file, one scaffold command, and the flow runs across three real peers."""
    _signup_mesh(mesh_dir)
    out = mesh_dir.root / "svc_signup.py"
    done = run_mesh("scaffold", "signup", "-c", mesh_dir.config, "--out", out)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: 5 handlers for signup" in done.stdout
    assert 'next: add "svc_signup" to services' in done.stdout
    source = out.read_text(encoding="utf-8")
    assert source.count("@mesh.handler(") == 5
    assert source.count("# TODO") >= 5
    assert '"""signup line 1, on accounts.' in source
    # The placeholder the following line renders is passed on with "next".
    assert 'log.info("next", email=ctx["email"])' in source
    assert "# TODO: compute account_id: line 3 renders it." in source

    ruff_config = ruff_as_a_user(tmp_path)
    lint = _ruff("check", "--config", ruff_config, out, cwd=tmp_path)
    assert lint.returncode == 0, lint.stdout
    fmt = _ruff("format", "--check", "--config", ruff_config, out, cwd=tmp_path)
    assert fmt.returncode == 0, fmt.stdout

    mesh_dir.services.append("svc_signup")
    mesh_dir.write_config({"web": False, "accounts": True, "mailer": True})
    check = run_mesh("check", "-c", mesh_dir.config)
    assert check.returncode == 0, check.stderr
    assert "pass-through" not in check.stdout
    assert "svc_signup.signup_requested_for_email_with_password" in check.stdout

    peers.start(mesh_dir, "mailer")
    peers.start(mesh_dir, "accounts")  # after mailer, which it dials
    call = run_mesh(
        "call", "signup", "email=ada@example.org", "password=s3cret-pw", "-c", mesh_dir.config,
        "--json",
    )  # fmt: skip
    assert call.returncode == 0, call.stderr
    result = json.loads(call.stdout)
    assert [(s["index"], s["machine"]) for s in result["steps"]] == [
        (0, "web"),
        (1, "accounts"),
        (2, "accounts"),
        (3, "mailer"),
        (4, "web"),
    ]
    assert result["steps"][0]["line"] == "Signup requested for ada@example.org with ***"
    assert result["context"]["password"] == "***"
    assert "account_id" in result["context"]  # the TODO value, passed on by line 2's handler


def test_scaffold_never_overwrites_without_force(mesh_dir: MeshDir) -> None:
    """An existing module is left alone unless --force says otherwise."""
    _signup_mesh(mesh_dir)
    out = mesh_dir.root / "services" / "signup.py"
    out.parent.mkdir()
    out.write_text("# my own code\n", encoding="utf-8")
    refused = run_mesh("scaffold", "signup", "-c", mesh_dir.config)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"mesh scaffold: {out} exists; pass --force to overwrite it, or --out another path"
    ]
    assert out.read_text(encoding="utf-8") == "# my own code\n"
    forced = run_mesh("scaffold", "signup", "-c", mesh_dir.config, "--force")
    assert forced.returncode == 0, forced.stderr
    assert 'next: add "services.signup" to services' in forced.stdout
    assert out.read_text(encoding="utf-8").count("@mesh.handler(") == 5


def test_scaffold_missing_writes_only_lines_without_a_handler(mesh_dir: MeshDir) -> None:
    """--missing skips the lines a services module already handles, and mesh check agrees."""
    _signup_mesh(mesh_dir)
    mesh_dir.service(
        """
        import structlog
        import mesh

        log = structlog.get_logger()

        @mesh.handler("signup", "Creating account for :email")
        def create(ctx):
            log.info("next", account_id=7)
        """,
        name="svc_own_signup",
    )
    mesh_dir.write_config({"web": False, "accounts": True, "mailer": True})
    out = mesh_dir.root / "svc_rest.py"
    done = run_mesh("scaffold", "signup", "-c", mesh_dir.config, "--missing", "--out", out)
    assert done.returncode == 0, done.stderr
    source = out.read_text(encoding="utf-8")
    assert source.count("@mesh.handler(") == 4
    assert '"Creating account for :email"' not in source

    (mesh_dir.root / "services").mkdir()
    (mesh_dir.root / "services" / "signup.py").write_text("# handlers\n", encoding="utf-8")
    kept = run_mesh("scaffold", "signup", "-c", mesh_dir.config, "--missing", "--force")
    assert kept.returncode == 1
    assert kept.stderr.strip().endswith(
        "services/signup.py exists; with --missing, name a new module with --out"
    )
    assert (mesh_dir.root / "services" / "signup.py").read_text(encoding="utf-8") == "# handlers\n"
    mesh_dir.services.append("svc_rest")
    mesh_dir.write_config({"web": False, "accounts": True, "mailer": True})
    check = run_mesh("check", "-c", mesh_dir.config)
    assert check.returncode == 0, check.stderr
    assert "pass-through" not in check.stdout

    again = run_mesh("scaffold", "signup", "-c", mesh_dir.config, "--missing", "--out", "x.py")
    assert again.returncode == 0
    assert "every line of signup has a handler; nothing to write" in again.stdout


def test_scaffold_unknown_request_is_one_line(mesh_dir: MeshDir) -> None:
    """A request the flow files lack is named, with the ones they have."""
    _signup_mesh(mesh_dir)
    done = run_mesh("scaffold", "sinup", "-c", mesh_dir.config)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "mesh scaffold: no flow 'sinup' in the flow files (known: signup)"
    ]


def test_names_and_literals_survive_awkward_lines() -> None:
    """Quotes, backslashes, keywords and long texts still make valid, unique Python."""
    flows = parse_flows(
        'r,"Say ""hi"" \\ to :who",a\n'
        "r,class,a\n"
        "r,9 lives,b\n"
        f"r,{'very long line ' * 8}for :who,b\n"
    )
    source = render_module(flows["r"])
    compile(source, "<scaffold>", "exec")
    assert '@mesh.handler("r", "Say \\"hi\\" \\\\ to :who")' in source
    assert "def line_class(" in source
    assert "def line_9_lives(" in source
    assert all(len(line) <= 100 or "noqa: E501" in line for line in source.splitlines())
    assert function_name("Say hi", {"say_hi"}) == "say_hi_2"
    # A request name is free text too: quotes, a backslash, a line break.
    odd = parse_flows('"odd """""" \\ name\nx",one :a,m\n"odd """""" \\ name\nx",two,n\n')
    (name,) = odd
    assert name == 'odd """ \\ name\nx'
    compile(render_module(odd[name], source='we"ird.csv'), "<scaffold>", "exec")
