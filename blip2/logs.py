"""Logging set-up for the service processes (azmlinfsrv, batch scoring, CLI)."""

import logging
import os


def setup_logging(level: str | None = None) -> None:
    """Send ``blip2.*`` records to stderr once, at ``level`` or BLIP2_LOG_LEVEL (default INFO)."""
    logger = logging.getLogger("blip2")
    if getattr(logger, "_blip2_configured", False):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel((level or os.environ.get("BLIP2_LOG_LEVEL") or "INFO").upper())
    logger.propagate = False
    logger._blip2_configured = True
