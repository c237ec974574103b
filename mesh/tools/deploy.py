"""``mesh deploy k8s``: Kubernetes manifests and a Dockerfile, generated from ``mesh.toml``.

What it writes, for a config and a namespace NS:

* one ConfigMap with ``mesh.toml`` and every flow file, mounted in every pod, so every peer
  reads the same bytes and the flows' digests match. Flow files are kept byte for byte
  (``binaryData`` when YAML text could not carry them exactly);
* per machine with an address, a headless Service and a Deployment of ``replicas`` pods
  running ``mesh peer NAME``. The ``mesh.toml`` in the ConfigMap dials each machine as
  ``dns:///NAME.NS.svc.cluster.local:PORT``: gRPC resolves every pod behind the headless
  Service and spreads calls over them (``round_robin``, with health checking), and each
  pod binds ``0.0.0.0:PORT``;
* readiness and liveness probes on the mesh's gRPC health service: Kubernetes' own gRPC
  probe in plaintext, ``mesh health`` (an exec probe) over TLS, which the kubelet's probe
  cannot speak; ``terminationGracePeriodSeconds`` is the config's ``grace`` plus five
  seconds, the time a peer takes to stop after SIGTERM (see the README's Reliability);
* Secrets *referenced*, never written: ``mesh-token`` (key ``token``, as ``$MESH_TOKEN``)
  when the config has a token, ``mesh-ca`` (``ca.pem``) and ``NAME-tls`` (``tls.crt``,
  ``tls.key``) per machine when it has ``[tls]``;
* a ``Dockerfile`` for the project's image: a slim Python base, the mesh installed from its
  wheel, the services' modules, a non-root user.

Pure but for :func:`write`: :func:`k8s` returns the files' texts. The YAML is written here
(the mesh does not depend on a YAML library): block mappings and lists, strings quoted
whenever plain YAML could read them as something else.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import re
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.addresses import host_port
from mesh.config import Config
from mesh.distribution import DISTRIBUTION, version
from mesh.errors import MeshError

__all__ = ["CONFIG_DIR", "Deployment", "k8s", "to_yaml", "write"]

#: Where the ConfigMap is mounted in every pod; ``mesh.toml`` is in it.
CONFIG_DIR = "/etc/mesh/config"
#: Where a pod's TLS files are mounted: the CA and its own certificate and key.
TLS_DIR = "/etc/mesh/tls"
#: A writable folder for the services' own data ($MESH_DATA_DIR), an emptyDir.
DATA_DIR = "/var/lib/mesh"
CONFIG_MAP = "mesh-config"
_CA_ITEM = {"key": "ca.pem", "path": "ca.pem"}
TOKEN_SECRET = "mesh-token"
CA_SECRET = "mesh-ca"
#: The user the image runs as (and the pods require), not root.
USER_ID = 10001
#: Seconds a peer takes, beyond ``grace``, from SIGTERM to its exit.
STOP_MARGIN = 5

_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_KEY_CHARS = re.compile(r"[^-._a-zA-Z0-9]")


@dataclass(frozen=True, slots=True)
class Deployment:
    """What ``mesh deploy k8s`` writes: file name → text, and what the user does next."""

    files: Mapping[str, str]
    #: The rewritten ``mesh.toml`` the pods read (also inside the ConfigMap).
    config: str
    #: The flow files as the ConfigMap holds them: key → the file's bytes.
    flows: Mapping[str, bytes]
    #: The commands that create the Secrets the manifests reference, then build and apply.
    steps: tuple[str, ...]


def k8s(config: Config, *, namespace: str = "default", image: str | None = None) -> Deployment:
    """Manifests for ``config`` in ``namespace``; pods run ``image`` (default: the project
    folder's name, tag ``latest``). Raises MeshError for a name Kubernetes cannot take."""
    _check_label(namespace, "--namespace")
    project = _project_name(config.root)
    image = image or f"{project}:latest"
    if not image.strip() or any(c.isspace() for c in image):
        raise MeshError(f"--image {image!r} is not an image reference")
    raw = _raw(config)
    served = [m for m in config.machines.values() if m.address]
    if not served:
        raise MeshError(f"{config.path}: no machine has an address, so there is no peer to deploy")
    for machine in served:
        _check_label(machine.name, f"machine {machine.name!r}")
    ports = _ports(config)
    flows = _flow_keys(config)
    tls = config.tls.enabled
    token = config.token is not None
    text = _config_text(raw, config, namespace, ports, flows)
    configmap = _configmap(namespace, project, text, flows)
    digest = hashlib.sha256(to_yaml(configmap).encode()).hexdigest()[:16]

    files: dict[str, str] = {}
    if namespace != "default":
        files["00-namespace.yaml"] = to_yaml(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
        )
    files["01-configmap.yaml"] = _header(config) + to_yaml(configmap)
    for machine in served:
        labels = _labels(machine.name, project)
        service = _service(machine.name, namespace, labels, ports[machine.name])
        deployment = _deployment(
            machine.name,
            namespace,
            labels,
            image=image,
            port=ports[machine.name],
            replicas=len(machine.binds),
            grace=config.grace,
            digest=digest,
            tls=tls,
            token=token,
        )
        files[f"10-{machine.name}.yaml"] = (
            _header(config) + to_yaml(service) + "---\n" + to_yaml(deployment)
        )
    files["Dockerfile"] = _dockerfile(config)
    files["Dockerfile.dockerignore"] = _DOCKERIGNORE
    steps = _steps(config, served, namespace, image, tls=tls, token=token)
    files["README.md"] = _readme(config, namespace, steps)
    return Deployment(files, text, flows, tuple(steps))


def write(deployment: Deployment, out: str | os.PathLike[str]) -> list[Path]:
    """Write every file into ``out`` (made if missing), replacing earlier ones: they are
    generated, and regenerating after a change to ``mesh.toml`` is the way to update them."""
    folder = Path(out)
    written = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in deployment.files.items():
            path = folder / name
            path.write_text(text, encoding="utf-8")
            written.append(path)
    except OSError as exc:
        raise MeshError(f"cannot write {exc.filename or folder}: {exc.strerror or exc}") from None
    return written


# --- the config the pods read ---------------------------------------------------------------


def _raw(config: Config) -> dict[str, Any]:
    """The config as its author wrote it (load_config has checked it already)."""
    with config.path.open("rb") as file:
        return tomllib.load(file)


def _ports(config: Config) -> dict[str, int]:
    """Each served machine's port: its first bind's, made unique if two machines shared one
    on different hosts (in the cluster every pod binds 0.0.0.0, and mesh.toml says so)."""
    ports: dict[str, int] = {}
    for machine in config.machines.values():
        if not machine.address:
            continue
        port = host_port(machine.binds[0])[1]
        while port in ports.values():
            port = port + 1 if port < 65535 else 1024
        ports[machine.name] = port
    return ports


def _flow_keys(config: Config) -> dict[str, bytes]:
    """ConfigMap key → bytes of each flow file, in the config's order (a key is a file name
    Kubernetes accepts; two files of one name get numbered)."""
    keys: dict[str, bytes] = {}
    for n, path in enumerate(config.flows.paths, 1):
        keys[_unique_key(Path(path).name, n, keys)] = Path(path).read_bytes()
    return keys


def _unique_key(name: str, n: int, taken: Mapping[str, bytes]) -> str:
    key = _KEY_CHARS.sub("-", name).strip(".") or f"flow-{n}"
    if key == "mesh.toml" or key in taken:
        stem, dot, ext = key.rpartition(".")
        key = f"{stem}-{n}.{ext}" if dot else f"{key}-{n}"
    return key


def _config_text(
    raw: Mapping[str, Any],
    config: Config,
    namespace: str,
    ports: Mapping[str, int],
    flows: Mapping[str, bytes],
) -> str:
    """``mesh.toml`` as the pods read it: the same settings, the flow files beside it, each
    machine dialled through its Service, TLS files where the Secrets are mounted, the token
    from the environment."""
    top = {
        k: v
        for k, v in raw.items()
        if k not in ("flow", "machines", "tls", "token_file") and not isinstance(v, dict)
    }
    lines = [
        f"# Generated by mesh deploy k8s from {config.path.name}: regenerate, do not edit.",
        f"flow = {_toml(list(flows))}",
        *(f"{k} = {_toml(v)}" for k, v in top.items()),
    ]
    base_tls = raw.get("tls")
    if isinstance(base_tls, dict):
        lines += [
            "",
            "[tls]  # the pod's own files: the mesh-ca and NAME-tls Secrets",
            f'ca = "{TLS_DIR}/ca.pem"',
            f'cert = "{TLS_DIR}/tls.crt"',
            f'key = "{TLS_DIR}/tls.key"',
        ]
        if "require_client_cert" in base_tls:
            lines.append(f"require_client_cert = {_toml(base_tls['require_client_cert'])}")
    lines += ["", "[machines]"]
    for machine in config.machines.values():
        if not machine.address:
            lines.append(f"{_toml_key(machine.name)} = {_toml('')}")
    for machine in config.machines.values():
        if not machine.address:
            continue
        port = ports[machine.name]
        lines += [
            "",
            f"[machines.{_toml_key(machine.name)}]",
            f'address = "dns:///{machine.name}.{namespace}.svc.cluster.local:{port}"',
            f'listen = "0.0.0.0:{port}"',
        ]
        own = raw["machines"].get(machine.name)
        own_tls = own.get("tls") if isinstance(own, dict) else None
        if isinstance(own_tls, dict) and "require_client_cert" in own_tls:
            lines += [
                f"[machines.{_toml_key(machine.name)}.tls]",
                f"require_client_cert = {_toml(own_tls['require_client_cert'])}",
            ]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    """A TOML value: strings, numbers, booleans and lists of them, as in mesh.toml."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return _quoted(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise MeshError(f"mesh deploy cannot copy a {type(value).__name__} value into mesh.toml")


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _quoted(name)


# --- manifests -----------------------------------------------------------------------------


def _labels(machine: str, project: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": machine,
        "app.kubernetes.io/component": "mesh-peer",
        "app.kubernetes.io/part-of": project,
    }


def _configmap(
    namespace: str, project: str, text: str, flows: Mapping[str, bytes]
) -> dict[str, Any]:
    data: dict[str, str] = {"mesh.toml": text}
    binary: dict[str, str] = {}
    for key, content in flows.items():
        as_text = _block_safe(content)
        if as_text is None:
            binary[key] = base64.b64encode(content).decode("ascii")
        else:
            data[key] = as_text
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CONFIG_MAP,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": project},
        },
        "data": data,
    }
    if binary:
        body["binaryData"] = binary
    return body


def _service(name: str, namespace: str, labels: dict[str, str], port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            # Headless: DNS answers with every ready pod, and gRPC balances over them itself
            # (a ClusterIP would pin each long-lived HTTP/2 connection to one pod).
            "clusterIP": "None",
            "selector": _selector(labels),
            "ports": [{"name": "grpc", "port": port, "targetPort": "grpc", "protocol": "TCP"}],
        },
    }


def _selector(labels: Mapping[str, str]) -> dict[str, str]:
    return {k: labels[k] for k in ("app.kubernetes.io/name", "app.kubernetes.io/part-of")}


def _deployment(
    name: str,
    namespace: str,
    labels: dict[str, str],
    *,
    image: str,
    port: int,
    replicas: int,
    grace: float,
    digest: str,
    tls: bool,
    token: bool,
) -> dict[str, Any]:
    config_file = f"{CONFIG_DIR}/mesh.toml"
    probe: dict[str, Any]
    if tls:
        # The kubelet's gRPC probe speaks plaintext only; mesh health dials with the
        # machine's own certificate, as mesh up does.
        probe = {
            "exec": {
                "command": ["mesh", "health", name, "-c", config_file, "--timeout", "3"],
            }
        }
    else:
        probe = {"grpc": {"port": port, "service": "mesh.v1.Mesh"}}
    env: list[dict[str, Any]] = [{"name": "MESH_DATA_DIR", "value": DATA_DIR}]
    if token:
        env.append(
            {
                "name": "MESH_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": TOKEN_SECRET, "key": "token"}},
            }
        )
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "data", "mountPath": DATA_DIR},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": CONFIG_MAP}},
        {"name": "data", "emptyDir": {}},
    ]
    if tls:
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        volumes.append(
            {
                "name": "tls",
                "projected": {
                    "defaultMode": 0o440,
                    "sources": [
                        {
                            "secret": {
                                "name": CA_SECRET,
                                "items": [{"key": "ca.pem", "path": "ca.pem"}],
                            }
                        },
                        {"secret": {"name": f"{name}-tls"}},
                    ],
                },
            }
        )
    container: dict[str, Any] = {
        "name": "peer",
        "image": image,
        "args": ["peer", name, "-c", config_file, "--json"],
        "ports": [{"name": "grpc", "containerPort": port, "protocol": "TCP"}],
        "env": env,
        "readinessProbe": {**probe, "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {
            **probe,
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": _selector(labels)},
            "template": {
                "metadata": {
                    "labels": labels,
                    # A changed mesh.toml or flow file changes this, so the pods roll.
                    "annotations": {"mesh/config-digest": digest},
                },
                "spec": {
                    # SIGTERM: NOT_SERVING, steps in progress get `grace`, then the peer
                    # exits. Callers watch health, so no preStop delay is needed.
                    "terminationGracePeriodSeconds": math.ceil(grace) + STOP_MARGIN,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": USER_ID,
                        "runAsGroup": USER_ID,
                        "fsGroup": USER_ID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


# --- the image -----------------------------------------------------------------------------


def _dockerfile(config: Config) -> str:
    wheel = f"{DISTRIBUTION.replace('-', '_')}-{version()}-py3-none-any.whl"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    copies = [
        f"COPY --chown={USER_ID}:{USER_ID} {src} /app/{src}" for src in _service_sources(config)
    ]
    return f"""\
# The image of this mesh's peers, written by mesh deploy k8s. Build it from the folder of
# mesh.toml, with the {DISTRIBUTION} wheel in dist/ (from the package index:
# pip download --no-deps --dest dist {DISTRIBUTION}=={version()}):
#   docker build -f {{this folder}}/Dockerfile -t IMAGE .
# mesh.toml and the flow files come from the ConfigMap, not from the image.
FROM python:{python}-slim

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 \\
    PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONPATH=/app

RUN groupadd --gid {USER_ID} mesh && useradd --uid {USER_ID} --gid {USER_ID} --no-create-home mesh

COPY dist/{wheel} /tmp/wheels/
RUN pip install /tmp/wheels/{wheel} && rm -rf /tmp/wheels
# Add your services' own dependencies here, e.g. RUN pip install -r requirements.txt

WORKDIR /app
# The services' modules (mesh.toml's services = [...]).
{chr(10).join(copies)}

USER {USER_ID}:{USER_ID}
ENTRYPOINT ["mesh"]
CMD ["--help"]
"""


def _service_sources(config: Config) -> list[str]:
    """The top-level module or package of each service, as a path in the project folder."""
    sources: list[str] = []
    for module in config.services:
        top = module.partition(".")[0]
        if (config.root / top).is_dir():
            source = f"{top}/"
        elif (config.root / f"{top}.py").is_file():
            source = f"{top}.py"
        else:
            raise MeshError(
                f"{config.path}: services: {module!r} is not a module in {config.root}"
                " (the image copies the services from there)"
            )
        if source not in sources:
            sources.append(source)
    if not sources:
        raise MeshError(f"{config.path}: services is empty, so the image would have no handlers")
    return sources


_DOCKERIGNORE = """\
# Never in the image: secrets (they come from Kubernetes Secrets), caches, local state.
**/*.key
**/*.pem
**/*.token
**/__pycache__
**/.mesh-data
**/*.log
.git
.venv
"""


# --- what to do next -------------------------------------------------------------------------


def _steps(
    config: Config,
    served: Sequence[Any],
    namespace: str,
    image: str,
    *,
    tls: bool,
    token: bool,
) -> list[str]:
    ns = f" -n {namespace}" if namespace != "default" else ""
    steps = [
        f"pip download --no-deps --dest dist {DISTRIBUTION}=={version()}",
        f"docker build -f OUT/Dockerfile -t {image} . && docker push {image}",
    ]
    if namespace != "default":
        steps.append("kubectl apply -f OUT/00-namespace.yaml")
    if token:
        steps.append(
            f"kubectl create secret generic {TOKEN_SECRET}{ns} --from-file=token=TOKEN_FILE"
        )
    if tls:
        steps.append(f"kubectl create secret generic {CA_SECRET}{ns} --from-file=ca.pem=CA_FILE")
        steps += [
            f"kubectl create secret tls {m.name}-tls{ns} --cert={m.name.upper()}_CERT"
            f" --key={m.name.upper()}_KEY"
            for m in served
        ]
    steps.append("kubectl apply -f OUT/")
    return steps


def _readme(config: Config, namespace: str, steps: Sequence[str]) -> str:
    listed = "\n".join(steps)
    return f"""\
# Kubernetes manifests for {config.path.name}

Written by `mesh deploy k8s` ({DISTRIBUTION} {version()}); regenerate them after changing
mesh.toml or a flow file. Secrets are referenced, never written here: create them first.
From the folder of mesh.toml (OUT is this folder):

```sh
{listed}
kubectl{" -n " + namespace if namespace != "default" else ""} rollout status deployment
```
"""


def _header(config: Config) -> str:
    return f"# Generated by mesh deploy k8s from {config.path.name}; regenerate, do not edit.\n"


# --- names ---------------------------------------------------------------------------------


def _check_label(name: str, what: str) -> None:
    if not _DNS_LABEL.fullmatch(name):
        raise MeshError(
            f"{what} cannot be a Kubernetes name: use lower-case letters, digits and '-',"
            " starting with a letter, at most 63 characters"
        )


def _project_name(root: Path) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", root.name.lower()).strip("-")
    return name[:63].rstrip("-") or "mesh"


# --- YAML ----------------------------------------------------------------------------------


def to_yaml(value: Any) -> str:
    """``value`` (dicts, lists, strings, ints, bools) as a YAML document."""
    return "\n".join(_yaml_lines(value, 0)) + "\n"


_PLAIN = re.compile(r"[A-Za-z_/][-A-Za-z0-9_./:]*")
_RESERVED = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"})


def _yaml_lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return [pad + "{}"]
        out = []
        for key, item in value.items():
            head = f"{pad}{_scalar(str(key))}:"
            if isinstance(item, str) and "\n" in item:
                out += [head + " |" + ("-" if not item.endswith("\n") else "")]
                out += [f"{pad}  {line}" if line else "" for line in item.rstrip("\n").split("\n")]
            elif isinstance(item, dict | list) and item:
                out.append(head)
                out += _yaml_lines(item, indent + 2)
            else:
                out.append(f"{head} {_inline(item)}")
        return out
    if isinstance(value, list):
        if not value:
            return [pad + "[]"]
        out = []
        for item in value:
            if isinstance(item, dict | list) and item:
                inner = _yaml_lines(item, indent + 2)
                out.append(f"{pad}- {inner[0][indent + 2 :]}")
                out += inner[1:]
            else:
                out.append(f"{pad}- {_inline(item)}")
        return out
    return [pad + _inline(value)]


def _inline(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict | list):
        return "{}" if isinstance(value, dict) else "[]"
    return _scalar(str(value))


def _scalar(text: str) -> str:
    """A string as YAML reads it back: plain when nothing else can be read into it."""
    if _PLAIN.fullmatch(text) and text.lower() not in _RESERVED and not text.endswith(":"):
        return text
    return _quoted(text)


def _quoted(text: str) -> str:
    """A double-quoted string, valid in both YAML and TOML: every character that is not
    printable escaped, so nothing is folded, dropped or changed on the way."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or 0x7F <= code <= 0x9F or code in (0x2028, 0x2029, 0xFEFF):
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise MeshError(f"{text!r} holds a lone surrogate, which no file can carry")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _block_safe(content: bytes) -> str | None:
    """``content`` as text a YAML literal block gives back byte for byte, else None."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.endswith("\n") or text.endswith("\n\n") or text.startswith((" ", "\n", "\ufeff")):
        return None
    for ch in text:
        code = ord(ch)
        if ch not in "\n\t" and (
            code < 0x20 or 0x7F <= code <= 0x9F or code in (0x2028, 0x2029, 0xFEFF)
        ):
            return None
    # Trailing blanks on a line are kept by a literal block, but a line of blanks only
    # would be read as indentation: send such a file as bytes.
    if any(line and not line.strip(" \t") for line in text.split("\n")):
        return None
    return text
