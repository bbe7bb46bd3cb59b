//! The manifests' one templating rule: `${key}` is replaced by the value of
//! `key`. Nothing else (no conditionals, no loops): the manifests stay the
//! YAML a reader sees, and the values ([`crate::values`]) are checked
//! scalars, so a value cannot change the structure it lands in.

/// Why a template could not be rendered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("{file}:{line}: `${{{key}}}` names no value")]
    UnknownKey {
        file: String,
        line: usize,
        key: String,
    },
    #[error("{file}:{line}: `${{` without its closing `}}`")]
    Unclosed { file: String, line: usize },
}

/// `text` (the file `file`) with every `${key}` replaced by `value(key)`.
pub fn render(
    file: &str,
    text: &str,
    value: &dyn Fn(&str) -> Option<String>,
) -> Result<String, RenderError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let line = 1 + text[..text.len() - rest.len() + start]
            .matches('\n')
            .count();
        let after = &rest[start + 2..];
        let Some(end) = after.find('}').filter(|end| !after[..*end].contains('\n')) else {
            return Err(RenderError::Unclosed {
                file: file.to_string(),
                line,
            });
        };
        let key = &after[..end];
        match value(key) {
            Some(v) => out.push_str(&v),
            None => {
                return Err(RenderError::UnknownKey {
                    file: file.to_string(),
                    line,
                    key: key.to_string(),
                });
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(key: &str) -> Option<String> {
        match key {
            "tag" => Some("0.1.0".into()),
            "istiod.replicas" => Some("2".into()),
            _ => None,
        }
    }

    #[test]
    fn replaces_every_key() {
        let text = "image: \"hub/istiod-rs:${tag}\"\nreplicas: ${istiod.replicas}\n# ${tag}\n";
        assert_eq!(
            render("f.yaml", text, &lookup).unwrap(),
            "image: \"hub/istiod-rs:0.1.0\"\nreplicas: 2\n# 0.1.0\n"
        );
        assert_eq!(
            render("f.yaml", "no keys $ {}\n", &lookup).unwrap(),
            "no keys $ {}\n"
        );
    }

    #[test]
    fn unknown_and_unclosed_keys_name_their_line() {
        assert_eq!(
            render("f.yaml", "a: 1\nb: ${tga}\n", &lookup),
            Err(RenderError::UnknownKey {
                file: "f.yaml".into(),
                line: 2,
                key: "tga".into()
            })
        );
        assert_eq!(
            render("f.yaml", "a: ${tag}\n\nb: ${tag\n}\n", &lookup),
            Err(RenderError::Unclosed {
                file: "f.yaml".into(),
                line: 3
            })
        );
        assert_eq!(
            RenderError::UnknownKey {
                file: "f".into(),
                line: 1,
                key: "x".into()
            }
            .to_string(),
            "f:1: `${x}` names no value"
        );
    }
}
