"""A TCP proxy on 127.0.0.1 that a test can cut, refuse or stall: a network fault in front
of a real service (the context store, the Kubernetes API stand-in, a registry), without
touching it."""

from __future__ import annotations

import contextlib
import select
import socket
import threading


class FaultProxy:
    """Forwards every connection to ``upstream`` until told otherwise.

    ``down()`` drops every open connection and refuses new ones (the port answers with a
    reset, as a dead server's would); ``stall()`` keeps connections open but forwards
    nothing, as a hung server; ``cut_after(n)`` resets a connection in the middle of a
    transfer, once ``n`` bytes of it have reached the service; ``die_after(n)`` does so
    once ``n`` bytes in all have, then goes down; ``up()`` forwards again.
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
        #: Connections reset by ``cut_after``: proof the cut happened where it was meant to.
        self.cuts = 0
        #: Bytes forwarded to the service, all connections together.
        self.sent_upstream = 0
        self._cut_at: int | None = None
        self._cuts_left: int | None = None
        self._die_at: int | None = None
        #: Bumped by each ``cut_after``, so bytes sent before it do not count towards it.
        self._cut_epoch = 0
        threading.Thread(target=self._accept, daemon=True, name="fault-proxy").start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self.mode = "up"
        with self.lock:
            self._cut_at = self._cuts_left = self._die_at = None

    def cut_after(self, nbytes: int, times: int | None = 1) -> None:
        """Reset the next ``times`` connections (None: every one) that carry ``nbytes`` to the
        service: the first ``nbytes`` are forwarded, then both sides get a reset, as when a
        link dies in the middle of a request body. Then forward normally again."""
        with self.lock:
            self._cut_at, self._cuts_left = nbytes, times
            self._cut_epoch += 1

    def die_after(self, nbytes: int) -> None:
        """Once ``nbytes`` more have gone to the service (all connections together), cut the
        connection carrying them there and go down until ``up()``: the link died in the
        middle of a transfer and stays dead."""
        with self.lock:
            self._die_at = self.sent_upstream + nbytes

    def _forward(self, sent: int, size: int) -> tuple[int, bool, bool]:
        """For the next ``size`` bytes of a connection that has sent ``sent`` since the last
        ``cut_after``: how many to forward, whether to cut it after them, and whether the
        link dies with it. Counts what is forwarded."""
        with self.lock:
            keep, cut, die = size, False, False
            at = self._cut_at
            if at is not None and sent + size >= at:
                keep, cut = max(at - sent, 0), True
                if self._cuts_left is not None:
                    self._cuts_left -= 1
                    if self._cuts_left <= 0:
                        self._cut_at = self._cuts_left = None
            if self._die_at is not None and self.sent_upstream + size >= self._die_at:
                keep = min(keep, max(self._die_at - self.sent_upstream, 0))
                cut = die = True
                self._die_at = None
            if cut:
                self.cuts += 1
            self.sent_upstream += keep
            return keep, cut, die

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
        # Bytes this connection sent upstream since the latest cut_after.
        epoch, sent = self._cut_epoch, 0
        try:
            while not self.closing:
                ready, _, _ = select.select(list(peers), [], [], 0.2)
                if self.mode == "stall":
                    continue
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        if epoch != self._cut_epoch:
                            epoch, sent = self._cut_epoch, 0
                        keep, cut, die = self._forward(sent, len(data))
                        if cut:
                            server.sendall(data[:keep])
                            _reset(client)
                            _reset(server)
                            if die:
                                self.down()
                            return
                        sent += keep
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
