"""Tools around a mesh that are not its runtime: none of them runs a flow.

* :mod:`mesh.tools.scaffold`: a flow file's request → a services module of handler stubs.
* :mod:`mesh.tools.diagram`: flows and runs → Mermaid, SVG, HTML sequence diagrams.
* :mod:`mesh.tools.transcript`: peers' JSON logs → one checked transcript per flow.
* :mod:`mesh.tools.certs`: a development CA and a certificate per machine (``mesh[tls]``).

The commands that use them (``mesh scaffold``, ``diagram``, ``logs``, ``certs``) are in
:mod:`mesh.cli`.
"""
