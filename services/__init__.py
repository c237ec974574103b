"""The example services of the demo mesh (see ``mesh.toml`` and ``examples/``).

Each module registers the handlers of one request: ``login``, ``feed`` and ``index``.
Every machine imports all of them; the flow files decide which handlers run where.
Their data lives in SQLite, through :mod:`services.store`.
"""
