"""``ByteCountingProxy``: a loopback TCP forwarder between SuperNodes and the SuperLink that
counts the bytes each way (for the bytes-on-the-wire benchmark and ``deploy local --count-bytes``)
and can shape the link: a one-way delay and a bandwidth per direction (an edge link in user space,
for kernels without ``tc netem``; no packet loss)."""

from __future__ import annotations

import queue
import socket
import time
from typing import Callable


class ByteCountingProxy:
    """A loopback TCP forwarder that counts the bytes SuperNodes and the SuperLink exchange
    (everything on the wire: HTTP framing, protobuf, heartbeats; TLS is forwarded as is)."""

    def __init__(self, target_host: str, target_port: int, delay_s: float = 0.0,
                 rate_bit_s: float | None = None) -> None:
        import threading

        self.target = (target_host, target_port)
        self.delay_s = float(delay_s)  # one way, each direction
        self.rate_bit_s = rate_bit_s  # each direction; None = unlimited
        self.up = 0  # SuperNodes -> SuperLink
        self.down = 0  # SuperLink -> SuperNodes
        self._lock = threading.Lock()
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(64)
        self.port = int(self._srv.getsockname()[1])
        self._closed = False
        self._socks: list[socket.socket] = []
        # called with (connection number, upstream?, bytes) for every chunk forwarded (the wire
        # analysis in benchmarks/bench_wire.py records the HTTP exchanges through it)
        self.tap: Callable[[int, bool, bytes], None] | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            conn = len(self._socks) // 2
            self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True, conn), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False, conn), daemon=True).start()

    def _count(self, n: int, upstream: bool) -> None:
        with self._lock:
            if upstream:
                self.up += n
            else:
                self.down += n

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool, conn: int = 0) -> None:
        shaped = self.delay_s > 0 or self.rate_bit_s
        q: queue.Queue = queue.Queue()
        if shaped:
            import threading

            threading.Thread(target=self._deliver, args=(q, dst), daemon=True).start()
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                self._count(len(data), upstream)
                if self.tap is not None:
                    self.tap(conn, upstream, data)
                if shaped:
                    q.put((time.monotonic() + self.delay_s, data))
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            if shaped:
                q.put(None)  # the writer closes its end once everything queued is delivered
            else:
                self._close_pair(src, dst)

    def _deliver(self, q: queue.Queue, dst: socket.socket) -> None:
        """Send each chunk once its delay has passed and the link (at ``rate_bit_s``) is free."""
        link_free = 0.0
        try:
            while (item := q.get()) is not None:
                due, data = item
                start = max(due, link_free)
                link_free = start + (len(data) * 8 / self.rate_bit_s if self.rate_bit_s else 0.0)
                wait = link_free - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close_pair(dst)

    @staticmethod
    def _close_pair(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        try:
            self._srv.close()
        except OSError:
            pass
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass
