"""Errors the remote-data adapters raise when a source cannot be reached or read."""

from __future__ import annotations


class SourceUnavailable(RuntimeError):
    """A remote source failed (network, timeout, server error, corrupt download).

    Raised instead of the client library's own error so callers (and flows that retry) catch one
    type; the message names the source and never contains credentials.
    """
