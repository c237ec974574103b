"""The mesh's own logger for the hot path: bound once per structlog configuration.

``structlog.get_logger()`` returns a lazy proxy that assembles a new bound logger
(logger factory, wrapper class, context) on *every* call unless
``cache_logger_on_first_use`` is set, and with it set, keeps the first
configuration forever. The runtime logs every line of every flow, so the
rebuild cost a sixth of a hop; caching for good would tie the mesh's logging
to whatever chain was configured first (tests and embedding applications
reconfigure structlog). :class:`BoundOnce` rebinds only when the configuration
it was bound under is no longer the one in force.
"""

from __future__ import annotations

from typing import Any

import structlog


class BoundOnce:
    """``structlog.get_logger(name)``, reassembled only when structlog is reconfigured."""

    __slots__ = ("_bound", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        # (processors, wrapper class, logger factory, context class, logger): one
        # tuple, so a thread never sees the logger of one configuration with the
        # key of another.
        self._bound: tuple[Any, Any, Any, Any, Any] | None = None

    def get(self) -> Any:
        """The bound logger for the configuration in force now."""
        if not structlog.is_configured():
            # Unconfigured structlog resolves sys.stdout per logger; don't pin it.
            return structlog.get_logger(self._name)
        config = structlog.get_config()
        bound = self._bound
        if (
            bound is not None
            and bound[0] is config["processors"]
            and bound[1] is config["wrapper_class"]
            and bound[2] is config["logger_factory"]
            and bound[3] is config["context_class"]
        ):
            return bound[4]
        logger = structlog.get_logger(self._name).bind()
        self._bound = (
            config["processors"],
            config["wrapper_class"],
            config["logger_factory"],
            config["context_class"],
            logger,
        )
        return logger

    def info(self, event: Any, **kw: Any) -> Any:
        return self.get().info(event, **kw)

    def warning(self, event: Any, **kw: Any) -> Any:
        return self.get().warning(event, **kw)

    def error(self, event: Any, **kw: Any) -> Any:
        return self.get().error(event, **kw)

    def exception(self, event: Any, **kw: Any) -> Any:
        return self.get().exception(event, **kw)
