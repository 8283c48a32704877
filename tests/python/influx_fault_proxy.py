#!/usr/bin/env python3
"""A fault-injecting HTTP proxy in front of an InfluxDB-compatible server (InfluxDB 1.x, VictoriaMetrics).

Usage: influx_fault_proxy.py UPSTREAM_URL   (listens on a free loopback port and prints "listening on PORT")

Every request is forwarded unchanged, except writes (`POST /write`, `POST /api/v2/write`), which may be
answered, each with its share:
  - 429 with `Retry-After: <retry_after>` (nothing forwarded)                      (`r429`),
  - 503 without Retry-After (nothing forwarded)                                    (`r503`),
  - 413 when the request has more than one line (nothing forwarded)                (`r413`),
  - 400 naming one line as InfluxDB 1.x does (`partial write: unable to parse '<line>': …`): the other lines
    are forwarded (decompressed), that one is not; it is a line never forwarded before, as a real server
    refuses a bad line every time                                                 (`r400`, requests of 2+ lines).
Lines the upstream answered 2xx for (at least once): GET /__fault/acknowledged (a JSON list).
Counters: GET /__fault/stats (JSON, with `dropped_lines`, the lines answered 400, and the last write's
`authorization` header, and `retry_after_gaps_ms`: for each request answered 429, the time until it came
again); set shares with
GET /__fault/set?r429=0.1&r503=0.1&r413=0.1&r400=0.1&retry_after=1
"""
import gzip
import http.client
import http.server
import json
import random
import socketserver
import sys
import threading
import time
import urllib.parse

UPSTREAM = urllib.parse.urlparse(sys.argv[1])
state = {"r429": 0.0, "r503": 0.0, "r413": 0.0, "r400": 0.0, "retry_after": "1"}
stats = {"writes": 0, "forwarded": 0, "injected_429": 0, "injected_503": 0, "injected_413": 0, "injected_400": 0,
         "dropped_lines": [], "retry_after_gaps_ms": []}
lock = threading.Lock()
forwarded = set()  # lines the upstream took
answered_429 = {}  # (first line, lines) of a request answered 429 -> when
rng = random.Random(13)
LOG = len(sys.argv) > 2


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body, headers=()):
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def forward(self, body, drop_encoding=False):
        conn = http.client.HTTPConnection(UPSTREAM.hostname, UPSTREAM.port, timeout=30)
        skip = ("content-length", "host") + (("content-encoding",) if drop_encoding else ())
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        headers["Content-Length"] = str(len(body))
        conn.request(self.command, self.path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, data, r.getheaders()

    def do_GET(self):
        if self.path.startswith("/__fault/"):
            u = urllib.parse.urlparse(self.path)
            with lock:
                if u.path == "/__fault/set":
                    for k, v in urllib.parse.parse_qsl(u.query):
                        state[k] = v if k == "retry_after" else float(v)
                body = json.dumps(sorted(forwarded) if u.path == "/__fault/acknowledged" else stats).encode()
            return self.reply(200, body, [("Content-Type", "application/json")])
        self.handle_any()

    def do_POST(self):
        self.handle_any()

    def handle_any(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n) if n else b""
        path = urllib.parse.urlparse(self.path).path
        if self.command != "POST" or path not in ("/write", "/api/v2/write"):
            status, data, headers = self.forward(body)
            return self.reply(status, data, headers)
        text = gzip.decompress(body) if self.headers.get("Content-Encoding") == "gzip" else body
        lines = [l for l in text.decode().split("\n") if l]
        key = (lines[0] if lines else "", len(lines))
        with lock:
            if key in answered_429:
                stats["retry_after_gaps_ms"].append(round((time.monotonic() - answered_429.pop(key)) * 1000))
            stats["writes"] += 1
            stats["authorization"] = self.headers.get("Authorization")
            x = rng.random()
            cut = 0.0
            fault = None
            for name in ("r429", "r503", "r413", "r400"):
                cut += state[name]
                if x < cut:
                    fault = name
                    break
            # A real server refuses a bad line every time, so it never took it before: the victim is a line
            # never forwarded (a resend of the rest after a partial 400 must not refuse a line already written).
            fresh = [i for i, l in enumerate(lines) if l not in forwarded]
            if fault in ("r413", "r400") and len(lines) < 2 or fault == "r400" and not fresh:
                fault = None
            if fault:
                stats["injected_" + fault[1:]] += 1
            victim = rng.choice(fresh) if fault == "r400" else None
            if victim is not None:
                stats["dropped_lines"].append(lines[victim])
            retry_after = state["retry_after"]
        if LOG:
            print(json.dumps({"fault": fault, "n": len(lines), "first": lines[0][-13:], "last": lines[-1][-13:],
                              "victim": lines[victim][-13:] if victim is not None else None}), flush=True)
        if fault == "r429":
            with lock:
                answered_429[key] = time.monotonic()
            return self.reply(429, b'{"error":"too many requests (fault proxy)"}', [("Retry-After", retry_after)])
        if fault == "r503":
            return self.reply(503, b'{"error":"service unavailable (fault proxy)"}')
        if fault == "r413":
            return self.reply(413, b'{"error":"request entity too large (fault proxy)"}')
        if fault == "r400":
            kept = [l for i, l in enumerate(lines) if i != victim]
            status, data, _ = self.forward("\n".join(kept).encode() + b"\n", drop_encoding=True)
            if status // 100 == 2:
                with lock:
                    forwarded.update(kept)
            if status // 100 != 2:
                return self.reply(status, data)
            msg = {"error": f"partial write: unable to parse '{lines[victim]}': injected by the fault proxy dropped=1"}
            return self.reply(400, json.dumps(msg).encode(), [("Content-Type", "application/json")])
        status, data, headers = self.forward(body)
        if status // 100 == 2:
            with lock:
                stats["forwarded"] += 1
                forwarded.update(lines)
        return self.reply(status, data, headers)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


srv = Server(("127.0.0.1", 0), Handler)
print(f"listening on {srv.server_address[1]}", flush=True)
srv.serve_forever()
