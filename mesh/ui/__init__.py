"""``mesh ui``: a live web page of the mesh, its machines, its flow file and its durable flows.

Served by :func:`mesh.ui.server.serve` (the ``ui`` extra: Starlette and uvicorn). The
modules, by what they hold: :mod:`~mesh.ui.model` (what the pages show, pure),
:mod:`~mesh.ui.gather` (asking the peers), :mod:`~mesh.ui.pages` (the HTML),
:mod:`~mesh.ui.access` (who may read and act), :mod:`~mesh.ui.app` (the routes) and
``static/`` (the stylesheet and the script that keeps a page live). Importing this
package imports neither Starlette nor uvicorn.
"""
