"""A portal that answers byte for byte what a test asks, misbehaving on purpose (raw sockets, one thread per
connection): answers without length, interim 1xx answers, bytes after an answer, truncated bodies,
connections closed after an answer or on the next request.

    python -m tests.support.raw_portal --port N

The last path segment names the case (``/echo/public/<case>``); every answer of case ``ok`` says which
connection and which request on it it is (``connection 3 request 2``), so tests can see reuse.
"""

from __future__ import annotations

import argparse
import itertools
import socket
import threading

_CONNECTIONS = itertools.count(1)


def _answer(case: str, method: str, connection: int, request: int) -> tuple[bytes, str]:
    """(bytes to send, then "keep", "close" or "close-next": close on the next request without answering)."""
    text = f"connection {connection} request {request}".encode()
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%b" % (len(text), text)
    if case == "no-length":
        return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"until the end" * 100, "close"
    if case == "early-hints":
        hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        return hints + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal", "keep"
    if case == "extra":  # a second, unrequested answer right behind the first: it must never reach anyone
        smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst" + smuggled, "keep"
    if case == "head" and method == "HEAD":
        return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n", "keep"
    if case == "truncated":
        return b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 500, "close"
    if case == "chunked":
        body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n" + body,
            "keep",
        )
    if case == "idle-close":  # as a portal whose keep-alive timeout ends right after answering
        return ok, "close"
    if case == "close-next":
        return ok, "close-next"
    return ok, "keep"


def _serve(client: socket.socket) -> None:
    number = next(_CONNECTIONS)
    buffer = b""
    close_next = False
    with client:
        for request in itertools.count(1):
            while b"\r\n\r\n" not in buffer:
                data = client.recv(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            if close_next:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = next(
                (int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")),
                0,
            )
            while len(buffer) < length:
                buffer += client.recv(65536)
            buffer = buffer[length:]
            answer, then = _answer(target.rstrip("/").rsplit("/", 1)[-1], method, number, request)
            client.sendall(answer)
            if then == "close":
                return
            close_next = then == "close-next"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    listener = socket.create_server(("127.0.0.1", port))
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_serve, args=(client,), daemon=True).start()


if __name__ == "__main__":
    main()
