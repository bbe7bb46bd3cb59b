//! Readiness conditions: the process is ready when every registered
//! condition ("xds synced", "zds snapshot received", ...) has been met.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The set of conditions; clone it freely.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    /// Unmet conditions by name, counted (two of a name need two marks).
    pending: Arc<Mutex<BTreeMap<String, usize>>>,
}

/// One unmet condition. Dropping it without [`Condition::mark_ready`] leaves
/// the process not ready: a task that dies before its job is done must not
/// make the proxy look ready.
#[derive(Debug)]
pub struct Condition {
    name: String,
    readiness: Readiness,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an unmet condition.
    pub fn register(&self, name: impl Into<String>) -> Condition {
        let name = name.into();
        *self.lock().entry(name.clone()).or_default() += 1;
        Condition {
            name,
            readiness: self.clone(),
        }
    }

    /// The unmet conditions, sorted.
    pub fn missing(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn is_ready(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, usize>> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Condition {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn mark_ready(self) {
        let mut pending = self.readiness.lock();
        if let Some(n) = pending.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_condition_is_met() {
        let r = Readiness::new();
        assert!(r.is_ready());
        let xds = r.register("xds synced");
        let zds = r.register("zds snapshot received");
        let zds2 = r.register("zds snapshot received");
        assert_eq!(r.missing(), ["xds synced", "zds snapshot received"]);
        zds.mark_ready();
        assert_eq!(r.missing(), ["xds synced", "zds snapshot received"]);
        zds2.mark_ready();
        xds.mark_ready();
        assert!(r.is_ready());
    }

    #[test]
    fn dropping_a_condition_keeps_it_unmet() {
        let r = Readiness::new();
        drop(r.register("certificates"));
        assert_eq!(r.missing(), ["certificates"]);
    }
}
