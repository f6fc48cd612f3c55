"""A real HTTP peer that answers a byte at a time: each read is within any per-read timeout, so
only a deadline on the whole call ends it (webhook receivers and relays that stall)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def dripping_server(start: bytes, drip: bytes) -> Iterator[int]:
    """A server on 127.0.0.1 (its port is yielded) that reads one request, sends ``start`` and then
    ``drip`` every 0.3 s until the block ends."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(start)
            while not stop.wait(0.3):
                try:
                    conn.sendall(drip)
                except OSError:
                    return

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()
