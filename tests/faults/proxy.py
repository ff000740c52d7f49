"""A TCP proxy on 127.0.0.1 that a test can cut, refuse or stall: a network fault in front
of a real service (the context store, the Kubernetes API stand-in), without touching it."""

from __future__ import annotations

import contextlib
import select
import socket
import threading


class FaultProxy:
    """Forwards every connection to ``upstream`` until told otherwise.

    ``down()`` drops every open connection and refuses new ones (the port answers with a
    reset, as a dead server's would); ``stall()`` keeps connections open but forwards
    nothing, as a hung server; ``up()`` forwards again.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.mode = "up"
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.accepted = 0
        #: Connections turned away while down: proof a client tried during the fault.
        self.refused = 0
        self.closing = False
        threading.Thread(target=self._accept, daemon=True, name="fault-proxy").start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self.mode = "up"

    def stall(self) -> None:
        self.mode = "stall"

    def down(self) -> None:
        self.mode = "down"
        with self.lock:
            conns, self.connections = list(self.connections), set()
        for conn in conns:
            _reset(conn)

    def close(self) -> None:
        self.closing = True
        self.down()
        with contextlib.suppress(OSError):
            self.listener.close()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "down":
                self.refused += 1
                _reset(client)
                continue
            self.accepted += 1
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            _reset(client)
            return
        with self.lock:
            self.connections.update((client, server))
        peers = {client: server, server: client}
        try:
            while not self.closing:
                ready, _, _ = select.select(list(peers), [], [], 0.2)
                if self.mode == "stall":
                    continue
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            with self.lock:
                self.connections.discard(client)
                self.connections.discard(server)
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.close()


def _reset(sock: socket.socket) -> None:
    # SO_LINGER 0: close sends RST, so the peer sees "connection reset", not a clean EOF.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
