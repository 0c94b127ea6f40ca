"""A loopback TCP proxy between a client and the server that a test can cut.

`cut()` drops every open connection at once (both sides see the TCP connection end, no
WebSocket close frame): what a client sees when its network goes away. New connections are
accepted as before, so the client can reconnect through the same address. `swallow()` makes the
open connections drop what the server sends from then on, as a lost reply would be.
`hold_new()` keeps new connections waiting (accepted, not yet forwarded) until `let_in()`: a
client that reconnects then finds the server only once the test is ready for it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class _Pair:
    client: socket.socket
    upstream: socket.socket
    swallow: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<upstream_port>, one thread per direction."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Condition()
        self._pairs: list[_Pair] = []
        self.accepted = 0
        self.cuts = 0
        self._closed = False
        self._let_in = threading.Event()
        self._let_in.set()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def ws_url(self, path: str = "/v1") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def http_url(self, path: str = "/v1") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def cut(self) -> int:
        """Drop every open connection; returns how many there were."""
        self.cuts += 1
        return self._drop_all()

    def _drop_all(self) -> int:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.close()
        return len(pairs)

    def swallow(self) -> None:
        """From now on, what the server sends on the open connections never arrives."""
        with self._lock:
            for pair in self._pairs:
                pair.swallow.set()

    def hold_new(self) -> None:
        """Connections accepted from now on wait before they reach the server."""
        self._let_in.clear()

    def let_in(self) -> None:
        self._let_in.set()

    def wait_accepted(self, count: int, timeout: float = 30.0) -> None:
        """Wait until `count` connections have been accepted in all."""
        with self._lock:
            if not self._lock.wait_for(lambda: self.accepted >= count, timeout):
                raise AssertionError(f"{self.accepted} connection(s) accepted, expected {count}")

    def close(self) -> None:
        self._closed = True
        self._let_in.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._drop_all()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._lock.notify_all()
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._let_in.wait()
        try:
            upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
        except OSError:
            client.close()
            return
        pair = _Pair(client, upstream)
        with self._lock:
            if self._closed:
                pair.close()
                return
            self._pairs.append(pair)
        for source, target, down in ((client, upstream, False), (upstream, client, True)):
            threading.Thread(
                target=self._pump, args=(pair, source, target, down), daemon=True
            ).start()

    def _pump(self, pair: _Pair, source: socket.socket, target: socket.socket, down: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if down and pair.swallow.is_set():
                    continue
                target.sendall(data)
        except OSError:
            pass
        finally:
            # One side ended: end the other too, as a real connection would.
            with self._lock:
                if pair in self._pairs:
                    self._pairs.remove(pair)
            pair.close()
