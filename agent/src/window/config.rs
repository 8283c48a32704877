//! `[windows]` and `[[windows.rules]]`: windowed aggregates computed on the agent (see `docs/windows.md`).

use serde::Deserialize;
use std::collections::BTreeMap;

/// An aggregate function of a window.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Func {
    /// Readings aggregated (an integer reading).
    Count,
    /// Smallest value.
    Min,
    /// Largest value.
    Max,
    /// `sum / count` in f64.
    Mean,
    /// Sum in f64, in the order the readings were released (see `docs/windows.md`, "Floating point").
    Sum,
    /// The value of the reading with the earliest event time.
    First,
    /// The value of the reading with the latest event time.
    Last,
}

impl Func {
    /// Its name in derived series keys (`<series>/<name>_<size>`).
    pub fn name(self) -> &'static str {
        match self {
            Func::Count => "count",
            Func::Min => "min",
            Func::Max => "max",
            Func::Mean => "mean",
            Func::Sum => "sum",
            Func::First => "first",
            Func::Last => "last",
        }
    }

    /// Every function, in the order of their codes ([`Func::code`]).
    pub const ALL: [Func; 7] = [
        Func::Count,
        Func::Min,
        Func::Max,
        Func::Mean,
        Func::Sum,
        Func::First,
        Func::Last,
    ];

    /// The function named `name` ([`Func::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Its code in persisted window states.
    pub fn code(self) -> u8 {
        Self::ALL.iter().position(|&f| f == self).unwrap_or(0) as u8
    }

    /// The function of code `code` ([`Func::code`]).
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(code as usize).copied()
    }
}

/// What happens to a reading whose window has already closed.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LatePolicy {
    /// Leave it out of the aggregates (counted); the raw reading goes as the rule's `keep_raw` says (default).
    #[default]
    Drop,
    /// Leave it out of the aggregates (counted) and send it raw with the late flag, even with `keep_raw = false`.
    Raw,
}

/// One window rule.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WindowRuleConfig {
    /// The rule's name: 1 to 64 characters of `[A-Za-z0-9._-]`, unique. Its window state is kept under this name,
    /// so renaming a rule starts its windows afresh.
    pub name: String,
    /// Series the rule aggregates: a filter on the series key with MQTT wildcards (`+` one level, `#` the rest),
    /// the same matcher as alarm rules. Each matching series has its own windows.
    pub series: String,
    /// Tags a series must carry (all of them, with these values). Default: none.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Tumbling window sizes, ms (1 to 8 different sizes, each 100 ms to 1 day). Windows are aligned to the
    /// Unix epoch: a window of size `s` covers `[k·s, (k+1)·s)`.
    pub sizes_ms: Vec<u64>,
    /// The functions computed per window (1 to 7 different ones): `count`, `min`, `max`, `mean`, `sum`, `first`,
    /// `last`. Each gives one derived series per size: `<series>/<function>_<size>`.
    pub functions: Vec<Func>,
    /// How far behind the newest reading of its series a reading may be and still count: a window closes once
    /// the series' watermark (its newest event time minus this) reaches the window's end. Default 0, at most
    /// 1 day.
    #[serde(default)]
    pub allowed_lateness_ms: u64,
    /// A reading whose window has already closed: `drop` (default) or `raw` (sent raw with the late flag).
    #[serde(default)]
    pub late: LatePolicy,
    /// How long a series may stay silent past the moment its watermark would have reached a window's end (had it
    /// gone on reporting at the clock's pace) before that window is closed anyway: the last windows of a series
    /// that stops reporting (a sensor removed or broken) are sent, instead of waiting for a reading that never
    /// comes (under `keep_raw = false` the readings in them would never land). A reading of that window arriving
    /// later is late. Timed on the agent's intake clock: monotonic, standing still while the agent takes no
    /// readings (intake paused, an MQTT connection down), in memory (a restart starts it again). 0: only the
    /// series' own readings close its windows. Default 3600000 (one hour), at most 1 day.
    #[serde(default = "default_idle_close")]
    pub idle_close_ms: u64,
    /// Send the raw readings too. `false`: the matched readings feed the windows and are deleted in the same
    /// transaction, never sent (readings the windows cannot aggregate are always sent). Default true.
    #[serde(default = "yes")]
    pub keep_raw: bool,
}

fn default_idle_close() -> u64 {
    3_600_000
}

fn yes() -> bool {
    true
}

/// `[windows]`: the rules and the memory cap.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WindowsConfig {
    /// Open windows held at most, over all rules, series and sizes (each about 100 bytes in memory). A reading
    /// that needs a new window beyond the cap is left out of it and sent raw, whatever `keep_raw` (counted in
    /// `fieldlink_window_overflow_total`). Default 100000.
    #[serde(default = "default_max_open")]
    pub max_open_windows: usize,
    /// The rules (`[[windows.rules]]`).
    #[serde(default)]
    pub rules: Vec<WindowRuleConfig>,
}

fn default_max_open() -> usize {
    100_000
}

/// No rules (what a configuration without `[windows]` gets).
impl Default for WindowsConfig {
    fn default() -> Self {
        Self {
            max_open_windows: default_max_open(),
            rules: Vec::new(),
        }
    }
}

/// Smallest window size, ms.
pub const MIN_SIZE_MS: u64 = 100;
/// Largest window size and allowed lateness, ms (one day).
pub const MAX_SPAN_MS: u64 = 86_400_000;
/// Window sizes per rule, at most.
pub const MAX_SIZES: usize = 8;

/// The suffix of a size in derived series names: `60s` for whole seconds, else `250ms`.
pub fn size_suffix(size_ms: u64) -> String {
    if size_ms.is_multiple_of(1000) {
        format!("{}s", size_ms / 1000)
    } else {
        format!("{size_ms}ms")
    }
}

impl WindowRuleConfig {
    /// Every problem of this rule, each naming its field under `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p: Vec<String> = crate::alarm::name_problem(path, &self.name)
            .into_iter()
            .collect();
        if let Some(why) = crate::mqtt::filter_problem(&self.series) {
            p.push(format!("{path}.series: {why}"));
        }
        if self.tags.keys().any(String::is_empty) {
            p.push(format!("{path}.tags: a tag name must not be empty"));
        }
        if self.sizes_ms.is_empty() || self.sizes_ms.len() > MAX_SIZES {
            p.push(format!(
                "{path}.sizes_ms: 1 to {MAX_SIZES} sizes required, got {}",
                self.sizes_ms.len()
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, &s) in self.sizes_ms.iter().enumerate() {
            if !(MIN_SIZE_MS..=MAX_SPAN_MS).contains(&s) {
                p.push(format!(
                    "{path}.sizes_ms[{i}]: {MIN_SIZE_MS} to {MAX_SPAN_MS} ms, got {s}"
                ));
            }
            if !seen.insert(s) {
                p.push(format!("{path}.sizes_ms[{i}]: {s} is listed twice"));
            }
        }
        if self.functions.is_empty() {
            p.push(format!(
                "{path}.functions: at least one of count, min, max, mean, sum, first, last"
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, f) in self.functions.iter().enumerate() {
            if !seen.insert(*f) {
                p.push(format!(
                    "{path}.functions[{i}]: {} is listed twice",
                    f.name()
                ));
            }
        }
        if self.allowed_lateness_ms > MAX_SPAN_MS {
            p.push(format!(
                "{path}.allowed_lateness_ms: at most {MAX_SPAN_MS}, got {}",
                self.allowed_lateness_ms
            ));
        }
        if self.idle_close_ms > MAX_SPAN_MS {
            p.push(format!(
                "{path}.idle_close_ms: at most {MAX_SPAN_MS}, got {}",
                self.idle_close_ms
            ));
        }
        p
    }
}

impl WindowsConfig {
    /// Rules whose reach (lateness plus largest size) exceeds `dedup_window_ms` (`[order] dedup_window_ms`): a
    /// reading the broker delivers again after a crash, later than the dedup window behind its series' newest
    /// reading, but still within an open window, would be counted twice. Logged as warnings at start: how far
    /// behind a redelivered reading can be depends on the broker's in-flight window, not on the configuration.
    pub fn dedup_warnings(&self, path: &str, dedup_window_ms: u64) -> Vec<String> {
        let mut p = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            let reach = r.allowed_lateness_ms + r.sizes_ms.iter().copied().max().unwrap_or(0);
            if reach > dedup_window_ms {
                p.push(format!(
                    "{path}.rules[{i}]: allowed_lateness_ms + the largest size ({reach} ms) exceeds \
                     order.dedup_window_ms ({dedup_window_ms}): a reading the broker delivers again after a crash \
                     more than {dedup_window_ms} ms behind its series' newest could be counted twice; raise \
                     order.dedup_window_ms to {reach} for exactly-once windows"
                ));
            }
        }
        p
    }

    /// Rules whose `idle_close_ms` is shorter than a reading may wait in the agent before its windows see it
    /// (`held_ms`: `[order] reorder_window_ms` + `[batch] linger_ms`): a series whose readings all wait so long
    /// could have its window closed before they are released, and they would be late. Logged at start.
    pub fn idle_warnings(&self, path: &str, held_ms: u64) -> Vec<String> {
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.idle_close_ms > 0 && r.idle_close_ms < held_ms)
            .map(|(i, r)| {
                format!(
                    "{path}.rules[{i}].idle_close_ms: {} is shorter than order.reorder_window_ms + \
                     batch.linger_ms ({held_ms} ms), how long a reading can wait before the windows see it: a \
                     window could close by the clock before its readings are released; raise it above {held_ms}",
                    r.idle_close_ms
                )
            })
            .collect()
    }

    /// Every problem, each naming its field.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        if !(1..=10_000_000).contains(&self.max_open_windows) {
            p.push(format!(
                "{path}.max_open_windows: 1 to 10000000, got {}",
                self.max_open_windows
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            let rp = format!("{path}.rules[{i}]");
            p.extend(r.validate(&rp));
            if !names.insert(r.name.as_str()) {
                p.push(format!("{rp}.name: {:?} is used twice", r.name));
            }
            for (j, earlier) in self.rules[..i].iter().enumerate() {
                if let Some(name) = shared_output(earlier, r) {
                    p.push(format!(
                        "{rp}.series: {:?} and rules[{j}]'s {:?} can match one series and both compute \
                         {name}: that derived series would get two values per window; make the filters or tags \
                         disjoint, or compute {name} in one rule",
                        r.series, earlier.series
                    ));
                }
            }
        }
        p
    }
}

/// Whether some topic matches both MQTT filters (`+` one level, `#` the rest, including the parent level).
pub(super) fn filters_overlap(a: &str, b: &str) -> bool {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('/').collect(), b.split('/').collect());
    for i in 0.. {
        match (a.get(i), b.get(i)) {
            (Some(&"#"), _) | (_, Some(&"#")) | (None, None) => return true,
            (None, Some(_)) | (Some(_), None) => return false,
            (Some(x), Some(y)) if *x != "+" && *y != "+" && x != y => return false,
            _ => {}
        }
    }
    false
}

/// The first `<function>_<size>` two rules both compute for a series both can match, if any.
fn shared_output(a: &WindowRuleConfig, b: &WindowRuleConfig) -> Option<String> {
    let tags_conflict = a
        .tags
        .iter()
        .any(|(k, v)| b.tags.get(k).is_some_and(|w| w != v));
    if tags_conflict || !filters_overlap(&a.series, &b.series) {
        return None;
    }
    let size = a.sizes_ms.iter().find(|s| b.sizes_ms.contains(s))?;
    let func = a.functions.iter().find(|f| b.functions.contains(f))?;
    Some(format!("{}_{}", func.name(), size_suffix(*size)))
}
