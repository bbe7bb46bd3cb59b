//! Kubernetes label selection, as the API server defines it.

use std::collections::BTreeMap;

pub(super) type Labels = BTreeMap<String, String>;

static NO_LABELS: Labels = BTreeMap::new();

/// The labels of an object, empty when it has none.
pub(super) fn labels_of(labels: &Option<Labels>) -> &Labels {
    labels.as_ref().unwrap_or(&NO_LABELS)
}

/// `matchLabels`: every pair is present. An empty selector selects all.
pub(super) fn subset_of(selector: &Labels, labels: &Labels) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
}

/// One `matchExpressions` requirement.
pub(super) struct Requirement<'a> {
    pub key: &'a str,
    pub operator: &'a str,
    pub values: &'a [String],
}

/// `matchLabels` plus `matchExpressions`, all ANDed. An unknown operator
/// selects nothing: a selector we cannot read must not widen access.
pub(super) fn selects<'a>(
    match_labels: Option<&Labels>,
    expressions: impl IntoIterator<Item = Requirement<'a>>,
    labels: &Labels,
) -> bool {
    if let Some(m) = match_labels
        && !subset_of(m, labels)
    {
        return false;
    }
    expressions.into_iter().all(|r| {
        let value = labels.get(r.key);
        match r.operator {
            "In" => value.is_some_and(|v| r.values.contains(v)),
            "NotIn" => value.is_none_or(|v| !r.values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn match_labels_and_expressions() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        assert!(subset_of(&labels(&[]), &l));
        assert!(subset_of(&labels(&[("app", "web")]), &l));
        assert!(!subset_of(&labels(&[("app", "db")]), &l));
        let vals = ["front".to_string(), "back".to_string()];
        let req = |operator| Requirement {
            key: "tier",
            operator,
            values: &vals,
        };
        assert!(selects(None, [req("In")], &l));
        assert!(!selects(None, [req("NotIn")], &l));
        assert!(selects(None, [req("Exists")], &l));
        assert!(!selects(None, [req("DoesNotExist")], &l));
        assert!(!selects(None, [req("Bogus")], &l));
        assert!(!selects(Some(&labels(&[("app", "db")])), [], &l));
    }
}
