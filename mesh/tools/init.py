"""``mesh init``: a small project that runs, to start from instead of an empty folder.

Four files: a flow file with one request over two machines and an address-less client, a
``mesh.toml``, a services module with the handlers, and a README that says how to run it.
The texts are here, in the package, so an installed mesh can write them anywhere. An
existing file is never overwritten without ``force``: every file is checked before any is
written, so a refusal leaves the folder as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

from mesh.errors import MeshError

__all__ = ["FILES", "write_project"]

FLOWS = """\
Request\tLog\tMachine
order\tOrder of :qty :item placed by :customer\tclient
order\tReserving :qty :item\tstock
order\tCharging :customer for :qty :item with card #card\tbilling
order\tOrder :order_id confirmed for :customer\tclient
"""

CONFIG = """\
# The mesh of this folder: `mesh check` validates it, `mesh up` starts its peers.
flow = "flows.tsv"        # each request's log lines in order, and the machine of each
services = ["handlers"]   # the modules every peer imports: their @mesh.handler functions
timeout = 10              # seconds an order may take, end to end

[machines]
client = ""                # no address: it only starts flows (mesh call, node.start)
stock = "127.0.0.1:7401"   # where the machine's peer listens, and is called
billing = "127.0.0.1:7402"
"""

HANDLERS = '''\
"""The handlers of the order request (flows.tsv), one per line that does work.

Every machine imports this module; each handler runs on the machine its line names
in flows.tsv. `log.info("next", ...)` adds to the flow's context and hands the flow
on to the next line, wherever that runs. A line without a handler is only logged.
"""

from __future__ import annotations

import uuid

import mesh
import structlog

log = structlog.get_logger()

#: The shelf, kept by the stock machine's process (a real shop: its database).
STOCK = {"tea": 100, "cake": 12}
PRICES = {"tea": 3.5, "cake": 4.25}


@mesh.handler("order", "Order of :qty :item placed by :customer")
def place_order(ctx):
    """On client: check the order before it travels (`mesh call` passes qty=2 as text)."""
    qty = int(ctx["qty"])
    if qty <= 0:
        raise ValueError(f"qty must be positive, not {qty}")
    log.info("next", qty=qty)


@mesh.handler("order", "Reserving :qty :item")
def reserve(ctx):
    """On stock: take the items off the shelf, or fail the order."""
    left = STOCK.get(ctx["item"], 0)
    if left < ctx["qty"]:
        raise LookupError(f"only {left} {ctx['item']} left")
    STOCK[ctx["item"]] = left - ctx["qty"]
    log.info("next", reserved=ctx["qty"])


@mesh.handler("order", "Charging :customer for :qty :item with card #card")
def charge(ctx):
    """On billing. #card makes the card number a secret: *** in every log line."""
    total = round(PRICES[ctx["item"]] * ctx["qty"], 2)
    log.info("charged", total=total)
    log.info("next", total=total, order_id=uuid.uuid4().hex[:8])
'''

README = """\
# An order, over three machines

`mesh init` wrote this project. `flows.tsv` says what happens to an `order`, line
by line, and which machine runs each line: the `client` places it, `stock`
reserves the items, `billing` charges the card, and the client gets the
confirmation. `handlers.py` holds the code of each line, and `mesh.toml` says
where each machine listens.

Check it, then start the two peers in one terminal:

```sh
mesh check
mesh up --log-dir logs
```

and place an order from another:

```sh
mesh call order item=tea qty=2 customer=ada card=4242424242424242 --log-file logs/client.log
mesh logs logs/*.log
mesh diagram order
```

`mesh call` prints the final context and the timeline (the card shows as `***`);
`mesh logs` merges the machines' logs into one transcript of the flow and checks
it against `flows.tsv`; `mesh diagram` draws the request (`-o order.svg` for a
picture). Ctrl-C stops the peers.

To move a line to another machine, change its `Machine` cell (and give a new
machine an address in `mesh.toml`), then restart `mesh up`: the code stays as it
is. `mesh scaffold REQUEST` writes handler stubs for a request you add.
"""

#: What ``mesh init`` writes, by file name, in the order it writes them.
FILES = {
    "mesh.toml": CONFIG,
    "flows.tsv": FLOWS,
    "handlers.py": HANDLERS,
    "README.md": README,
}


def write_project(folder: str | os.PathLike[str], *, force: bool = False) -> list[Path]:
    """Write :data:`FILES` into ``folder`` (made if missing); returns the paths written.

    Raises MeshError naming the first file that exists (unless ``force``), or a folder
    that cannot be written, before writing anything.
    """
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise MeshError(f"{root} is a file, not a folder")
    paths = [root / name for name in FILES]
    if not force:
        for path in paths:
            if path.exists():
                raise MeshError(f"{path} exists; --force overwrites it")
    try:
        root.mkdir(parents=True, exist_ok=True)
        for path, text in zip(paths, FILES.values(), strict=True):
            path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise MeshError(f"cannot write {exc.filename or root}: {exc.strerror or exc}") from None
    return paths
