"""The installable distribution: one version everywhere, install hints that install the mesh."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from support.cli import run_mesh

import mesh
from mesh import distribution

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_the_distribution_is_not_called_mesh() -> None:
    """`mesh` on the package index is another project: pyproject and the hints agree on ours."""
    assert PYPROJECT["project"]["name"] == distribution.DISTRIBUTION != "mesh"
    assert distribution.install_hint("tls") == "pip install 'structlog-mesh[tls]'"
    assert distribution.install_hint() == "pip install structlog-mesh"
    assert {"tls", "otel", "bench", "web", "docs", "dev"} <= set(
        PYPROJECT["project"]["optional-dependencies"]
    )


def test_version_has_one_source() -> None:
    """`mesh --version`, `mesh.__version__` and the metadata say the pyproject's version."""
    expected = PYPROJECT["project"]["version"]
    assert metadata.version("structlog-mesh") == expected
    assert mesh.__version__ == expected
    done = run_mesh("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"mesh {expected} (structlog-mesh)"


def test_a_source_checkout_reads_its_pyproject(tmp_path: Path) -> None:
    """Without installed metadata the checkout's pyproject.toml gives the version; someone
    else's pyproject, or none, gives a version that says it is unknown."""
    assert distribution._checkout_version(ROOT / "pyproject.toml") == mesh.__version__
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\nname = "other"\nversion = "9.9"\n', encoding="utf-8")
    assert distribution._checkout_version(other) == distribution.UNKNOWN
    assert distribution._checkout_version(tmp_path / "missing.toml") == distribution.UNKNOWN
