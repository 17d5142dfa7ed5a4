"""A TCP proxy in front of the test PostgreSQL server, to make the network misbehave.

``freeze()`` stops relaying without closing anything: a client on the other side sees a
hung network (its statements neither finish nor fail), which is what a dead node or a
partition looks like before TCP keepalives give up.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Iterator


class TcpProxy:
    """Relay every connection to ``127.0.0.1:<port>`` onto ``target`` until frozen."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._frozen = threading.Event()
        self._stopped = threading.Event()
        self._sockets: list[socket.socket] = [self._listener]
        self._thread = threading.Thread(target=self._serve, name="tcp-proxy", daemon=True)
        self._thread.start()

    def freeze(self) -> None:
        """Stop relaying bytes in both directions; keep every socket open."""
        self._frozen.set()

    def close(self) -> None:
        """Stop the proxy and close every socket."""
        self._stopped.set()
        self._thread.join(5)
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ, None)
        while not self._stopped.is_set():
            for key, _ in selector.select(timeout=0.05):
                if self._frozen.is_set():
                    continue
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if key.data is None:
                    client, _ = sock.accept()
                    upstream = socket.create_connection(self.target)
                    self._sockets += [client, upstream]
                    selector.register(client, selectors.EVENT_READ, upstream)
                    selector.register(upstream, selectors.EVENT_READ, client)
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if data:
                    key.data.sendall(data)
                else:  # one side closed: close the pair
                    for end in (sock, key.data):
                        with contextlib.suppress(KeyError, ValueError):
                            selector.unregister(end)
                        with contextlib.suppress(OSError):
                            end.shutdown(socket.SHUT_RDWR)
            if self._frozen.is_set():
                self._stopped.wait(0.05)
        selector.close()


@contextlib.contextmanager
def tcp_proxy(target: tuple[str, int]) -> Iterator[TcpProxy]:
    """Run a :class:`TcpProxy` for the length of the block."""
    proxy = TcpProxy(target)
    try:
        yield proxy
    finally:
        proxy.close()
