#!/usr/bin/env python3
"""An independent model of the agent's alarm rules, written from docs/alarms.md (not from the Rust code).

Usage: alarm_model.py < INPUT.json > EVENTS.json
INPUT: {"rules": [rule, ...], "items": [item, ...]}
  rule: the [[alarms.rules]] table as JSON (name, series, tags, condition, levels, hysteresis, on_delay_ms,
        off_delay_ms, span_ms)
  item: {"obs": [series_id, key, [[tag, value], ...], ts_ms, [type, value], quality]}   type f64|i64|bool|str,
        f64 values as strings ("1.5", "nan", "inf"); quality 0 good, 1 uncertain, 2 bad
        {"tick": clock_ms}
  Items come in the order the agent evaluates them: per series in event-time order, late readings left out.
OUTPUT: a JSON list of events [rule, rule_seq, series_id, from, to, ts_ms, cause_ts_ms or null].
"""
import json
import math
import sys

MAX_WINDOW = 1024


def filter_matches(flt, key):
    """MQTT topic filter semantics: '+' one level, '#' this level and everything below."""
    fl, kl = flt.split("/"), key.split("/")
    for i, f in enumerate(fl):
        if f == "#":
            return True
        if i >= len(kl):
            return False
        if f != "+" and f != kl[i]:
            return False
    return len(fl) == len(kl)


class Rule:
    def __init__(self, cfg, index):
        self.index = index
        self.name = cfg["name"]
        self.series = cfg["series"]
        self.tags = cfg.get("tags", {})
        self.cond = cfg["condition"]
        self.levels = cfg["levels"]
        self.hyst = float(cfg.get("hysteresis", 0.0))
        self.on_delay = cfg.get("on_delay_ms", 0)
        self.off_delay = cfg.get("off_delay_ms", 0)
        self.span = cfg.get("span_ms", 0)

    def applies(self, key, tags):
        tagmap = dict(tags)
        return filter_matches(self.series, key) and all(tagmap.get(k) == v for k, v in self.tags.items())

    def bound(self, i):
        """The threshold of level i (1-based)."""
        lv = self.levels[i - 1]
        if self.cond == "stale":
            return lv["after_ms"]
        if self.cond == "quality":
            return {"uncertain": 1, "bad": 2}[lv["quality"]]
        return lv["limit"]

    def beyond(self, x, i, margin):
        b = self.bound(i)
        if self.cond in ("above", "rate"):
            return x > b - margin
        if self.cond == "below":
            return x < b + margin
        return x >= b  # quality

    def wanted(self, level, x):
        """Most severe level the value calls for: entered past its limit, kept (if not above the current level)
        while within the hysteresis."""
        best = 0
        for i in range(1, len(self.levels) + 1):
            if self.beyond(x, i, 0.0) or (i <= level and self.beyond(x, i, self.hyst)):
                best = i
        return best


def as_number(typ, v):
    if typ == "str":
        return None
    if typ == "bool":
        return 1.0 if v else 0.0
    if typ == "i64":
        return float(v)
    f = float(v)
    return f if math.isfinite(f) else None


def run(rules_cfg, items):
    rules = [Rule(c, i) for i, c in enumerate(rules_cfg)]
    seq = {r.name: 0 for r in rules}
    st = {}  # (rule index, series id) -> dict
    events = []

    def emit(r, sid, new, ts, cause_ts):
        s = st[(r.index, sid)]
        seq[r.name] += 1
        events.append([r.name, seq[r.name], sid, s["level"], new, ts, cause_ts])
        s["level"] = new
        s["pending"] = None

    def fresh():
        return {"level": 0, "pending": None, "last": None, "window": []}

    for item in items:
        if "tick" in item:
            clock = item["tick"]
            for (ri, sid) in sorted(st):
                r = rules[ri]
                if r.cond != "stale":
                    continue
                s = st[(ri, sid)]
                while s["last"] is not None and s["level"] < len(r.levels):
                    due = s["last"] + r.bound(s["level"] + 1)
                    if clock > due:
                        emit(r, sid, s["level"] + 1, due, None)
                    else:
                        break
            continue
        sid, key, tags, ts, (typ, raw), quality = item["obs"]
        for r in rules:
            if not r.applies(key, tags):
                continue
            s = st.setdefault((r.index, sid), fresh())
            if r.cond == "stale":
                if s["last"] is not None:
                    while s["level"] < len(r.levels):
                        due = s["last"] + r.bound(s["level"] + 1)
                        if ts > due:
                            emit(r, sid, s["level"] + 1, due, None)
                        else:
                            break
                s["last"] = ts if s["last"] is None else max(s["last"], ts)
                if s["level"] != 0:
                    emit(r, sid, 0, ts, ts)
                continue
            if r.cond == "quality":
                x = float(quality)
            else:
                if quality == 2:
                    continue
                x = as_number(typ, raw)
                if x is None:
                    continue
            if r.cond == "rate":
                w = s["window"]
                w.append((ts, x))
                w[:] = [p for p in w if p[0] >= ts - r.span][-MAX_WINDOW:]
                t0, v0 = w[0]
                if t0 >= ts:
                    continue
                x = abs(x - v0) / ((ts - t0) / 1000.0)
            want = r.wanted(s["level"], x)
            if want == s["level"]:
                s["pending"] = None
                continue
            up = want > s["level"]
            if s["pending"] is not None and (s["pending"][0] > s["level"]) == up:
                started = s["pending"][1]
            else:
                started = ts
            s["pending"] = (want, started)
            if ts - started >= (r.on_delay if up else r.off_delay):
                emit(r, sid, want, ts, ts)
    return events


if __name__ == "__main__":
    data = json.load(sys.stdin)
    json.dump(run(data["rules"], data["items"]), sys.stdout)
