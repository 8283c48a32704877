//! `[alarms]` and `[[alarms.rules]]`: alarm rules evaluated on the agent (see `docs/alarms.md`).

use serde::Deserialize;
use std::collections::BTreeMap;

/// What a rule watches.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// The value is above a level's `limit` (a level is left when the value is at or below `limit − hysteresis`).
    Above,
    /// The value is below a level's `limit` (left at or above `limit + hysteresis`).
    Below,
    /// The absolute rate of change, units per second, between the reading and the oldest reading of the series
    /// within `span_ms` before it, is above a level's `limit`.
    Rate,
    /// No reading for more than a level's `after_ms` (see "Clocks" in `docs/alarms.md`).
    Stale,
    /// The reading's quality is at least a level's `quality` (`uncertain` or `bad`).
    Quality,
}

/// A quality a `quality` rule's level starts at.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum QualityLevel {
    /// Uncertain or bad.
    Uncertain = 1,
    /// Bad.
    Bad = 2,
}

/// One level of a rule. Level 0, `ok`, is implicit; the listed levels are 1, 2, … in order of severity.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LevelConfig {
    /// Its name, e.g. `warning`, `critical` (not `ok`, unique within the rule).
    pub name: String,
    /// `above`, `below`, `rate`: the limit (for `rate`, units per second).
    #[serde(default)]
    pub limit: Option<f64>,
    /// `stale`: the level is entered when no reading came for more than this many ms.
    #[serde(default)]
    pub after_ms: Option<u64>,
    /// `quality`: the level is entered by a reading of this quality or worse.
    #[serde(default)]
    pub quality: Option<QualityLevel>,
}

/// One alarm rule.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The rule's name: 1 to 64 characters of `[A-Za-z0-9._-]`, unique. Its state and sequence numbers are kept
    /// under this name, so renaming a rule starts it afresh.
    pub name: String,
    /// Series the rule applies to: a filter on the series key with MQTT wildcards (`+` one level, `#` the rest),
    /// e.g. `line3/+/+/vib_rms`. Each matching series has its own state.
    pub series: String,
    /// Tags a series must carry (all of them, with these values) for the rule to apply. Default: none.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// What is watched.
    pub condition: Condition,
    /// The levels, least severe first (at least one, at most 254). `above`/`rate`: limits increasing; `below`:
    /// limits decreasing; `stale`: `after_ms` increasing; `quality`: `uncertain` before `bad`.
    pub levels: Vec<LevelConfig>,
    /// `above`, `below`, `rate`: how far the value must come back past a level's limit to leave it. Default 0.
    #[serde(default)]
    pub hysteresis: f64,
    /// A more severe level is entered only once the readings called for it for at least this long (event time,
    /// judged at each reading). Default 0. Not for `stale` (its `after_ms` is the delay).
    #[serde(default)]
    pub on_delay_ms: u64,
    /// A less severe level (or `ok`) is entered only once the readings called for it for at least this long.
    /// Default 0. Not for `stale`.
    #[serde(default)]
    pub off_delay_ms: u64,
    /// `rate` only: the span the rate is measured over, ms (required).
    #[serde(default)]
    pub span_ms: Option<u64>,
    /// Publish this rule's status on the local MQTT broker (needs `[alarms] publish_connection`). Default true.
    #[serde(default = "yes")]
    pub publish: bool,
}

fn yes() -> bool {
    true
}

/// `[alarms]`: the rules and where their status is published locally.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlarmsConfig {
    /// The name of an `[[mqtt]]` connection to publish each rule's status on (retained, QoS 1), after the alarm
    /// events are committed. Default: none (no local publishing).
    #[serde(default)]
    pub publish_connection: Option<String>,
    /// Status topic prefix: a status goes to `<topic_prefix>/<rule>/<series key>`. Default `fieldlink/alarms`.
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// The rules (`[[alarms.rules]]`).
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

fn default_prefix() -> String {
    "fieldlink/alarms".into()
}

/// No rules (what a configuration without `[alarms]` gets).
impl Default for AlarmsConfig {
    fn default() -> Self {
        Self {
            publish_connection: None,
            topic_prefix: default_prefix(),
            rules: Vec::new(),
        }
    }
}

/// The problem with a rule's `name` (alarm or window rule: it keys the rule's persisted state), if any.
pub(crate) fn name_problem(path: &str, name: &str) -> Option<String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    (!ok).then(|| format!("{path}.name: 1 to 64 letters, digits, '.', '_' or '-', got {name:?}"))
}

/// Largest number of levels of one rule (severities are one byte, 0 is `ok`).
pub const MAX_LEVELS: usize = 254;

impl RuleConfig {
    /// Every problem of this rule, each naming its field under `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p: Vec<String> = name_problem(path, &self.name).into_iter().collect();
        if let Some(why) = crate::mqtt::filter_problem(&self.series) {
            p.push(format!("{path}.series: {why}"));
        }
        for k in self.tags.keys() {
            if k.is_empty() {
                p.push(format!("{path}.tags: a tag name must not be empty"));
            }
        }
        if self.levels.is_empty() || self.levels.len() > MAX_LEVELS {
            p.push(format!(
                "{path}.levels: 1 to {MAX_LEVELS} levels required, got {}",
                self.levels.len()
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, l) in self.levels.iter().enumerate() {
            let lp = format!("{path}.levels[{i}]");
            if l.name.is_empty() || l.name.len() > 64 || l.name == "ok" {
                p.push(format!(
                    "{lp}.name: 1 to 64 characters and not \"ok\" (level 0), got {:?}",
                    l.name
                ));
            }
            if !names.insert(l.name.as_str()) {
                p.push(format!("{lp}.name: {:?} is used twice", l.name));
            }
            let (want, wrong): (&str, [(&str, bool); 2]) = match self.condition {
                Condition::Above | Condition::Below | Condition::Rate => (
                    "limit",
                    [
                        ("after_ms", l.after_ms.is_some()),
                        ("quality", l.quality.is_some()),
                    ],
                ),
                Condition::Stale => (
                    "after_ms",
                    [
                        ("limit", l.limit.is_some()),
                        ("quality", l.quality.is_some()),
                    ],
                ),
                Condition::Quality => (
                    "quality",
                    [
                        ("limit", l.limit.is_some()),
                        ("after_ms", l.after_ms.is_some()),
                    ],
                ),
            };
            let has = match want {
                "limit" => l.limit.is_some(),
                "after_ms" => l.after_ms.is_some(),
                _ => l.quality.is_some(),
            };
            if !has {
                p.push(format!(
                    "{lp}.{want}: required for condition {:?}",
                    self.condition
                ));
            }
            for (field, set) in wrong {
                if set {
                    p.push(format!(
                        "{lp}.{field}: not used by condition {:?}",
                        self.condition
                    ));
                }
            }
            if let Some(limit) = l.limit {
                if !limit.is_finite() {
                    p.push(format!("{lp}.limit: must be a finite number"));
                }
                if self.condition == Condition::Rate && limit < 0.0 {
                    p.push(format!(
                        "{lp}.limit: a rate limit is an absolute rate, must be ≥ 0"
                    ));
                }
            }
            if l.after_ms == Some(0) {
                p.push(format!("{lp}.after_ms: must be at least 1"));
            }
        }
        // Levels ordered by severity.
        let ordered = |vals: Vec<f64>, increasing: bool| {
            vals.windows(2)
                .all(|w| if increasing { w[0] < w[1] } else { w[0] > w[1] })
        };
        let ok = match self.condition {
            Condition::Above | Condition::Rate => {
                ordered(self.levels.iter().filter_map(|l| l.limit).collect(), true)
            }
            Condition::Below => {
                ordered(self.levels.iter().filter_map(|l| l.limit).collect(), false)
            }
            Condition::Stale => ordered(
                self.levels
                    .iter()
                    .filter_map(|l| l.after_ms.map(|a| a as f64))
                    .collect(),
                true,
            ),
            Condition::Quality => ordered(
                self.levels
                    .iter()
                    .filter_map(|l| l.quality.map(|q| q as u8 as f64))
                    .collect(),
                true,
            ),
        };
        if !ok {
            let how = match self.condition {
                Condition::Above | Condition::Rate => "limits must increase",
                Condition::Below => "limits must decrease",
                Condition::Stale => "after_ms must increase",
                Condition::Quality => "quality must go from uncertain to bad",
            };
            p.push(format!(
                "{path}.levels: least severe first: {how} from one level to the next"
            ));
        }
        if !self.hysteresis.is_finite() || self.hysteresis < 0.0 {
            p.push(format!(
                "{path}.hysteresis: must be a finite number ≥ 0, got {}",
                self.hysteresis
            ));
        }
        if matches!(self.condition, Condition::Stale | Condition::Quality) && self.hysteresis != 0.0
        {
            p.push(format!(
                "{path}.hysteresis: not used by condition {:?}",
                self.condition
            ));
        }
        if self.condition == Condition::Stale && (self.on_delay_ms != 0 || self.off_delay_ms != 0) {
            p.push(format!(
                "{path}.on_delay_ms, off_delay_ms: not used by condition Stale (after_ms is its delay)"
            ));
        }
        match (self.condition, self.span_ms) {
            (Condition::Rate, None | Some(0)) => p.push(format!(
                "{path}.span_ms: required for condition Rate, at least 1"
            )),
            (Condition::Rate, _) | (_, None) => {}
            (c, Some(_)) => p.push(format!("{path}.span_ms: not used by condition {c:?}")),
        }
        p
    }
}

impl AlarmsConfig {
    /// Every problem, each naming its field. `connections` are the `[[mqtt]]` connections: `(name, filters)`.
    pub fn validate(&self, path: &str, connections: &[(String, Vec<String>)]) -> Vec<String> {
        let mut p = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            p.extend(r.validate(&format!("{path}.rules[{i}]")));
            if !names.insert(r.name.as_str()) {
                p.push(format!(
                    "{path}.rules[{i}].name: {:?} is used twice",
                    r.name
                ));
            }
        }
        if self.topic_prefix.is_empty()
            || self.topic_prefix.contains(['+', '#'])
            || self.topic_prefix.ends_with('/')
        {
            p.push(format!(
                "{path}.topic_prefix: a topic without wildcards or a trailing '/', got {:?}",
                self.topic_prefix
            ));
        }
        if let Some(conn) = &self.publish_connection {
            match connections.iter().find(|(n, _)| n == conn) {
                None => p.push(format!(
                    "{path}.publish_connection: no [[mqtt]] connection is named {conn:?}"
                )),
                Some((_, filters)) => {
                    // The agent would read its own status messages back as readings.
                    let probe = format!("{}/rule/series", self.topic_prefix);
                    for f in filters {
                        // A shared subscription's messages match its filter (and MQTT 5 forbids No Local on it).
                        if crate::mqtt::topic_matches(crate::mqtt::topic_filter(f), &probe) {
                            p.push(format!("{path}.topic_prefix: connection {conn:?} subscribes to {f:?}, which matches the status topics {}/…", self.topic_prefix));
                        }
                    }
                }
            }
        }
        p
    }
}
