"""A real TCP relay on 127.0.0.1 that slows one direction down: a slow link between a client and
a server started by a test (e.g. uploads to moto's S3 server taking seconds, so that a process
can be killed in the middle of one). Bytes are relayed unchanged; nothing is mocked."""

from __future__ import annotations

import socket
import threading
import time


class SlowLink:
    """Listens on ``port`` (0: a free one) and relays every connection to ``target_port``;
    bytes from the client to the server flow at ``up_bytes_per_s`` at most."""

    def __init__(self, target_port: int, up_bytes_per_s: float, port: int = 0):
        self.target, self.rate = target_port, float(up_bytes_per_s)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, server, self.rate),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, 0.0), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, rate: float) -> None:
        chunk = 16384
        try:
            while True:
                data = src.recv(chunk)
                if not data:
                    break
                dst.sendall(data)
                if rate > 0:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self.sock.close()
