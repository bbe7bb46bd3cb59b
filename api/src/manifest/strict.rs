//! Strict field validation, as `kubectl apply --validate=strict` and the API
//! server's `fieldValidation=Strict` do it: a field the object's schema does
//! not have (`rule:` for `rules:`) refuses the object instead of silently
//! dropping what the user meant.
//!
//! The typed objects are the schema: their deserializers skip fields they do
//! not know, and `serde_ignored` reports the path of every field skipped. No
//! second description of the schema is kept here.

use serde::de::DeserializeOwned;

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// A field path as Kubernetes prints it: `spec.rules[0].to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct FieldPath(Vec<Step>);

impl FieldPath {
    fn of(path: &serde_ignored::Path<'_>) -> FieldPath {
        fn walk(path: &serde_ignored::Path<'_>, steps: &mut Vec<Step>) {
            use serde_ignored::Path;
            match path {
                Path::Root => {}
                Path::Seq { parent, index } => {
                    walk(parent, steps);
                    steps.push(Step::Index(*index));
                }
                Path::Map { parent, key } => {
                    walk(parent, steps);
                    steps.push(Step::Key(key.clone()));
                }
                Path::Some { parent }
                | Path::NewtypeStruct { parent }
                | Path::NewtypeVariant { parent } => walk(parent, steps),
            }
        }
        let mut steps = Vec::new();
        walk(path, &mut steps);
        FieldPath(steps)
    }

    /// `apiVersion` and `kind` at the top: read from the document's header,
    /// and not fields of the custom resources' generated types.
    fn is_type_field(&self) -> bool {
        matches!(&self.0[..], [Step::Key(k)] if k == "apiVersion" || k == "kind")
    }
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, step) in self.0.iter().enumerate() {
            match step {
                Step::Key(key) if i == 0 => f.write_str(key)?,
                Step::Key(key) => write!(f, ".{key}")?,
                Step::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// Decodes `body` into `T`, returning the fields `T` does not have.
pub(super) fn decode<T: DeserializeOwned>(
    body: &str,
) -> Result<(T, Vec<FieldPath>), serde_saphyr::Error> {
    let mut unknown = Vec::new();
    let value = serde_saphyr::with_deserializer_from_str(body, |de| {
        serde_ignored::deserialize(de, |path| {
            let path = FieldPath::of(&path);
            if !path.is_type_field() {
                unknown.push(path);
            }
        })
    })?;
    Ok((value, unknown))
}

/// The line (0-based, within `body`) that holds `path`, for block-style YAML
/// (what people write by hand); as deep as the path can be followed, `None`
/// when not even its first key is found (flow style, `{...}`).
pub(super) fn line_of(body: &str, path: &FieldPath) -> Option<usize> {
    let lines: Vec<Line<'_>> = body
        .lines()
        .enumerate()
        .filter_map(|(n, text)| Line::parse(n, text))
        .collect();
    let mut block = &lines[..];
    let mut found = None;
    for step in &path.0 {
        let Some(first) = block.first() else { break };
        let position = match step {
            Step::Key(key) => block
                .iter()
                .position(|l| l.key == Some(key.as_str()) && l.key_indent == first.key_indent),
            Step::Index(index) => {
                let item_indent = first.item_indent;
                block
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| item_indent.is_some() && l.item_indent == item_indent)
                    .nth(*index)
                    .map(|(i, _)| i)
            }
        };
        let Some(at) = position else { break };
        let line = &block[at];
        found = Some(line.number);
        // What lies under this step: deeper lines (or a sequence written
        // at its key's indentation), up to the next sibling.
        block = match step {
            Step::Key(_) => {
                let indent = line.key_indent;
                let rest = &block[at + 1..];
                let end = rest
                    .iter()
                    .position(|l| {
                        l.indent() < indent || (l.indent() == indent && l.item_indent.is_none())
                    })
                    .unwrap_or(rest.len());
                &rest[..end]
            }
            Step::Index(_) => {
                let indent = line.item_indent.unwrap_or_default();
                let rest = &block[at..];
                let end = rest[1..]
                    .iter()
                    .position(|l| l.indent() <= indent)
                    .map_or(rest.len(), |e| e + 1);
                &rest[..end]
            }
        };
    }
    found
}

/// A line that holds content: where its `- ` item marker and its key are.
#[derive(Debug)]
struct Line<'a> {
    number: usize,
    item_indent: Option<usize>,
    key_indent: usize,
    key: Option<&'a str>,
}

impl<'a> Line<'a> {
    fn parse(number: usize, text: &'a str) -> Option<Line<'a>> {
        let content = text.trim_start_matches(' ');
        if content.is_empty() || content.starts_with('#') {
            return None;
        }
        let mut indent = text.len() - content.len();
        let mut rest = content;
        let mut item_indent = None;
        while let Some(after) =
            rest.strip_prefix("- ")
                .or(if rest == "-" { Some("") } else { None })
        {
            item_indent.get_or_insert(indent);
            let trimmed = after.trim_start_matches(' ');
            indent += rest.len() - trimmed.len();
            rest = trimmed;
        }
        let key = rest
            .split_once(':')
            .filter(|(_, v)| v.is_empty() || v.starts_with(' '))
            .map(|(k, _)| k.trim_matches(|c| c == '"' || c == '\''))
            .filter(|k| !k.is_empty() && !k.starts_with(['{', '[']));
        Some(Line {
            number,
            item_indent,
            key_indent: indent,
            key,
        })
    }

    /// Where the line starts: its item marker, else its key.
    fn indent(&self) -> usize {
        self.item_indent.unwrap_or(self.key_indent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(steps: &[&str]) -> FieldPath {
        FieldPath(
            steps
                .iter()
                .map(|s| match s.parse() {
                    Ok(i) => Step::Index(i),
                    Err(_) => Step::Key(s.to_string()),
                })
                .collect(),
        )
    }

    #[test]
    fn paths_print_as_kubernetes_does() {
        assert_eq!(
            path(&["spec", "rules", "0", "to"]).to_string(),
            "spec.rules[0].to"
        );
    }

    const POLICY: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: p
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from:
    - source:
        principals: [a]
  - to:
    - operation:
        ports: [\"80\"]
        port: [\"81\"]
    rule: {}
  name: x
";

    #[test]
    fn finds_the_line_of_a_field() {
        let at = |steps: &[&str]| line_of(POLICY, &path(steps)).map(|l| l + 1);
        assert_eq!(at(&["spec", "name"]), Some(16));
        assert_eq!(at(&["metadata", "name"]), Some(4));
        assert_eq!(at(&["spec", "rules", "1", "rule"]), Some(15));
        assert_eq!(
            at(&["spec", "rules", "1", "to", "0", "operation", "port"]),
            Some(14)
        );
        assert_eq!(
            at(&["spec", "rules", "0", "from", "0", "source", "principals"]),
            Some(10)
        );
        // Flow style: the deepest line found.
        assert_eq!(at(&["spec", "selector", "matchLabelz"]), Some(6));
        assert_eq!(at(&["status"]), None);
    }

    #[test]
    fn reports_unknown_fields_with_their_paths() {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Spec {
            rules: Vec<Rule>,
        }
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Rule {
            to: Option<String>,
        }
        let (_, unknown) =
            decode::<Spec>("kind: X\nrules:\n- to: a\n- too: b\nrule: []\n").unwrap();
        let unknown: Vec<String> = unknown.iter().map(ToString::to_string).collect();
        assert_eq!(unknown, ["rules[1].too", "rule"]);
    }
}
