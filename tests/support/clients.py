"""Clients that tie up a server without asking it anything: request heads that never end, idle connections.
Raw sockets, so the test controls every byte."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

#: A request head cut before its end: a server waits for the rest.
UNFINISHED_HEAD = b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


@contextlib.contextmanager
def stalled_connections(port: int, *, unfinished_heads: int, idle: int) -> Iterator[list[socket.socket]]:
    """``unfinished_heads`` connections that sent part of a request head and stall, and ``idle`` connections
    that sent nothing, all open until the block ends; yields the unfinished-head sockets."""
    stalled: list[socket.socket] = []
    quiet: list[socket.socket] = []
    try:
        for _ in range(unfinished_heads):
            connection = socket.create_connection(("127.0.0.1", port), timeout=5)
            connection.sendall(UNFINISHED_HEAD)
            stalled.append(connection)
        for _ in range(idle):
            quiet.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        yield stalled
    finally:
        for connection in stalled + quiet:
            connection.close()


def read_answer(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the socket's timeout)."""
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := connection.recv(65536):
            received += chunk
    return received
