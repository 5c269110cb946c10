"""``FleetGateway``: the only part of a SuperLink that faces the network is its Fleet API.

Flower 1.42 serves the Fleet API (what SuperNodes call), the Control API (register SuperNode
keys, submit and stop runs: open-source Flower has no user authentication on it) and the
runtime API on one HTTP port. Exposing that port exposes all three: anyone who can reach it,
knowing only the public ``ca.crt``, can register a SuperNode key and submit a run. So the
deploy tooling binds the SuperLink to 127.0.0.1 and puts this gateway on the public address:

- it accepts TLS with the SuperLink's own certificate (or plain HTTP on loopback tests);
- per connection it reads one request head (at most 64 KiB) and forwards it only when it is
  ``POST /v1/fleet/<name>`` (or ``GET /health``), with a ``Content-Length`` body and no
  ``Transfer-Encoding``; anything else gets ``403`` (``400`` when malformed) and is closed;
- the forwarded request says ``Connection: close`` and exactly its declared body is passed on,
  nothing after it, so no second request can ride on an allowed one;
- the response (streamed or not) is passed back unchanged until the SuperLink closes.

SuperNode authentication headers pass through untouched; the SuperLink still checks them.
``python -m floral_flwr.deploy.gateway --listen HOST:PORT --target 127.0.0.1:PORT [--certs DIR]``
runs one as a background process (the deploy tooling starts it with a PID file).
"""

from __future__ import annotations

import argparse
import re
import socket
import ssl
import sys
import threading
from pathlib import Path

MAX_HEAD = 64 * 1024
_FLEET_PATH = re.compile(rb"^/v1/fleet/[a-z][a-z-]{0,63}$")
_HOP_HEADERS = {b"connection", b"keep-alive", b"proxy-connection", b"upgrade", b"te", b"trailer"}


class Refused(Exception):
    """A request the gateway does not forward: (status, reason)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_request_head(head: bytes) -> tuple[bytes, int]:
    """The head to forward (hop-by-hop headers replaced by ``Connection: close``) and the body
    length, or :class:`Refused`. ``head`` ends with the blank line."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise Refused(400, "malformed request line")
    method, target = parts[0], parts[1]
    allowed = (method == b"POST" and _FLEET_PATH.match(target)) or (method == b"GET" and target == b"/health")
    if not allowed:
        raise Refused(403, "only the Fleet API is served here")
    out = [lines[0]]
    length = 0
    seen_length = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or any(c in name for c in b" \t"):
            raise Refused(400, "malformed header")
        key = name.lower()
        if key == b"transfer-encoding":
            raise Refused(400, "Transfer-Encoding is not accepted (send Content-Length)")
        if key == b"content-length":
            text = value.strip()
            if seen_length or not text.isdigit():
                raise Refused(400, "bad Content-Length")
            seen_length, length = True, int(text)
        if key in _HOP_HEADERS:
            continue
        out.append(line)
    out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n", length


def _read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    """(head including the blank line, bytes already read after it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(8192)
        if not chunk:
            raise Refused(400, "connection closed before the request head")
        buf += chunk
        if len(buf) > MAX_HEAD and b"\r\n\r\n" not in buf[:MAX_HEAD + 4]:
            raise Refused(400, "request head too large")
    end = buf.index(b"\r\n\r\n") + 4
    return buf[:end], buf[end:]


def _answer(conn: socket.socket, status: int, reason: str) -> None:
    text = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}.get(status, "Error")
    body = (reason + "\n").encode()
    try:
        conn.sendall(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (status, text.encode(), len(body), body))
    except OSError:
        pass


class FleetGateway:
    """Listens on ``listen`` and forwards Fleet API requests to the SuperLink at ``target``.

    ``server_ctx``: TLS for the listening side (None: plain); ``upstream_ctx``: TLS towards the
    SuperLink (None: plain)."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int],
                 server_ctx: ssl.SSLContext | None = None, upstream_ctx: ssl.SSLContext | None = None) -> None:
        self.target = target
        self.server_ctx = server_ctx
        self.upstream_ctx = upstream_ctx
        self.refused = 0
        self.forwarded = 0
        self._srv = socket.create_server(listen, reuse_port=False)
        self.port = int(self._srv.getsockname()[1])
        self._closed = False

    def serve_forever(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def start(self) -> "FleetGateway":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        self._closed = True
        try:
            self._srv.close()
        except OSError:
            pass

    def _handle(self, raw: socket.socket) -> None:
        conn: socket.socket = raw
        upstream: socket.socket | None = None
        try:
            conn.settimeout(30)
            if self.server_ctx is not None:
                conn = self.server_ctx.wrap_socket(raw, server_side=True)
            try:
                head, rest = _read_head(conn)
                head, length = check_request_head(head)
            except Refused as exc:
                self.refused += 1
                _answer(conn, exc.status, exc.reason)
                return
            try:
                upstream = socket.create_connection(self.target, timeout=30)
                if self.upstream_ctx is not None:
                    upstream = self.upstream_ctx.wrap_socket(upstream, server_hostname=self.target[0])
            except OSError as exc:
                _answer(conn, 502, f"SuperLink unreachable: {exc}")
                return
            self.forwarded += 1
            upstream.sendall(head)
            body = rest[:length]
            upstream.sendall(body)
            todo = length - len(body)
            while todo > 0:  # exactly the declared body; nothing after it is forwarded
                chunk = conn.recv(min(65536, todo))
                if not chunk:
                    return
                upstream.sendall(chunk)
                todo -= len(chunk)
            upstream.settimeout(None)  # streamed responses can be long
            while True:
                chunk = upstream.recv(65536)
                if not chunk:
                    break
                conn.sendall(chunk)
        except (OSError, ssl.SSLError):
            pass
        finally:
            for s in (upstream, conn):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass


def tls_contexts(certs_dir: str | Path | None) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server side with the SuperLink's certificate, client side trusting its CA) or (None, None)."""
    if not certs_dir:
        return None, None
    root = Path(certs_dir)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(root / "server.pem", root / "server.key")
    client = ssl.create_default_context(cafile=str(root / "ca.crt"))
    return server, client


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"address '{text}' is not HOST:PORT")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m floral_flwr.deploy.gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, help="public HOST:PORT SuperNodes connect to")
    p.add_argument("--target", required=True, help="the SuperLink's loopback HOST:PORT")
    p.add_argument("--certs", default=None, help="the SuperLink's certificate directory (TLS on both sides)")
    a = p.parse_args(argv)
    server_ctx, upstream_ctx = tls_contexts(a.certs)
    gw = FleetGateway(_address(a.listen), _address(a.target), server_ctx, upstream_ctx)
    print(f"fleet gateway on {a.listen} -> {a.target} ({'TLS' if server_ctx else 'plain'})", flush=True)
    gw.serve_forever()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
