//! What the xDS server serves, generation by generation. The relay turns
//! each index snapshot into a [`Served`] that reuses the previous
//! generation's shared resource wherever the content did not change, and
//! records which names did change in a [`ChangeLog`]. Both keep per-proxy
//! cost proportional to what changed:
//! - a proxy's held set points at the served resources (no copied names or
//!   versions), and sharing unchanged ones keeps those pointers from pinning
//!   every old generation in memory;
//! - a proxy known to hold exactly an earlier generation is diffed over the
//!   changed names only: with 10,000 workloads and 100 proxies, one pod
//!   change costs a hundred small lookups instead of a hundred full merges.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use super::scope::ScopeChanges;
use crate::snapshot::{Resources, Snapshot};

/// Steps remembered: a proxy more generations behind gets a full diff.
const MAX_STEPS: usize = 64;
/// Names remembered across all steps, bounding memory after mass changes.
const MAX_NAMES: usize = 100_000;

/// Type URL -> names added, changed or removed in one step.
pub type Changes = BTreeMap<String, BTreeSet<String>>;

/// The resources of one generation, by type URL.
#[derive(Clone, Debug, Default)]
pub struct Served {
    types: BTreeMap<String, Resources>,
}

impl Served {
    /// The resources of one type (empty when there are none).
    pub fn of_type(&self, type_url: &str) -> &Resources {
        static EMPTY: Resources = BTreeMap::new();
        self.types.get(type_url).unwrap_or(&EMPTY)
    }

    /// The generation after this one: `snapshot`'s resources, sharing this
    /// generation's wherever the version is unchanged, and what changed.
    pub fn next(&self, snapshot: &Snapshot) -> (Served, Changes) {
        let type_urls: BTreeSet<&str> = self
            .types
            .keys()
            .map(String::as_str)
            .chain(snapshot.type_urls())
            .collect();
        let mut next = Served::default();
        let mut changes = Changes::new();
        for type_url in type_urls {
            let (resources, changed) = merge(self.of_type(type_url), snapshot.of_type(type_url));
            if !resources.is_empty() {
                next.types.insert(type_url.to_string(), resources);
            }
            if !changed.is_empty() {
                changes.insert(type_url.to_string(), changed);
            }
        }
        (next, changes)
    }
}

/// One merge pass over both sorted maps: `new` with `old`'s shared resource
/// where the version is equal, and the names added, changed or removed.
fn merge(old: &Resources, new: &Resources) -> (Resources, BTreeSet<String>) {
    let mut merged = Resources::new();
    let mut changed = BTreeSet::new();
    let mut old = old.iter().peekable();
    for (name, resource) in new {
        while let Some((gone, _)) = old.next_if(|(o, _)| o.as_str() < name.as_str()) {
            changed.insert(gone.clone());
        }
        let shared = match old.next_if(|(o, _)| *o == name) {
            Some((_, before)) if before.version == resource.version => before.clone(),
            _ => {
                changed.insert(name.clone());
                resource.clone()
            }
        };
        merged.insert(name.clone(), shared);
    }
    changed.extend(old.map(|(gone, _)| gone.clone()));
    (merged, changed)
}

#[derive(Debug)]
struct Step {
    /// The generation this step leads to.
    generation: u64,
    changes: Changes,
    /// Per waypoint: the names that entered or left its scope.
    scopes: ScopeChanges,
    count: usize,
}

/// The most recent steps, oldest first. Cheap to clone (shared steps).
#[derive(Clone, Debug, Default)]
pub struct ChangeLog {
    steps: VecDeque<Arc<Step>>,
    names: usize,
}

impl ChangeLog {
    /// Records the step that led to `generation`: what changed, and what
    /// entered or left each waypoint's scope.
    pub fn record(&mut self, generation: u64, changes: Changes, scopes: ScopeChanges) {
        if self
            .steps
            .back()
            .is_some_and(|last| last.generation + 1 != generation)
        {
            // A gap would make `since` wrong; start over.
            self.steps.clear();
            self.names = 0;
        }
        let count = changes.values().map(BTreeSet::len).sum::<usize>()
            + scopes
                .values()
                .flat_map(|c| c.values())
                .map(BTreeSet::len)
                .sum::<usize>();
        self.steps.push_back(Arc::new(Step {
            generation,
            changes,
            scopes,
            count,
        }));
        self.names += count;
        while self.steps.len() > MAX_STEPS || (self.names > MAX_NAMES && self.steps.len() > 1) {
            if let Some(dropped) = self.steps.pop_front() {
                self.names -= dropped.count;
            }
        }
    }

    /// The names of `type_url` that changed after generation `base` up to
    /// `current`, and, for the waypoint `scope`, those that entered or left
    /// its scope; `None` when those steps are no longer remembered.
    pub fn since(
        &self,
        base: u64,
        current: u64,
        type_url: &str,
        scope: Option<&str>,
    ) -> Option<BTreeSet<&str>> {
        if base == current {
            return Some(BTreeSet::new());
        }
        let (first, last) = (self.steps.front()?, self.steps.back()?);
        if base > current || first.generation > base + 1 || last.generation != current {
            return None;
        }
        let mut names = BTreeSet::new();
        for step in self.steps.iter().filter(|s| s.generation > base) {
            if let Some(changed) = step.changes.get(type_url) {
                names.extend(changed.iter().map(String::as_str));
            }
            let moved = scope
                .and_then(|key| step.scopes.get(key))
                .and_then(|c| c.get(type_url));
            if let Some(moved) = moved {
                names.extend(moved.iter().map(String::as_str));
            }
        }
        Some(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Resource;
    use api::security::Authorization;

    const T: &str = api::type_url::AUTHORIZATION;

    fn snapshot(items: &[(&str, &str)]) -> Snapshot {
        let mut s = Snapshot::default();
        for (name, rev) in items {
            let msg = Authorization {
                name: (*name).into(),
                namespace: (*rev).into(),
                ..Default::default()
            };
            s.insert(Resource::new(T, *name, &msg));
        }
        s
    }

    fn names<'a>(set: &BTreeSet<&'a str>) -> Vec<&'a str> {
        set.iter().copied().collect()
    }

    #[test]
    fn shares_unchanged_resources_and_lists_changes() {
        let (g1, _) = Served::default().next(&snapshot(&[("a", "1"), ("b", "1"), ("c", "1")]));
        let (g2, changes) = g1.next(&snapshot(&[("b", "2"), ("c", "1"), ("d", "1")]));
        let changed: Vec<&str> = changes[T].iter().map(String::as_str).collect();
        assert_eq!(changed, ["a", "b", "d"]);
        // `c` is the same allocation as before; `b` is the new one.
        assert!(Arc::ptr_eq(&g1.of_type(T)["c"], &g2.of_type(T)["c"]));
        assert!(!Arc::ptr_eq(&g1.of_type(T)["b"], &g2.of_type(T)["b"]));
        assert_eq!(g2.of_type(T).len(), 3);
        // Everything gone: the type disappears.
        let (g3, changes) = g2.next(&Snapshot::default());
        assert!(g3.of_type(T).is_empty());
        assert_eq!(changes[T].len(), 3);
    }

    #[test]
    fn change_log_unions_steps() {
        let (g1, _) = Served::default().next(&snapshot(&[("a", "1"), ("b", "1"), ("c", "1")]));
        let (g2, c2) = g1.next(&snapshot(&[("b", "2"), ("c", "1"), ("d", "1")]));
        let (_, c3) = g2.next(&snapshot(&[("b", "2"), ("c", "1"), ("d", "2")]));
        let mut log = ChangeLog::default();
        log.record(2, c2, ScopeChanges::new());
        let moved = Changes::from([(T.to_string(), BTreeSet::from(["x".to_string()]))]);
        log.record(3, c3, ScopeChanges::from([("ns/wp".to_string(), moved)]));
        assert_eq!(names(&log.since(1, 3, T, None).unwrap()), ["a", "b", "d"]);
        assert_eq!(names(&log.since(2, 3, T, None).unwrap()), ["d"]);
        // A waypoint also sees what entered or left its scope.
        assert_eq!(
            names(&log.since(2, 3, T, Some("ns/wp")).unwrap()),
            ["d", "x"]
        );
        assert_eq!(names(&log.since(2, 3, T, Some("ns/other")).unwrap()), ["d"]);
        assert!(log.since(3, 3, T, None).unwrap().is_empty());
        assert!(
            log.since(2, 3, api::type_url::ADDRESS, None)
                .unwrap()
                .is_empty()
        );
        // Not remembered, or not the log's generation.
        assert!(log.since(0, 3, T, None).is_none());
        assert!(log.since(1, 4, T, None).is_none());
    }

    #[test]
    fn forgets_old_steps() {
        let step = || Changes::from([(T.to_string(), BTreeSet::from(["a".to_string()]))]);
        let mut log = ChangeLog::default();
        for generation in 2..(MAX_STEPS as u64 + 10) {
            log.record(generation, step(), ScopeChanges::new());
        }
        let current = MAX_STEPS as u64 + 9;
        assert!(log.since(1, current, T, None).is_none());
        assert_eq!(
            names(&log.since(current - 1, current, T, None).unwrap()),
            ["a"]
        );
        // A gap starts the log over.
        log.record(current + 5, step(), ScopeChanges::new());
        assert!(log.since(current - 1, current + 5, T, None).is_none());
        assert!(log.since(current + 4, current + 5, T, None).is_some());
    }
}
