"""A recording reverse proxy: forwards every request to a bluebatch server unchanged and keeps
what went over the wire (method, target, non-secret headers, body, status, Batch error code).

The az suite puts it between the az CLI and the server to assert what each command sends.
As a tool: python capture.py UPSTREAM_URL [PORT] prints one JSON line per exchange.
"""
from __future__ import annotations

import http.client
import json
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Never recorded: credentials.
SECRET_HEADERS = {"authorization"}
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection"}


class Exchange(dict):
    """One request and its answer: method, path, query, headers, body (parsed JSON or None),
    status, code (Batch error code or None)."""


class CaptureProxy:
    def __init__(self, upstream: str, port: int = 0, timeout: float = 30.0):
        u = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = u.hostname, u.port or 80
        self.timeout = timeout
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=proxy.timeout)
                try:
                    conn.request(self.command, self.path, body=raw or None, headers=headers)
                    resp = conn.getresponse()
                    rbody = resp.read()
                    rheaders = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_HEADERS]
                    status = resp.status
                finally:
                    conn.close()
                path, _, query = self.path.partition("?")
                ex = Exchange(
                    method=self.command,
                    path=urllib.parse.unquote(path),
                    query=dict(urllib.parse.parse_qsl(query, keep_blank_values=True)),
                    headers={k.lower(): v for k, v in headers.items() if k.lower() not in SECRET_HEADERS},
                    raw_body=raw.decode("utf-8", "replace"),
                    body=_json_or_none(raw),
                    status=status,
                    code=(_json_or_none(rbody) or {}).get("code") if status >= 400 else None,
                    response=_json_or_none(rbody),
                )
                with proxy._lock:
                    proxy.exchanges.append(ex)
                self.send_response(status)
                for k, v in rheaders:
                    if k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(rbody)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(rbody)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> "CaptureProxy":
        self._thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def mark(self) -> int:
        with self._lock:
            return len(self.exchanges)

    def since(self, mark: int) -> list[Exchange]:
        with self._lock:
            return list(self.exchanges[mark:])


def _json_or_none(raw: bytes):
    if not raw:
        return None
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except ValueError:
        return None


if __name__ == "__main__":
    proxy = CaptureProxy(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0).start()
    print(f"capture proxy on {proxy.url}", flush=True)
    seen = 0
    try:
        while True:
            threading.Event().wait(0.2)
            for ex in proxy.since(seen):
                print(json.dumps({k: ex[k] for k in ("method", "path", "query", "body", "status", "code")}), flush=True)
                seen += 1
    except KeyboardInterrupt:
        proxy.stop()
