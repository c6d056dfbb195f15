#!/usr/bin/env python3
"""A round-robin HTTP/1.1 reverse proxy for tests (Python standard library only).

Every request goes to the next upstream in turn, also the requests of one kept-alive client
connection, so two consecutive requests of one client land on two different replicas. The
request line, the headers (Host included: Shared Key signs the path, and the service builds its
links from Host) and the body are forwarded byte for byte, and so is the answer. An upstream
that refuses the connection is skipped for that request (nothing was sent to it yet); a request
that no upstream takes answers 502.

    rr_proxy.py --port 0 --upstream http://127.0.0.1:8521 --upstream http://127.0.0.1:8522 \
        [--log FILE]

Prints `rr_proxy listening on http://127.0.0.1:PORT` once it listens; `--log` gets one line a
request: `METHOD TARGET -> UPSTREAM STATUS`. SIGTERM or SIGINT stops it.
"""
from __future__ import annotations

import argparse
import signal
import socket
import socketserver
import sys
import threading
from urllib.parse import urlsplit

# How long an upstream may take to accept a connection, and to say anything at all (long polls
# of the node protocol wait up to a minute or so for a change).
CONNECT_TIMEOUT = 5.0
IO_TIMEOUT = 600.0
MAX_HEAD = 256 * 1024


class Upstreams:
    def __init__(self, urls: list[str]):
        self.addrs = []
        for u in urls:
            s = urlsplit(u)
            if s.scheme != "http" or not s.hostname:
                raise SystemExit(f"rr_proxy: upstream {u!r}: http://HOST:PORT only")
            self.addrs.append((s.hostname, s.port or 80, u.rstrip("/")))
        self.turn = 0
        self.lock = threading.Lock()

    def order(self):
        """The upstreams starting with the next one in turn."""
        with self.lock:
            first = self.turn % len(self.addrs)
            self.turn += 1
        return self.addrs[first:] + self.addrs[:first]


def read_head(f) -> bytes | None:
    """One message head (start line and headers, up to and with the empty line), exactly as
    sent; None at a clean end of the stream before any byte."""
    out = bytearray()
    while True:
        line = f.readline(MAX_HEAD + 1)
        if not line:
            if not out:
                return None
            raise ConnectionError("the stream ended inside a message head")
        if not out and line in (b"\r\n", b"\n"):
            continue  # stray empty lines between messages (RFC 9112 2.2)
        out += line
        if len(out) > MAX_HEAD:
            raise ConnectionError("message head too large")
        if line in (b"\r\n", b"\n"):
            return bytes(out)


def headers_of(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\n")
    start = lines[0].rstrip("\r")
    hs = []
    for l in lines[1:]:
        l = l.rstrip("\r")
        if not l:
            continue
        name, _, value = l.partition(":")
        hs.append((name.strip().lower(), value.strip()))
    return start, hs


def header(hs, name: str) -> str | None:
    for n, v in hs:
        if n == name:
            return v
    return None


def is_chunked(hs) -> bool:
    te = header(hs, "transfer-encoding")
    return te is not None and te.lower().replace(" ", "").split(",")[-1] == "chunked"


def copy_exact(src, dst, n: int) -> None:
    while n > 0:
        b = src.read(min(n, 65536))
        if not b:
            raise ConnectionError("the stream ended inside a body")
        dst.write(b)
        n -= len(b)


def copy_chunked(src, dst) -> None:
    """Copies a chunked body as it is (sizes, extensions, trailers)."""
    while True:
        line = src.readline(65537)
        if not line:
            raise ConnectionError("the stream ended inside a chunked body")
        dst.write(line)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, up to the empty line
                t = src.readline(65537)
                if not t:
                    raise ConnectionError("the stream ended inside trailers")
                dst.write(t)
                if t in (b"\r\n", b"\n"):
                    return
        copy_exact(src, dst, size)
        crlf = src.readline(3)
        dst.write(crlf)


def copy_until_close(src, dst) -> None:
    while True:
        b = src.read1(65536) if hasattr(src, "read1") else src.read(65536)
        if not b:
            return
        dst.write(b)


def wants_close(hs, version: str) -> bool:
    conn = (header(hs, "connection") or "").lower()
    if "close" in conn:
        return True
    return version == "HTTP/1.0" and "keep-alive" not in conn


class Handler(socketserver.StreamRequestHandler):
    timeout = IO_TIMEOUT
    upstreams: Upstreams
    log = None
    log_lock = threading.Lock()

    def handle(self):
        try:
            while self.one():
                pass
        except (ConnectionError, OSError, ValueError):
            pass

    def note(self, text: str) -> None:
        if self.log is not None:
            with self.log_lock:
                self.log.write(text + "\n")
                self.log.flush()

    def one(self) -> bool:
        """Proxies one request; whether the client connection stays open."""
        head = read_head(self.rfile)
        if head is None:
            return False
        start, hs = headers_of(head)
        parts = start.split(" ")
        if len(parts) != 3:
            self.wfile.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            return False
        method, target, version = parts
        up = None
        for host, port, url in self.upstreams.order():
            try:
                up = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
                name = url
                break
            except OSError:
                continue
        if up is None:
            body = b"no upstream took the connection\n"
            self.wfile.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
            self.wfile.flush()
            self.note(f"{method} {target} -> none 502")
            return self.skip_body(hs) and not wants_close(hs, version)
        up.settimeout(IO_TIMEOUT)
        with up, up.makefile("rb") as urf, up.makefile("wb") as uwf:
            try:
                uwf.write(head)
                if is_chunked(hs):
                    copy_chunked(self.rfile, uwf)
                elif header(hs, "content-length"):
                    copy_exact(self.rfile, uwf, int(header(hs, "content-length")))
                uwf.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the upstream answered early and closed: its answer is read below
            while True:
                rhead = read_head(urf)
                if rhead is None:
                    raise ConnectionError("the upstream closed without an answer")
                self.wfile.write(rhead)
                rstart, rhs = headers_of(rhead)
                status = int(rstart.split(" ")[1])
                if 100 <= status < 200 and status != 101:
                    self.wfile.flush()
                    continue
                break
            self.note(f"{method} {target} -> {name} {status}")
            close = wants_close(hs, version) or wants_close(rhs, rstart.split(" ")[0])
            if method == "HEAD" or status in (204, 304):
                pass
            elif is_chunked(rhs):
                copy_chunked(urf, self.wfile)
            elif header(rhs, "content-length") is not None:
                copy_exact(urf, self.wfile, int(header(rhs, "content-length")))
            else:
                copy_until_close(urf, self.wfile)
                close = True
            self.wfile.flush()
        return not close

    def skip_body(self, hs) -> bool:
        try:
            if is_chunked(hs):
                copy_chunked(self.rfile, _Null())
            elif header(hs, "content-length"):
                copy_exact(self.rfile, _Null(), int(header(hs, "content-length")))
            return True
        except (ConnectionError, OSError, ValueError):
            return False


class _Null:
    def write(self, b):
        return len(b)


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


def main() -> None:
    ap = argparse.ArgumentParser(description="round-robin HTTP/1.1 reverse proxy (tests)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--upstream", action="append", required=True, help="http://HOST:PORT (repeat)")
    ap.add_argument("--log", help="a file getting one line a request")
    args = ap.parse_args()

    Handler.upstreams = Upstreams(args.upstream)
    if args.log:
        Handler.log = open(args.log, "a", encoding="utf-8")
    srv = Server((args.host, args.port), Handler)

    def stop(signum, frame):
        threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = srv.server_address[:2]
    print(f"rr_proxy listening on http://{host}:{port}", flush=True)
    try:
        srv.serve_forever(poll_interval=0.2)
    finally:
        srv.server_close()


if __name__ == "__main__":
    sys.exit(main())
