//! Counters and gauges in the Prometheus text exposition format (version 0.0.4).
//!
//! A handle is an `Arc` around an atomic: incrementing costs one relaxed atomic add. The registry only holds
//! handles for rendering; it is locked when a metric is created and when `/metrics` is scraped, never on the hot
//! path.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A monotonically increasing count.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that is set from a source of truth (e.g. bytes in the buffer after a commit).
#[derive(Debug, Clone, Default)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
enum Handle {
    Counter(Counter),
    Gauge(Gauge),
}

#[derive(Debug)]
struct Family {
    help: String,
    kind: &'static str,
    series: Vec<(String, Handle)>,
}

/// The set of metrics a process exposes.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    families: Arc<Mutex<BTreeMap<String, Family>>>,
}

fn label_string(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let mut s = String::from("{");
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let v = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(s, "{k}=\"{v}\"");
    }
    s.push('}');
    s
}

impl Registry {
    /// A new, empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn register(
        &self,
        name: &str,
        help: &str,
        kind: &'static str,
        labels: &[(&str, &str)],
        make: impl FnOnce() -> Handle,
    ) -> Handle {
        let mut families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let fam = families.entry(name.to_owned()).or_insert_with(|| Family {
            help: help.to_owned(),
            kind,
            series: Vec::new(),
        });
        let ls = label_string(labels);
        if let Some((_, h)) = fam.series.iter().find(|(l, _)| *l == ls) {
            return h.clone();
        }
        let h = make();
        fam.series.push((ls, h.clone()));
        h
    }

    /// The counter `name{labels}`, created on first use. The same name and labels return the same counter.
    pub fn counter(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Counter {
        match self.register(name, help, "counter", labels, || {
            Handle::Counter(Counter::default())
        }) {
            Handle::Counter(c) => c,
            Handle::Gauge(_) => Counter::default(), // name clash across kinds: detached, caught by tests
        }
    }

    /// The gauge `name{labels}`, created on first use.
    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Gauge {
        match self.register(name, help, "gauge", labels, || {
            Handle::Gauge(Gauge::default())
        }) {
            Handle::Gauge(g) => g,
            Handle::Counter(_) => Gauge::default(),
        }
    }

    /// All metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for (name, fam) in families.iter() {
            let _ = writeln!(out, "# HELP {name} {}", fam.help);
            let _ = writeln!(out, "# TYPE {name} {}", fam.kind);
            for (labels, h) in &fam.series {
                let v = match h {
                    Handle::Counter(c) => c.get() as i64,
                    Handle::Gauge(g) => g.get(),
                };
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        }
        out
    }
}

/// Named components reporting whether they work; `/health` answers 200 only if all do.
#[derive(Debug, Clone, Default)]
pub struct Health {
    components: Arc<Mutex<BTreeMap<String, (bool, String)>>>,
    /// Source connections that were up and are down now ([`Health::set_link`]).
    links_down: Arc<Mutex<std::collections::BTreeSet<String>>>,
}

impl Health {
    /// A new health board.
    pub fn new() -> Self {
        Self::default()
    }
    /// Records the state of `component`.
    pub fn set(&self, component: &str, ok: bool, detail: impl Into<String>) {
        let mut c = self.components.lock().unwrap_or_else(|e| e.into_inner());
        c.insert(component.to_owned(), (ok, detail.into()));
    }
    /// Records whether the connection of a source whose peer keeps readings for it (an MQTT broker) is up. Only a
    /// connection that was up counts as down: one that never came up in this process is not waited for.
    pub fn set_link(&self, component: &str, up: bool) {
        let mut d = self.links_down.lock().unwrap_or_else(|e| e.into_inner());
        if up {
            d.remove(component);
        } else {
            d.insert(component.to_owned());
        }
    }
    /// Whether a source connection that was up is down.
    pub fn links_down(&self) -> bool {
        !self
            .links_down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
    /// `(all ok, one line per component)`.
    pub fn report(&self) -> (bool, String) {
        let c = self.components.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = true;
        let mut body = String::new();
        for (name, (ok, detail)) in c.iter() {
            all &= *ok;
            let _ = writeln!(body, "{name}: {} {detail}", if *ok { "ok" } else { "FAIL" });
        }
        (all, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges_with_escaped_labels() {
        let r = Registry::new();
        let c = r.counter("fl_in_total", "Readings in.", &[("source", "mqtt \"a\"")]);
        c.add(3);
        r.counter("fl_in_total", "Readings in.", &[("source", "mqtt \"a\"")])
            .inc();
        r.gauge("fl_buffer_bytes", "Bytes buffered.", &[]).set(-2);
        let text = r.render();
        assert!(text.contains("# TYPE fl_in_total counter\n"), "{text}");
        assert!(
            text.contains("fl_in_total{source=\"mqtt \\\"a\\\"\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("fl_buffer_bytes -2\n"), "{text}");
    }

    #[test]
    fn health_fails_if_any_component_fails() {
        let h = Health::new();
        h.set("buffer", true, "");
        assert!(h.report().0);
        h.set("kinesis", false, "unreachable");
        let (ok, body) = h.report();
        assert!(!ok);
        assert!(body.contains("kinesis: FAIL unreachable"));
        assert!(!h.links_down());
        h.set_link("mqtt:a", false);
        h.set_link("mqtt:b", false);
        h.set_link("mqtt:a", true);
        assert!(h.links_down());
        h.set_link("mqtt:b", true);
        assert!(!h.links_down());
    }
}
