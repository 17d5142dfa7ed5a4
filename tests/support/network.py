"""A TCP proxy in front of the test PostgreSQL server, to make the network misbehave.

It can refuse connections until ``listen()`` (a server that is not up yet), and
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

import sqlalchemy as sa

from conftest import PG_HOST
from conftest import PG_PORT


class TcpProxy:
    """Relay every connection to ``127.0.0.1:<port>`` onto ``target`` until frozen."""

    def __init__(self, target: tuple[str, int] = (PG_HOST, PG_PORT), *, listen: bool = True):
        self.target = target
        with socket.socket() as probe:  # a free port, refused until listen()
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self._frozen = threading.Event()
        self._stopped = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        if listen:
            self.listen()

    def listen(self) -> None:
        """Start accepting connections on ``port``."""
        listener = socket.create_server(("127.0.0.1", self.port))
        self._sockets.append(listener)
        self._thread = threading.Thread(
            target=self._serve, args=(listener,), name="tcp-proxy", daemon=True
        )
        self._thread.start()

    def freeze(self) -> None:
        """Stop relaying bytes in both directions; keep every socket open."""
        self._frozen.set()

    def close(self) -> None:
        """Stop the proxy and close every socket."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(5)
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _serve(self, listener: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, None)
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
def tcp_proxy(target: tuple[str, int] = (PG_HOST, PG_PORT)) -> Iterator[TcpProxy]:
    """Run a listening :class:`TcpProxy` for the length of the block."""
    proxy = TcpProxy(target)
    try:
        yield proxy
    finally:
        proxy.close()


def through(url: str, port: int, host: str = "127.0.0.1") -> str:
    """Return ``url`` pointed at ``host:port`` (the proxy), password kept."""
    return sa.make_url(url).set(host=host, port=port).render_as_string(hide_password=False)
