"""The shared token: read from ``$MESH_TOKEN`` or ``token_file``, and never shown.

With a token configured, every call of the mesh service carries ``authorization: Bearer
<token>`` metadata (``mesh.guard.ClientToken`` adds it) and a peer refuses a call without it
(``mesh.guard.Guard``). This module only reads and compares the secret: no gRPC here, so
loading a config does not import it.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from mesh.errors import ConfigError

__all__ = ["TOKEN_ENV", "Token", "load_token"]

_HEADER = "authorization"
_SCHEME = "Bearer "
TOKEN_ENV = "MESH_TOKEN"


class Token:
    """The shared secret; its ``repr`` and ``str`` never show it, so a log or a traceback
    that prints a config cannot leak it."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source  # "$MESH_TOKEN" or the token file's path

    def __repr__(self) -> str:
        return f"<mesh token from {self.source}>"

    __str__ = __repr__

    def header(self) -> tuple[str, str]:
        """The metadata pair a caller sends."""
        return (_HEADER, _SCHEME + self._value)

    def matches(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        """True when ``metadata`` carries this token (compared in constant time)."""
        expected = (_SCHEME + self._value).encode()
        for key, value in metadata or ():
            if key == _HEADER:
                got = value if isinstance(value, bytes) else value.encode("utf-8", "replace")
                return hmac.compare_digest(got, expected)
        return False


def load_token(where: str, root: Path, data: Mapping[str, object]) -> Token | None:
    """The token from ``$MESH_TOKEN`` (first) or ``token_file`` (relative to the config)."""
    env = os.environ.get(TOKEN_ENV, "")
    raw = data.get("token_file")
    if raw is not None and (not isinstance(raw, str) or not raw):
        raise ConfigError(f"{where}: token_file must be a file name (a string), not {raw!r}")
    if env:
        return Token(_checked(env.strip(), f"${TOKEN_ENV}"), f"${TOKEN_ENV}")
    if raw is None:
        return None
    path = root / raw
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: token_file: no such file {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{where}: token_file: cannot read {path}: {reason}") from None
    return Token(_checked(text.strip(), f"{where}: token_file {path}"), str(path))


def _checked(value: str, where: str) -> str:
    # Never quote the value: the message would leak the secret it is about.
    if not value:
        raise ConfigError(f"{where}: the token is empty")
    if not all(" " < c < "\x7f" for c in value):
        raise ConfigError(f"{where}: the token must be printable ASCII without spaces")
    if len(value) < 16:
        raise ConfigError(f"{where}: the token is shorter than 16 characters; make a longer one")
    return value
