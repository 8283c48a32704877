//! Report by exception: whether a new value is worth sending. Pure.

use serde::Deserialize;

/// A point's reporting rule (`deadband = { mode = "absolute", value = 0.5, heartbeat_s = 60 }`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Deadband {
    /// `change` (any change), `absolute` (|new − last sent| > value) or `percent` (> value % of |last sent|).
    pub mode: DeadbandMode,
    /// Threshold for `absolute` and `percent`.
    #[serde(default)]
    pub value: f64,
    /// Send the current value at least this often even when unchanged, seconds. Default 300.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_s: u64,
}

fn default_heartbeat() -> u64 {
    300
}

/// Deadband modes.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeadbandMode {
    /// Any change.
    Change,
    /// Absolute difference.
    Absolute,
    /// Percent of the last sent value.
    Percent,
}

/// The last value sent for a point: what the next value is compared with. The caller records a value only once
/// it is queued for the buffer, and forgets it when the point answered an exception (the cloud's latest reading
/// of it is then a bad one), so the next good value always goes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LastSent {
    value: Option<f64>,
    text: Option<String>,
    at_ms: i64,
}

impl LastSent {
    /// Whether numeric value `v` at `now_ms` is to be sent. A NaN on either side counts as a change unless both
    /// are the same NaN (no threshold compares with a NaN).
    pub fn numeric(&self, rule: Option<&Deadband>, v: f64, now_ms: i64) -> bool {
        match (rule, self.value) {
            (None, _) | (_, None) => true,
            (Some(r), Some(last)) => {
                now_ms - self.at_ms >= (r.heartbeat_s as i64) * 1000
                    || match r.mode {
                        _ if v.is_nan() || last.is_nan() => v.to_bits() != last.to_bits(),
                        DeadbandMode::Change => v.to_bits() != last.to_bits(),
                        DeadbandMode::Absolute => (v - last).abs() > r.value,
                        DeadbandMode::Percent => (v - last).abs() > r.value / 100.0 * last.abs(),
                    }
            }
        }
    }

    /// Whether string value `v` at `now_ms` is to be sent (any deadband means "on change").
    pub fn text(&self, rule: Option<&Deadband>, v: &str, now_ms: i64) -> bool {
        match (rule, &self.text) {
            (None, _) | (_, None) => true,
            (Some(r), Some(last)) => {
                now_ms - self.at_ms >= (r.heartbeat_s as i64) * 1000 || last != v
            }
        }
    }

    /// The state after sending numeric value `v` at `now_ms`.
    pub fn sent_numeric(v: f64, now_ms: i64) -> Self {
        Self {
            value: Some(v),
            text: None,
            at_ms: now_ms,
        }
    }

    /// The state after sending string value `v` at `now_ms`.
    pub fn sent_text(v: &str, now_ms: i64) -> Self {
        Self {
            value: None,
            text: Some(v.to_owned()),
            at_ms: now_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(mode: DeadbandMode, value: f64) -> Deadband {
        Deadband {
            mode,
            value,
            heartbeat_s: 10,
        }
    }

    /// Decides for `v` and records it when sent (as the poller does once the reading is queued).
    fn offer(l: &mut LastSent, r: &Deadband, v: f64, now: i64) -> bool {
        let send = l.numeric(Some(r), v, now);
        if send {
            *l = LastSent::sent_numeric(v, now);
        }
        send
    }

    fn offer_text(l: &mut LastSent, r: Option<&Deadband>, v: &str, now: i64) -> bool {
        let send = l.text(r, v, now);
        if send {
            *l = LastSent::sent_text(v, now);
        }
        send
    }

    #[test]
    fn absolute_and_percent_deadbands_with_heartbeat() {
        let r = rule(DeadbandMode::Absolute, 0.5);
        let mut l = LastSent::default();
        assert!(offer(&mut l, &r, 10.0, 0), "first value always goes");
        assert!(!offer(&mut l, &r, 10.4, 1000));
        assert!(offer(&mut l, &r, 10.6, 2000));
        assert!(!offer(&mut l, &r, 10.6, 11_000));
        assert!(offer(&mut l, &r, 10.6, 12_000), "heartbeat after 10 s");
        let r = rule(DeadbandMode::Percent, 10.0);
        let mut l = LastSent::default();
        offer(&mut l, &r, 100.0, 0);
        assert!(!offer(&mut l, &r, 109.0, 1));
        assert!(offer(&mut l, &r, 111.0, 2));
    }

    #[test]
    fn change_mode_and_strings() {
        let r = rule(DeadbandMode::Change, 0.0);
        let mut l = LastSent::default();
        assert!(offer(&mut l, &r, 1.0, 0));
        assert!(!offer(&mut l, &r, 1.0, 1));
        assert!(offer(&mut l, &r, 2.0, 2));
        let mut t = LastSent::default();
        assert!(offer_text(&mut t, Some(&r), "run", 0));
        assert!(!offer_text(&mut t, Some(&r), "run", 1));
        assert!(offer_text(&mut t, Some(&r), "stop", 2));
        assert!(offer_text(&mut t, None, "stop", 3), "no deadband: always");
    }

    #[test]
    fn a_nan_never_hides_the_next_value() {
        for mode in [
            DeadbandMode::Absolute,
            DeadbandMode::Percent,
            DeadbandMode::Change,
        ] {
            let r = rule(mode, 0.5);
            let mut l = LastSent::default();
            assert!(offer(&mut l, &r, f64::NAN, 0));
            // Before: every threshold compared with NaN was false, so only heartbeats went.
            assert!(offer(&mut l, &r, 10.0, 1), "{mode:?}: a value after a NaN");
            assert!(
                offer(&mut l, &r, f64::NAN, 2),
                "{mode:?}: a NaN after a value"
            );
            assert!(
                !offer(&mut l, &r, f64::NAN, 3),
                "{mode:?}: the same NaN again"
            );
        }
    }
}
