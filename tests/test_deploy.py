"""``mesh deploy k8s``: manifests checked offline against Kubernetes' own schemas, the config
the pods read checked by ``mesh check``, and ``mesh health``, the probe TLS pods use.

No cluster and no Docker engine here: what can be checked without them is that every object
is valid for the API server (strict schemas: no unknown or misspelt field), that the
ConfigMap carries the flow files byte for byte, that ``mesh.toml`` as rewritten for the
cluster loads and passes ``mesh check``, that no secret is written anywhere, and that the
probe command works against real peers.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from support.cli import run_mesh
from support.meshdir import LOGIN_FLOW, LOGIN_SERVICE, MeshDir
from support.peers import Peers

from mesh.config import load_config
from mesh.tools import deploy
from mesh.tools.certs import make_certs

#: gRPC probes are GA from 1.27; the newest schemas the package has, too.
VERSIONS = ("1.27", kubernetes_validate.latest_version())
TOKEN = "tok-" + "5e1f0a" * 5
#: A flow file YAML text could not carry as is: a byte-order mark and CRLF line ends.
INDEX_CSV = (
    "\ufeffRequest,Log,Machine\r\n"
    "index,Checking if signed in,server\r\n"
    "index,Sending sign in email,emailservice\r\n"
).encode()
MTLS = """
[tls]
ca = "certs/ca.pem"
cert = "certs/{machine}.pem"
key = "certs/{machine}.key"
require_client_cert = true
"""


def project(mesh_dir: MeshDir, *, tls: bool) -> MeshDir:
    """login (client, server at 2 replicas) and index (server, emailservice), a token, grace 7,
    and with ``tls`` the mutual-TLS table and certificates."""
    mesh_dir.flow(LOGIN_FLOW)
    (mesh_dir.root / "index.csv").write_bytes(INDEX_CSV)
    mesh_dir.service(LOGIN_SERVICE)
    (mesh_dir.root / "mesh.token").write_text(TOKEN + "\n")
    extra = 'grace = 7\ntoken_file = "mesh.token"\n' + (MTLS if tls else "")
    if tls:
        make_certs(mesh_dir.root / "certs", ["server", "emailservice", "client", "mesh-call"])
    mesh_dir.write_config(
        {"client": False, "server": 2, "emailservice": True},
        flow=["flow.tsv", "index.csv"],
        extra=extra,
    )
    mesh_dir.fix_ports()
    return mesh_dir


def generate(mesh_dir: MeshDir, out: Path) -> dict[str, list[dict[str, Any]]]:
    done = run_mesh(
        "deploy", "k8s", "-c", mesh_dir.config, "-o", out,
        "--namespace", "shop", "--image", "registry.example/shop:1.0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "kubectl apply -f" in done.stdout
    return {
        p.name: [d for d in yaml.safe_load_all(p.read_text(encoding="utf-8")) if d]
        for p in sorted(out.glob("*.yaml"))
    }


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "mutual-tls"])
def test_manifests_are_valid_and_carry_the_mesh(
    mesh_dir: MeshDir, tmp_path: Path, tls: bool
) -> None:
    """Every object validates (strict) for Kubernetes 1.27 and the newest schemas; a
    Deployment per machine with an address (replicas from the config) behind a headless
    Service; probes on the mesh's health service (gRPC, or `mesh health` over TLS); the
    stop grace from the config; Secrets only referenced."""
    project(mesh_dir, tls=tls)
    out = tmp_path / "k8s"
    docs = generate(mesh_dir, out)

    objects = [d for found in docs.values() for d in found]
    for doc in objects:
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in objects)
    assert kinds == [
        ("ConfigMap", "mesh-config"),
        ("Deployment", "emailservice"),
        ("Deployment", "server"),
        ("Namespace", "shop"),
        ("Service", "emailservice"),
        ("Service", "server"),
    ]
    config = load_config(mesh_dir.config)
    by = {(d["kind"], d["metadata"]["name"]): d for d in objects}
    for name, replicas in (("server", 2), ("emailservice", 1)):
        port = int(config.machines[name].binds[0].rpartition(":")[2])
        service = by["Service", name]["spec"]
        assert service["clusterIP"] == "None"
        assert service["ports"][0]["port"] == port
        spec = by["Deployment", name]["spec"]
        assert spec["replicas"] == replicas
        pod = spec["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == 7 + deploy.STOP_MARGIN
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        assert container["image"] == "registry.example/shop:1.0"
        assert container["args"] == ["peer", name, "-c", "/etc/mesh/config/mesh.toml", "--json"]
        assert container["ports"][0]["containerPort"] == port
        for probe in (container["readinessProbe"], container["livenessProbe"]):
            if tls:
                assert probe["exec"]["command"][:3] == ["mesh", "health", name]
            else:
                assert probe["grpc"] == {"port": port, "service": "mesh.v1.Mesh"}
        env = {e["name"]: e for e in container["env"]}
        assert env["MESH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "mesh-token",
            "key": "token",
        }
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["config"]["configMap"]["name"] == "mesh-config"
        if tls:
            secrets = [s["secret"]["name"] for s in volumes["tls"]["projected"]["sources"]]
            assert secrets == ["mesh-ca", f"{name}-tls"]
        else:
            assert "tls" not in volumes

    written = "".join(p.read_text(encoding="utf-8") for p in out.iterdir())
    assert TOKEN not in written
    if tls:
        assert "PRIVATE KEY" not in written
        assert "kubectl create secret tls server-tls -n shop" in (out / "README.md").read_text()


def test_the_pods_config_passes_mesh_check(mesh_dir: MeshDir, tmp_path: Path) -> None:
    """The ConfigMap's files, laid out as in a pod, load with each machine dialled through
    its Service and bound on 0.0.0.0, and pass `mesh check` (services from the project, as
    the image's PYTHONPATH has them); the flow files are the same bytes, so the digests
    every peer compares are the ones the originals give."""
    project(mesh_dir, tls=True)
    docs = generate(mesh_dir, tmp_path / "k8s")
    (configmap,) = docs["01-configmap.yaml"]
    pod = tmp_path / "etc" / "mesh" / "config"
    pod.mkdir(parents=True)
    for key, text in configmap["data"].items():
        (pod / key).write_bytes(text.encode("utf-8"))
    for key, data in configmap.get("binaryData", {}).items():
        (pod / key).write_bytes(base64.b64decode(data))
    assert (pod / "flow.tsv").read_bytes() == (mesh_dir.root / "flow.tsv").read_bytes()
    assert (pod / "index.csv").read_bytes() == INDEX_CSV
    assert "index.csv" in configmap["binaryData"]

    original = load_config(mesh_dir.config)
    rewritten = load_config(pod / "mesh.toml")
    for name in ("server", "emailservice"):
        port = original.machines[name].binds[0].rpartition(":")[2]
        machine = rewritten.machines[name]
        assert machine.address == f"dns:///{name}.shop.svc.cluster.local:{port}"
        assert machine.binds == (f"0.0.0.0:{port}",)
    assert rewritten.machines["client"].address == ""
    assert rewritten.grace == 7
    assert rewritten.token is None  # $MESH_TOKEN in the pod, from the Secret
    assert rewritten.tls.of("server").cert == Path("/etc/mesh/tls/tls.crt")
    assert {f.name: f.digest for f in rewritten.flows.flows.values()} == {
        f.name: f.digest for f in original.flows.flows.values()
    }
    env = {**os.environ, "PYTHONPATH": str(mesh_dir.root)}
    check = run_mesh("check", "-c", pod / "mesh.toml", env=env)
    assert check.returncode == 0, check.stderr
    assert "ok: 3 requests, 3 machines, 2 handlers" in check.stdout


def test_dockerfile_installs_the_wheel_and_runs_as_a_user(
    mesh_dir: MeshDir, tmp_path: Path
) -> None:
    """The image: a slim Python, the mesh from its wheel, the services' module, not root;
    its ignore file keeps keys and tokens out of the build context."""
    project(mesh_dir, tls=False)
    out = tmp_path / "k8s"
    generate(mesh_dir, out)
    dockerfile = (out / "Dockerfile").read_text(encoding="utf-8").splitlines()
    assert [line for line in dockerfile if line.startswith("FROM ")] == ["FROM python:3.11-slim"]
    assert any(
        line.startswith("RUN pip install /tmp/wheels/structlog_mesh-") for line in dockerfile
    )
    module = mesh_dir.services[0]
    assert f"COPY --chown=10001:10001 {module}.py /app/{module}.py" in dockerfile
    assert "USER 10001:10001" in dockerfile
    ignored = (out / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    assert {"**/*.key", "**/*.token"} <= set(ignored)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--namespace", "Shop_1"), "--namespace cannot be a Kubernetes name"),
        (("--image", "my image"), "--image 'my image' is not an image reference"),
    ],
)
def test_names_kubernetes_cannot_take(
    login_mesh: MeshDir, tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    """A namespace or image Kubernetes would refuse is one line, before anything is written."""
    done = run_mesh("deploy", "k8s", "-c", login_mesh.config, "-o", tmp_path / "k8s", *change)
    assert done.returncode == 1
    assert done.stderr.startswith(f"mesh deploy: {message}")
    assert not (tmp_path / "k8s").exists()


def test_mesh_health_is_a_probe(login_mesh: MeshDir, peers: Peers) -> None:
    """`mesh health MACHINE`: exit 0 and SERVING from a running peer; exit 1 in one line
    when nothing serves there."""
    server = peers.start(login_mesh, "server")
    ok = run_mesh("health", "server", "-c", login_mesh.config, "--address", server.address)
    assert (ok.returncode, ok.stdout) == (0, f"server at {server.address}: SERVING\n")
    server.stop()
    down = run_mesh(
        "health", "server", "-c", login_mesh.config, "--address", server.address, "--timeout", "1"
    )
    assert down.returncode == 1
    assert down.stderr == (
        f"mesh health: server at {server.address} is not serving (no SERVING answer in 1 s)\n"
    )


def test_mesh_health_speaks_tls(login_mesh: MeshDir, dev_certs: Path, peers: Peers) -> None:
    """Over mutual TLS, which the kubelet's own gRPC probe cannot speak, `mesh health`
    dials with the machine's own certificate and gets SERVING."""
    login_mesh.write_config({"client": False, "server": True}, extra=MTLS)
    server = peers.start(login_mesh, "server", tls=True)
    ok = run_mesh("health", "server", "-c", login_mesh.config, "--address", server.address)
    assert ok.returncode == 0, ok.stderr
