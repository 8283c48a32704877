#!/usr/bin/env python3
"""A fault-injecting HTTP proxy in front of moto server, for what no emulator produces.

Usage: fault_proxy.py UPSTREAM_URL   (listens on a free loopback port and prints "listening on PORT")

Every request is forwarded to UPSTREAM_URL unchanged, except Kinesis PutRecords calls, which may be
  - refused whole with 400 ProvisionedThroughputExceededException   (share `throttle`, and every
    `throttle_every`-th call counting from the first: a test with few calls still sees some),
  - forwarded with only some entries, the others answered as failed with ErrorCode
    ProvisionedThroughputExceededException or InternalFailure      (share `reject` per entry),
  - held `delay_ms` before being forwarded (a slow Kinesis: a call is in flight most of the time; the call
    reaches moto even if the client gave up on it meanwhile).
  - limited like one Kinesis shard (`shard_bytes_per_s`, 0 = off): entries (data and partition key) are taken
    while a bucket of one second at that rate has room, refilled continuously; the rest are refused with
    ProvisionedThroughputExceededException, as a shard past its 1 MiB/s refuses them,
  - answered by a connection reset instead of a response (share `reset`): half of them before the call reaches
    moto (nothing written), half after moto took it (written, but the client never learns it: it must resend,
    and the batch is then twice in the stream).
Rejected entries are never sent to moto, so "failed" is true. With `down` set, every request gets a
connection reset (an unreachable service).

With `max_skew_s` set (0 = off), any request signed (`X-Amz-Date`) more than that many seconds from this host's
clock is refused with 400 InvalidSignatureException "Signature expired", as AWS refuses a signature more than
5 minutes off (moto checks no signature); the answer carries this host's `Date`, as AWS's does.

Timestream WriteRecords calls may be
  - refused whole with ThrottlingException                           (share `ts_throttle`),
  - forwarded without some records, answered with RejectedRecordsException naming them with a reason, as
    Timestream does (the other records of the call are written)    (share `ts_reject` per record).

S3 (the compactor's writes):
  - with `hold_parts` set, a PutObject of a published bronze part (a key with `/part-` outside `_landing/`) is
    held, not forwarded, and from then on every DynamoDB call gets a connection reset (`dynamodb_down`): a
    compactor whose upload hangs while it can no longer renew its lease. `release_parts=1` forwards the held
    uploads (in arrival order) and stops holding; their answers go to clients still waiting.
  - CompleteMultipartUpload with `If-Match` is checked here against the object's current ETag (404 NoSuchKey,
    412 PreconditionFailed), as S3 does: moto checks `If-Match` on PutObject but not on the completion.

Control: GET /__fault/set?throttle=0.2&throttle_every=0&reject=0.3&reset=0.1&ts_throttle=0.3&ts_reject=0.1&down=0&delay_ms=0
             &hold_parts=0&release_parts=0&dynamodb_down=0&max_skew_s=0
         GET /__fault/stats  (JSON counters).
"""
import base64
import calendar
import http.client
import http.server
import json
import random
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.parse

UPSTREAM = urllib.parse.urlparse(sys.argv[1])
state = {"throttle": 0.0, "throttle_every": 0.0, "reject": 0.0, "reset": 0.0, "ts_throttle": 0.0, "ts_reject": 0.0, "down": False, "delay_ms": 0.0,
         "hold_parts": False, "dynamodb_down": False, "shard_bytes_per_s": 0.0, "max_skew_s": 0.0}
stats = {"calls": 0, "throttled_calls": 0, "rejected_entries": 0, "forwarded_entries": 0, "refused_connections": 0, "reset_before": 0, "reset_after": 0,
         "ts_calls": 0, "ts_throttled_calls": 0, "ts_rejected_records": 0, "ts_forwarded_records": 0,
         "shard_accepted_bytes": 0, "shard_refused_entries": 0,
         "held_parts": 0, "released_parts": 0, "released_answers": [], "dynamodb_refused": 0, "multipart_if_match_refused": 0,
         "skew_refused": 0}
lock = threading.Lock()
rng = random.Random(7)
released = threading.Event()
# Held uploads forward one at a time, in the order they arrived.
release_order = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body, headers):
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def forward(self, body):
        conn = http.client.HTTPConnection(UPSTREAM.hostname, UPSTREAM.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("content-length", "host")}
        headers["Content-Length"] = str(len(body))
        headers["Host"] = f"{UPSTREAM.hostname}:{UPSTREAM.port}"
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, data, resp.getheaders()

    def control(self):
        url = urllib.parse.urlparse(self.path)
        if url.path == "/__fault/set":
            q = urllib.parse.parse_qs(url.query)
            with lock:
                for k in ("throttle", "throttle_every", "reject", "reset", "ts_throttle", "ts_reject", "delay_ms", "shard_bytes_per_s", "max_skew_s"):
                    if k in q:
                        state[k] = float(q[k][0])
                for k in ("down", "hold_parts", "dynamodb_down"):
                    if k in q:
                        state[k] = q[k][0] in ("1", "true")
                if q.get("release_parts", ["0"])[0] in ("1", "true"):
                    state["hold_parts"] = False
                    released.set()
        with lock:
            body = json.dumps({**state, **stats}).encode()
        self.reply(200, body, [("Content-Type", "application/json")])

    def handle_any(self):
        if self.path.startswith("/__fault/"):
            return self.control()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        with lock:
            down, throttle, reject = state["down"], state["throttle"], state["reject"]
        if down:
            with lock:
                stats["refused_connections"] += 1
            self.close_connection = True
            self.connection.shutdown(2)
            return
        refused = self.signature_expired()
        if refused:
            return self.reply(*refused)
        target = self.headers.get("X-Amz-Target", "")
        if target.startswith("DynamoDB_") and state["dynamodb_down"]:
            with lock:
                stats["dynamodb_refused"] += 1
            return self.reset_connection()
        url = urllib.parse.urlparse(self.path)
        if self.command == "PUT" and "/part-" in url.path and "_landing" not in url.path and "uploadId=" not in url.query:
            with lock:
                hold = state["hold_parts"]
                if hold:
                    stats["held_parts"] += 1
                    state["dynamodb_down"] = True
                    released.clear()
            if hold:
                return self.forward_when_released(body)
        if self.command == "POST" and "uploadId=" in url.query and self.headers.get("If-Match"):
            refused = self.multipart_if_match(url.path, self.headers["If-Match"])
            if refused:
                return self.reply(*refused)
        if target.startswith("Timestream_") and target.endswith(".WriteRecords"):
            return self.timestream_write(body)
        if not target.endswith(".PutRecords"):
            status, data, headers = self.forward(body)
            return self.reply(status, data, headers)
        with lock:
            stats["calls"] += 1
            every = int(state["throttle_every"])
            throttled = rng.random() < throttle or (every > 0 and stats["calls"] % every == 1 % every)
            if throttled:
                stats["throttled_calls"] += 1
            delay = state["delay_ms"] / 1000.0
            reset = None if throttled or rng.random() >= state["reset"] else rng.choice(("before", "after"))
            if reset:
                stats["reset_" + reset] += 1
        if delay:
            time.sleep(delay)
        if reset == "before":
            return self.reset_connection()
        if reset == "after":
            self.forward(body)
            return self.reset_connection()
        if throttled:
            err = {"__type": "ProvisionedThroughputExceededException", "message": "Rate exceeded for shard (fault proxy)"}
            return self.reply(400, json.dumps(err).encode(), [("Content-Type", "application/x-amz-json-1.1")])
        req = json.loads(body)
        entries = req["Records"]
        with lock:
            keep = [rng.random() >= reject for _ in entries]
            keep, over_shard = shard_limit(entries, keep)
        req["Records"] = [e for e, k in zip(entries, keep) if k]
        results = []
        if req["Records"]:
            status, data, headers = self.forward(json.dumps(req).encode())
            if status != 200:
                return self.reply(status, data, headers)
            results = json.loads(data)["Records"]
        out, it, failed = [], iter(results), 0
        for i, k in enumerate(keep):
            if k:
                out.append(next(it))
            else:
                failed += 1
                code = "ProvisionedThroughputExceededException" if i % 2 == 0 or i in over_shard else "InternalFailure"
                out.append({"ErrorCode": code, "ErrorMessage": "injected by fault proxy"})
        with lock:
            stats["rejected_entries"] += failed
            stats["forwarded_entries"] += len(results)
        body = json.dumps({"FailedRecordCount": failed, "Records": out}).encode()
        self.reply(200, body, [("Content-Type", "application/x-amz-json-1.1")])

    def signature_expired(self):
        """Under `max_skew_s`: AWS's answer to a request signed too far from its clock, or None."""
        amz = self.headers.get("X-Amz-Date")
        if not state["max_skew_s"] or not amz:
            return None
        signed = calendar.timegm(time.strptime(amz, "%Y%m%dT%H%M%SZ"))
        now = time.time()
        if abs(now - signed) <= state["max_skew_s"]:
            return None
        with lock:
            stats["skew_refused"] += 1
        fmt = lambda t: time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))
        limit = state["max_skew_s"]
        why = (f"Signature expired: {amz} is now earlier than {fmt(now - limit)} ({fmt(now)} - {limit / 60:g} min.)"
               if signed < now else
               f"Signature not yet current: {amz} is still later than {fmt(now + limit)} ({fmt(now)} + {limit / 60:g} min.)")
        err = {"__type": "InvalidSignatureException", "message": why}
        return 400, json.dumps(err).encode(), [("Content-Type", "application/x-amz-json-1.1")]

    def forward_when_released(self, body):
        released.wait()
        with release_order:
            status, data, headers = self.forward(body)
            with lock:
                stats["released_parts"] += 1
                stats["released_answers"].append(status)
        try:
            self.reply(status, data, headers)
        except OSError:
            pass  # the client gave up waiting

    def multipart_if_match(self, path, expected):
        """The refusal S3 answers a CompleteMultipartUpload whose If-Match does not hold, or None."""
        conn = http.client.HTTPConnection(UPSTREAM.hostname, UPSTREAM.port, timeout=30)
        conn.request("HEAD", path, headers={"Host": f"{UPSTREAM.hostname}:{UPSTREAM.port}"})
        resp = conn.getresponse()
        resp.read()
        etag = resp.getheader("ETag", "")
        conn.close()
        xml = [("Content-Type", "application/xml")]
        if resp.status == 404:
            refusal = (404, b"<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>", xml)
        elif etag.strip('"') != expected.strip('"'):
            refusal = (412, b"<Error><Code>PreconditionFailed</Code><Message>At least one of the pre-conditions you specified did not hold</Message></Error>", xml)
        else:
            return None
        with lock:
            stats["multipart_if_match_refused"] += 1
        return refusal

    def reset_connection(self):
        """Closes the client's connection with a TCP reset (SO_LINGER 0) instead of answering."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def timestream_write(self, body):
        ctype = [("Content-Type", "application/x-amz-json-1.0")]
        with lock:
            stats["ts_calls"] += 1
            throttled = rng.random() < state["ts_throttle"]
            if throttled:
                stats["ts_throttled_calls"] += 1
            reject = state["ts_reject"]
        if throttled:
            err = {"__type": "com.amazonaws.timestream.v20181101#ThrottlingException", "Message": "Rate exceeded (fault proxy)"}
            return self.reply(400, json.dumps(err).encode(), ctype)
        req = json.loads(body)
        records = req["Records"]
        with lock:
            keep = [rng.random() >= reject for _ in records]
        req["Records"] = [r for r, k in zip(records, keep) if k]
        if req["Records"]:
            status, data, headers = self.forward(json.dumps(req).encode())
            if status != 200:
                return self.reply(status, data, headers)
        rejected = [{"RecordIndex": i, "Reason": "The record timestamp is outside the time range of the data ingestion window (fault proxy)."}
                    for i, k in enumerate(keep) if not k]
        with lock:
            stats["ts_rejected_records"] += len(rejected)
            stats["ts_forwarded_records"] += len(req["Records"])
        if not rejected:
            ok = {"RecordsIngested": {"Total": len(records), "MemoryStore": len(records), "MagneticStore": 0}}
            return self.reply(200, json.dumps(ok).encode(), ctype)
        err = {"__type": "com.amazonaws.timestream.v20181101#RejectedRecordsException",
               "Message": "One or more records have been rejected (fault proxy).", "RejectedRecords": rejected}
        self.reply(419, json.dumps(err).encode(), ctype)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = handle_any


bucket = {"tokens": 0.0, "at": time.monotonic()}


def shard_limit(entries, keep):
    """Under `shard_bytes_per_s`, refuses the entries past one shard's budget (called with the lock held)."""
    rate = state["shard_bytes_per_s"]
    if not rate:
        return keep, set()
    now = time.monotonic()
    bucket["tokens"] = min(rate, bucket["tokens"] + (now - bucket["at"]) * rate)
    bucket["at"] = now
    out, over = [], set()
    for i, (e, k) in enumerate(zip(entries, keep)):
        size = len(base64.b64decode(e["Data"])) + len(e["PartitionKey"].encode())
        if k and size <= bucket["tokens"]:
            bucket["tokens"] -= size
            stats["shard_accepted_bytes"] += size
            out.append(True)
        else:
            if k:
                stats["shard_refused_entries"] += 1
                over.add(i)
            out.append(False)
    return out, over


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


server = Server(("127.0.0.1", 0), Handler)
print(f"listening on {server.server_address[1]}", flush=True)
server.serve_forever()
