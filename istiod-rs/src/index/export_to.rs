//! `exportTo` of ServiceEntries (`spec.exportTo`) and Services (annotation
//! `networking.istio.io/exportTo`, comma-separated).
//!
//! Upstream's ambient index does not apply it: the workload API Services it
//! builds from either kind never read it (istio/istio
//! pilot/pkg/serviceregistry/kube/controller/ambient/services.go:
//! `serviceEntriesInfo`, `constructServiceEntries`, `serviceServiceBuilder`,
//! `constructService`), and every ztunnel is sent every service. That is a
//! known, still open limitation (istio/istio#55163; the change that would
//! have carried it to ztunnel, istio/istio#59653, was closed unmerged). We
//! do the same: the value is kept on the object, never changes what is
//! served, and is reported:
//!
//! - a value upstream's validation refuses (istio/istio
//!   pkg/config/validation/validation.go `validateExportTo`): not `.`, `*`,
//!   `~` or a namespace name (a DNS-1123 label); the same entry twice (`.`
//!   and the object's own namespace count as the same); `*` or `~` with
//!   other entries: [`PolicyProblem::InvalidValue`] naming the object, the
//!   field and the entry;
//! - a valid value that restricts visibility (anything but `*` alone):
//!   [`PolicyProblem::NotHonoured`], so the owner learns that clients of
//!   every namespace still reach the service.
//!
//! `~` ("no one") is accepted on both kinds (upstream's validation allows
//! it for ServiceEntries; the Service annotation is not validated there).

use std::collections::BTreeSet;

use super::{Effect, PolicyProblem, PolicyRef};
use crate::provision::render::dns1123_label;

/// The Service annotation.
pub(super) const ANNOTATION: &str = "networking.istio.io/exportTo";

/// Checks one object's `exportTo` (`values` as written, `field` how to name
/// it) and reports as the module says.
pub(super) fn check(
    object: &PolicyRef,
    field: &str,
    values: &[&str],
    problems: &mut Vec<PolicyProblem>,
) {
    if values.is_empty() {
        return;
    }
    let namespace = object.key.namespace.as_str();
    let mut seen = BTreeSet::new();
    let mut invalid = |value: &str, expected: &'static str| {
        problems.push(PolicyProblem::InvalidValue {
            object: object.clone(),
            field: field.to_string(),
            value: value.to_string(),
            expected,
            effect: Effect::ExportToNotApplied,
        });
    };
    let mut valid = true;
    for v in values {
        if !matches!(*v, "." | "*" | "~") && !dns1123_label(v) {
            invalid(v, "\".\", \"*\", \"~\" or a namespace name");
            valid = false;
            continue;
        }
        let same = if *v == "." { namespace } else { v };
        if !seen.insert(same) {
            invalid(v, "each namespace once (\".\" is the object's own)");
            valid = false;
        }
    }
    for alone in ["*", "~"] {
        if values.len() > 1 && values.contains(&alone) {
            invalid(
                &values.join(","),
                "\"*\" or \"~\" alone, not with other entries",
            );
            valid = false;
        }
    }
    if valid && values != ["*"] {
        problems.push(PolicyProblem::NotHonoured {
            object: object.clone(),
            field: field.to_string(),
            reason: format!("{:?} restricts who sees the service", values.join(",")),
            effect: Effect::ExportToNotApplied,
        });
    }
}

/// The entries of the Service annotation, as upstream splits it.
pub(super) fn annotation_values(value: &str) -> Vec<&str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::manifest::Kind;

    fn problems(values: &[&str]) -> Vec<String> {
        let object = PolicyRef::new(Kind::ServiceEntry, "shop", "ext");
        let mut out = Vec::new();
        check(&object, "spec.exportTo", values, &mut out);
        out.iter()
            .map(|p| format!("{} {}", p.reason(), p))
            .collect()
    }

    #[test]
    fn public_or_nothing_is_silent() {
        assert!(problems(&[]).is_empty());
        assert!(problems(&["*"]).is_empty());
    }

    #[test]
    fn a_valid_restriction_is_reported_as_not_applied() {
        for values in [&["."][..], &["~"], &["shop", "billing"]] {
            let got = problems(values);
            assert_eq!(got.len(), 1, "{values:?}: {got:?}");
            assert!(
                got[0].starts_with("not_honoured ServiceEntry shop/ext: spec.exportTo: \""),
                "{got:?}"
            );
            assert!(
                got[0].contains("served to clients of every namespace"),
                "{got:?}"
            );
        }
    }

    #[test]
    fn bad_entries_are_named() {
        let got = problems(&["Bad_NS", ".", "shop", "*"]);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].contains("\"Bad_NS\""), "{got:?}");
        assert!(
            got[1].contains("\"shop\"") && got[1].contains("each namespace once"),
            "{got:?}"
        );
        assert!(got[2].contains("alone"), "{got:?}");
        assert!(
            got.iter()
                .all(|p| p.starts_with("invalid_value ServiceEntry shop/ext: spec.exportTo"))
        );
    }

    #[test]
    fn the_annotation_is_split_on_commas() {
        assert_eq!(annotation_values(" a, b ,,c"), vec!["a", "b", "c"]);
    }
}
