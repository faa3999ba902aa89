"""Logging for imgapi's own loggers, the same in the API and in arq workers."""

from __future__ import annotations

import logging


def setup_logging(level: str) -> None:
    """One handler on the "imgapi" logger. Sanic and arq configure their own loggers; going
    through the root logger as well would print every line twice."""
    logger = logging.getLogger("imgapi")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
