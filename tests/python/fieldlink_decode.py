#!/usr/bin/env python3
"""Independent decoder of the fieldlink wire format, versions 1 and 2, written from proto/FORMAT.md alone (readings
records and alarm-event records).

Usage: fieldlink_decode.py RECORD_FILE...   prints one JSON object per record:
  {"agent_id", "epoch", "seq", "series": [[key, [[name, value], ...]], ...],
   "readings": [[series_index, ts_ms, type, value, quality, late], ...]}
  an alarm-event record (flag bit 1) gives {"agent_id", "epoch", "seq", "alarms": [event, ...], "series": [],
   "readings": []} with event = {"rule", "rule_seq", "series", "tags", "from": [severity, name],
   "to": [severity, name], "ts_ms", "cause": null or [ts_ms, type, value, quality]}
f64 values are printed as the hex of their 8 little-endian bytes so NaN and -0.0 compare exactly.
"""
import json
import struct
import sys

import zstandard

MAX_BODY = 16 * 1024 * 1024
MAX_SERIES, MAX_READINGS, MAX_TAGS = 65_536, 1_000_000, 64
MASK64 = (1 << 64) - 1


class DecodeError(Exception):
    pass


class Reader:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def remaining(self):
        return len(self.buf) - self.pos

    def bytes(self, n, what):
        if n > self.remaining():
            raise DecodeError(f"truncated in {what}")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def uvarint(self, what):
        v, shift = 0, 0
        for i in range(10):
            b = self.bytes(1, what)[0]
            v |= (b & 0x7F) << shift
            if b < 0x80:
                if v > MASK64:
                    raise DecodeError(f"varint overflow in {what}")
                return v
            shift += 7
        raise DecodeError(f"varint too long in {what}")

    def varints(self, n, what):
        """The bytes of the next n varints (a column whose length follows from its count)."""
        end, ends = self.pos, 0
        while ends < n:
            if end >= len(self.buf):
                raise DecodeError(f"truncated in {what}")
            ends += self.buf[end] < 0x80
            end += 1
        return Reader(self.bytes(end - self.pos, what))

    def svarint(self, what):
        u = self.uvarint(what)
        return (u >> 1) ^ -(u & 1)

    def count(self, what, limit, min_each):
        n = self.uvarint(what)
        if n > limit:
            raise DecodeError(f"{what} {n} above limit {limit}")
        if n * min_each > self.remaining():
            raise DecodeError(f"truncated in {what}")
        return n

    def string(self, what, limit):
        n = self.count(what, limit, 1)
        return self.bytes(n, what).decode("utf-8")


def wrap_i64(v):
    v &= MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def decode(record):
    r = Reader(record)
    if r.bytes(4, "magic") != b"FLNK":
        raise DecodeError("bad magic")
    version = r.bytes(1, "version")[0]
    if version not in (1, 2):
        raise DecodeError(f"unsupported version {version}")
    flags = r.bytes(1, "flags")[0]
    if flags & ~3:
        raise DecodeError("reserved flags set")
    id_len = r.bytes(1, "id_len")[0]
    agent_id = r.bytes(id_len, "agent_id").decode("utf-8")
    epoch = 0
    if flags & 1:  # an 8-byte buffer epoch follows the agent id
        (epoch,) = struct.unpack("<Q", r.bytes(8, "epoch"))
        if epoch == 0:
            raise DecodeError("epoch flag set with a zero epoch")
    (seq,) = struct.unpack("<Q", r.bytes(8, "seq"))
    (body_len,) = struct.unpack("<I", r.bytes(4, "body_len"))
    if body_len > MAX_BODY:
        raise DecodeError("body too large")
    body = zstandard.ZstdDecompressor().decompress(r.bytes(r.remaining(), "body"), max_output_size=body_len)
    if len(body) != body_len:
        raise DecodeError("body size differs from header")
    if flags & 2:  # an alarm-event record
        if not flags & 1:
            raise DecodeError("alarm record without an epoch")
        return {"version": version, "agent_id": agent_id, "epoch": epoch, "seq": seq, "series": [], "readings": [],
                "alarms": decode_alarms(Reader(body))}
    series, readings = (body_v1 if version == 1 else body_v2)(Reader(body))
    return {"version": version, "agent_id": agent_id, "epoch": epoch, "seq": seq, "series": series, "readings": readings}


def check_kind(k):
    if k & 0x88 or k & 0x07 > 3 or (k >> 4) & 3 == 3:
        raise DecodeError(f"bad kind byte {k:#x}")


def body_v1(b):
    series = []
    for _ in range(b.count("series_count", MAX_SERIES, 2)):
        key = b.string("key", 1024)
        tags = [[b.string("tag name", 256), b.string("tag value", 1024)] for _ in range(b.count("tags", MAX_TAGS, 2))]
        series.append([key, tags])
    n = b.count("reading_count", MAX_READINGS, 2)
    base = b.svarint("base_ts")
    runs = [b.uvarint("runs") for _ in series]
    if sum(runs) != n:
        raise DecodeError("runs do not sum to reading_count")
    ts = []
    for run in runs:
        prev = base
        for _ in range(run):
            prev = wrap_i64(prev + b.svarint("ts"))
            ts.append(prev)
    kinds = b.bytes(n, "kinds")
    types = [k & 0x07 for k in kinds]
    n_f64 = types.count(0)
    planes = b.bytes(8 * n_f64, "f64")
    f64s = [bytes(planes[p * n_f64 + j] for p in range(8)).hex() for j in range(n_f64)]
    i64s, j = [], 0
    for run in runs:
        prev = 0
        for t in types[j:j + run]:
            if t == 1:
                prev = wrap_i64(prev + b.svarint("i64"))
                i64s.append(prev)
        j += run
    bools = list(b.bytes(types.count(2), "bool"))
    readings, j, fi, ii, bi = [], 0, 0, 0, 0
    for si, run in enumerate(runs):
        for _ in range(run):
            k, t = kinds[j], types[j]
            if t == 0:
                v, fi = f64s[fi], fi + 1
            elif t == 1:
                v, ii = i64s[ii], ii + 1
            elif t == 2:
                if bools[bi] not in (0, 1):
                    raise DecodeError("bool byte")
                v, bi = bools[bi] == 1, bi + 1
            elif t == 3:
                v = b.string("string", 65_536)
            else:
                raise DecodeError("unknown type")
            readings.append([si, ts[j], ["f64", "i64", "bool", "str"][t], v, (k >> 4) & 3, bool(k & 0x40)])
            j += 1
    if b.remaining():
        raise DecodeError("trailing bytes")
    return series, readings


MAX_MANTISSA = 1 << 53


def body_v2(b):
    series, key, expanded = [], b"", 0
    for i in range(b.count("series_count", MAX_SERIES, 3)):
        shared = b.uvarint("key prefix")
        if shared > len(key):
            raise DecodeError("key prefix longer than the previous key")
        key = key[:shared] + b.bytes(b.count("key", 1024, 1), "key")
        if not 1 <= len(key) <= 1024:
            raise DecodeError("key length")
        t = b.uvarint("tags")
        if t == 0:
            tags = [list(x) for x in series[-1][1]] if series else []
        else:
            if t - 1 > MAX_TAGS:
                raise DecodeError("too many tags")
            tags = [[b.string("tag name", 256), b.string("tag value", 1024)] for _ in range(t - 1)]
        expanded += len(key) + sum(len(n.encode()) + len(v.encode()) for n, v in tags)
        if expanded > MAX_BODY:
            raise DecodeError("series table expands beyond the body limit")
        series.append([key.decode("utf-8"), tags])
    if not series:
        raise DecodeError("zero series")
    n = b.count("reading_count", MAX_READINGS, 1)
    base = b.svarint("base_ts")
    runs = [b.uvarint("runs") for _ in series]
    if sum(runs) != n:
        raise DecodeError("runs do not sum to reading_count")
    kinds = b.bytes(len(series), "kinds")
    codings = b.bytes(len(series), "codings")
    # Kind bytes of every reading, per series.
    per_series = []
    for run, k in zip(runs, kinds):
        if k == 0x80:
            ks = list(b.bytes(run, "mixed kinds"))
        else:
            ks = [k] * run
        for x in ks if k == 0x80 else [k]:
            check_kind(x)
        per_series.append(ks)
    n_f64 = [sum(1 for k in ks if k & 7 == 0) for ks in per_series]
    for c, nf in zip(codings, n_f64):
        if nf == 0 and c & ~0x20:
            raise DecodeError("double coding on a series without doubles")
        if c & 0x80 and c & 0x5F:
            raise DecodeError("raw with an exponent or exceptions")
        if c & 0x1F > 22:
            raise DecodeError("exponent above 22")
    exceptions = []
    for c, nf in zip(codings, n_f64):
        pos = set()
        if c & 0x40:
            count = b.uvarint("exception count")
            if not 1 <= count <= nf:
                raise DecodeError("exception count")
            p = -1
            for _ in range(count):
                p = p + 1 + b.uvarint("exception position")
                if p >= nf:
                    raise DecodeError("exception position beyond the series' doubles")
                pos.add(p)
        exceptions.append(pos)
    n_raw = sum(nf if c & 0x80 else len(pos) for c, nf, pos in zip(codings, n_f64, exceptions))
    n_mant = sum(0 if c & 0x80 else nf - len(pos) for c, nf, pos in zip(codings, n_f64, exceptions))
    n_i64 = sum(1 for ks in per_series for k in ks if k & 7 == 1)
    n_bool = sum(1 for ks in per_series for k in ks if k & 7 == 2)
    tsr = b.varints(n, "timestamps")
    mr = b.varints(n_mant, "mantissas")
    planes = b.bytes(8 * n_raw, "raw f64")
    raw = [bytes(planes[p * n_raw + j] for p in range(8)).hex() for j in range(n_raw)]
    ir = b.varints(n_i64, "i64")
    bools = list(b.bytes(n_bool, "bool"))
    readings, ri, bi = [], 0, 0
    for si, (ks, c, pos) in enumerate(zip(per_series, codings, exceptions)):
        e, delta = c & 0x1F, bool(c & 0x20)
        ts, d, m, prev_i, f = base, 0, 0, 0, 0
        for j, k in enumerate(ks):
            v = tsr.svarint("ts")
            if j == 0:
                ts = wrap_i64(base + v)
            else:
                d = wrap_i64(d + v)
                ts = wrap_i64(ts + d)
            t = k & 7
            if t == 0:
                if c & 0x80 or f in pos:
                    v, ri = raw[ri], ri + 1
                else:
                    x = mr.svarint("mantissa")
                    m = wrap_i64(m + x) if delta else x
                    if abs(m) > MAX_MANTISSA:
                        raise DecodeError("mantissa above 2^53")
                    # Both operands exact (|m| <= 2^53, 10^e <= 10^22); one correctly rounded division.
                    v = struct.pack("<d", float(m) / float(10**e)).hex()
                f += 1
            elif t == 1:
                x = ir.svarint("i64")
                prev_i = wrap_i64(prev_i + x) if delta else x
                v = prev_i
            elif t == 2:
                if bools[bi] not in (0, 1):
                    raise DecodeError("bool byte")
                v, bi = bools[bi] == 1, bi + 1
            else:
                v = b.string("string", 65_536)
            readings.append([si, ts, ["f64", "i64", "bool", "str"][t], v, (k >> 4) & 3, bool(k & 0x40)])
    if b.remaining() or tsr.remaining() or mr.remaining() or ir.remaining():
        raise DecodeError("trailing bytes")
    return series, readings


def decode_alarms(b):
    events = []
    for _ in range(b.count("event_count", 10_000, 12)):
        rule = b.string("rule", 256)
        rule_seq = b.uvarint("rule_seq")
        key = b.string("key", 1024)
        tags = [[b.string("tag name", 256), b.string("tag value", 1024)] for _ in range(b.count("tags", MAX_TAGS, 2))]
        levels = []
        for _ in range(2):
            severity = b.bytes(1, "severity")[0]
            levels.append([severity, b.string("level name", 256)])
        ts = b.svarint("event ts")
        tag = b.bytes(1, "cause tag")[0]
        cause = None
        if tag == 1:
            cts = b.svarint("cause ts")
            k = b.bytes(1, "cause kind")[0]
            if k & 0xC8:
                raise DecodeError("cause kind reserved bits")
            t, q = k & 7, (k >> 4) & 3
            if q == 3:
                raise DecodeError("cause quality")
            if t == 0:
                v = b.bytes(8, "cause f64").hex()
            elif t == 1:
                v = b.svarint("cause i64")
            elif t == 2:
                byte = b.bytes(1, "cause bool")[0]
                if byte not in (0, 1):
                    raise DecodeError("cause bool")
                v = byte == 1
            elif t == 3:
                v = b.string("cause string", 65_536)
            else:
                raise DecodeError("cause type")
            cause = [cts, ["f64", "i64", "bool", "str"][t], v, q]
        elif tag != 0:
            raise DecodeError("cause tag")
        events.append({"rule": rule, "rule_seq": rule_seq, "series": key, "tags": tags, "from": levels[0],
                       "to": levels[1], "ts_ms": ts, "cause": cause})
    if b.remaining():
        raise DecodeError("trailing bytes after the alarm events")
    return events


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path, "rb") as f:
            print(json.dumps(decode(f.read())))
