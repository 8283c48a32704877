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

/// The last value sent for a point.
#[derive(Debug, Clone, Default)]
pub struct LastSent {
    value: Option<f64>,
    text: Option<String>,
    at_ms: i64,
}

impl LastSent {
    /// Decides for a numeric value at `now_ms`, recording it if it is to be sent.
    pub fn numeric(&mut self, rule: Option<&Deadband>, v: f64, now_ms: i64) -> bool {
        let send = match (rule, self.value) {
            (None, _) | (_, None) => true,
            (Some(r), Some(last)) => {
                now_ms - self.at_ms >= (r.heartbeat_s as i64) * 1000
                    || match r.mode {
                        DeadbandMode::Change => v.to_bits() != last.to_bits(),
                        DeadbandMode::Absolute => (v - last).abs() > r.value,
                        DeadbandMode::Percent => (v - last).abs() > r.value / 100.0 * last.abs(),
                    }
            }
        };
        if send {
            self.value = Some(v);
            self.at_ms = now_ms;
        }
        send
    }

    /// Decides for a string value (any deadband means "on change").
    pub fn text(&mut self, rule: Option<&Deadband>, v: &str, now_ms: i64) -> bool {
        let send = match (rule, &self.text) {
            (None, _) | (_, None) => true,
            (Some(r), Some(last)) => {
                now_ms - self.at_ms >= (r.heartbeat_s as i64) * 1000 || last != v
            }
        };
        if send {
            self.text = Some(v.to_owned());
            self.at_ms = now_ms;
        }
        send
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

    #[test]
    fn absolute_and_percent_deadbands_with_heartbeat() {
        let r = rule(DeadbandMode::Absolute, 0.5);
        let mut l = LastSent::default();
        assert!(l.numeric(Some(&r), 10.0, 0), "first value always goes");
        assert!(!l.numeric(Some(&r), 10.4, 1000));
        assert!(l.numeric(Some(&r), 10.6, 2000));
        assert!(!l.numeric(Some(&r), 10.6, 11_000));
        assert!(l.numeric(Some(&r), 10.6, 12_000), "heartbeat after 10 s");
        let r = rule(DeadbandMode::Percent, 10.0);
        let mut l = LastSent::default();
        l.numeric(Some(&r), 100.0, 0);
        assert!(!l.numeric(Some(&r), 109.0, 1));
        assert!(l.numeric(Some(&r), 111.0, 2));
    }

    #[test]
    fn change_mode_and_strings() {
        let r = rule(DeadbandMode::Change, 0.0);
        let mut l = LastSent::default();
        assert!(l.numeric(Some(&r), 1.0, 0));
        assert!(!l.numeric(Some(&r), 1.0, 1));
        assert!(l.numeric(Some(&r), 2.0, 2));
        let mut t = LastSent::default();
        assert!(t.text(Some(&r), "run", 0));
        assert!(!t.text(Some(&r), "run", 1));
        assert!(t.text(Some(&r), "stop", 2));
        assert!(t.text(None, "stop", 3), "no deadband: always");
    }
}
