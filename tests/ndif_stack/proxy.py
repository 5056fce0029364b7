"""A TCP proxy in front of the stack's API that counts the bytes each way (what a client uploads and downloads,
at the HTTP/websocket layer: bench_remote.py) and can drop connections on purpose (the "connection dropped
mid-request" fault, made deterministic).

``Proxy(host).drop_websockets(n)`` closes the next ``n`` websocket connections (``GET /subscribe``) right
after the server's first answer (the upgrade) has reached the client, so the client is subscribed, may have sent
its request, and then loses the connection: nnsight's blocking wait raises websocket's
``WebSocketConnectionClosedException``. Plain HTTP goes through untouched. ``sent`` / ``received`` count the bytes from and to the client
(``reset()`` zeroes them). Threads only; ``close()`` stops it.
"""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlparse


class Proxy:
    def __init__(self, target: str) -> None:
        url = urlparse(target)
        self.target = (url.hostname or "127.0.0.1", url.port or 80)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.to_drop = 0
        self.dropped = 0
        self.sent = 0  # client -> server
        self.received = 0  # server -> client
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_websockets(self, n: int) -> None:
        with self.lock:
            self.to_drop = n

    def reset(self) -> None:
        with self.lock:
            self.sent = self.received = 0

    def close(self) -> None:
        self.closed = True
        self.server.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target)
        first = client.recv(65536)
        drop = False
        if first.startswith(b"GET /subscribe"):
            with self.lock:
                if self.to_drop > 0:
                    self.to_drop -= 1
                    drop = True
        upstream.sendall(first)
        self._count(True, len(first))
        if drop:
            answer = upstream.recv(65536)  # the 101 upgrade (and maybe the session id frame)
            client.sendall(answer)
            with self.lock:
                self.dropped += 1
            for s in (client, upstream):
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            return
        threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()
        self._pipe(client, upstream, True)

    def _count(self, upload: bool, n: int) -> None:
        with self.lock:
            if upload:
                self.sent += n
            else:
                self.received += n

    def _pipe(self, src: socket.socket, dst: socket.socket, upload: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                self._count(upload, len(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
