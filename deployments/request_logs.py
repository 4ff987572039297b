"""Orchard's log lines in Ray Serve's replica logs, each with the id of its request.

Serve writes the ``ray.serve`` logger's records to the replica's log file (what the Ray
dashboard shows), adding the request id of the request being handled (Serve's request
context, carried from the proxy to the ingress and on through every handle call). Orchard's
own loggers (``orchard.*``: engines, model catalog, ingress) are handed to that logger, so
their lines get the same treatment; lines logged on a thread that serves no one request (an
engine's batch loop) carry none.
"""

from __future__ import annotations

import logging

SERVE_LOGGER = "ray.serve"


class _ToServeLogger(logging.Handler):
    """Passes records on to Serve's logger, whose handlers format them and add the request id
    (Serve replaces those handlers when it reconfigures logging: looked up at each record)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(SERVE_LOGGER).handle(record)


def join_serve_logs() -> None:
    """Called once in every Orchard replica's constructor (idempotent)."""
    orchard = logging.getLogger("orchard")
    if any(isinstance(h, _ToServeLogger) for h in orchard.handlers):
        return
    orchard.addHandler(_ToServeLogger())
    orchard.setLevel(logging.INFO)
    orchard.propagate = False  # the worker's stderr would get a second, id-less copy
