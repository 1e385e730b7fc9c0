"""Listening addresses checked before anything else happens.

The broker logs in to every ERP when it starts; a port clash must fail before that, in one
line, not after a round of logins. :func:`reserve` binds the address (without listening) and
keeps it until the real listener is up: a port another process listens on is refused at once.
"""

from __future__ import annotations

import socket

from .errors import BrokerError


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As asyncio's listeners do: a port in TIME_WAIT is free, one being listened on is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def reserve(host: str, port: int, key: str) -> socket.socket | None:
    """Hold ``host:port`` until the caller closes the socket; BrokerError naming ``key`` if the
    address cannot be used. Port 0 (any free port) needs no reservation: None."""
    if port == 0:
        return None
    try:
        return _bind(host, port)
    except OSError as exc:
        raise BrokerError(f"{key}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def is_free(host: str, port: int) -> bool:
    """Whether a listener could bind ``host:port`` now."""
    try:
        _bind(host, port).close()
    except OSError:
        return False
    return True
