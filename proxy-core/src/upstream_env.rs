//! Upstream Istio's names for settings we share, read as ours.
//!
//! ztunnel-rs and istiod-rs stand in for upstream's ztunnel and istiod, so
//! they must start from upstream's manifests unchanged: the environment
//! variables those set (`INPOD_UDS`, `ISTIO_META_CLUSTER_ID`,
//! `TERMINATION_GRACE_PERIOD_SECONDS`, ...) mean the same here. Each binary
//! lists its mapping; [`alias_args`] turns the upstream variables that are
//! set into our command-line flags, placed before the user's own arguments:
//! a flag on the command line still wins (the binaries let a later flag
//! override an earlier one), and so does our own variable when both are set.

/// One upstream environment variable read as one of our flags.
#[derive(Clone, Copy, Debug)]
pub struct EnvAlias {
    /// Upstream's variable.
    pub upstream: &'static str,
    /// Our variable for the same setting; when it is set, it wins. None
    /// where upstream's name is read before ours, as upstream does (e.g.
    /// `ISTIO_META_CLUSTER_ID` before `CLUSTER_ID`).
    pub ours: Option<&'static str>,
    /// Our flag (with its leading `--`).
    pub flag: &'static str,
}

/// `--flag=value` for every alias whose upstream variable is set (and not
/// empty) while ours is not, in the order given; `lookup` reads the
/// environment (`std::env::var(name).ok()` in the binaries).
pub fn alias_args(aliases: &[EnvAlias], lookup: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
    let set = |name: &str| lookup(name).filter(|v| !v.is_empty());
    aliases
        .iter()
        .filter(|a| a.ours.is_none_or(|ours| set(ours).is_none()))
        .filter_map(|a| set(a.upstream).map(|value| format!("{}={value}", a.flag)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn upstream_names_become_flags_unless_ours_are_set() {
        let env: HashMap<&str, &str> = [
            ("INPOD_UDS", "/var/run/ztunnel/ztunnel.sock"),
            ("SECRET_TTL", "12h"),
            ("CERTIFICATE_TTL", "1h"),
            ("AUTH_TOKEN", ""),
        ]
        .into();
        let lookup = |name: &str| env.get(name).map(|v| v.to_string());
        let aliases = [
            EnvAlias {
                upstream: "INPOD_UDS",
                ours: Some("ZDS_SOCKET"),
                flag: "--zds-socket",
            },
            EnvAlias {
                upstream: "SECRET_TTL",
                ours: Some("CERTIFICATE_TTL"),
                flag: "--certificate-ttl",
            },
            EnvAlias {
                upstream: "AUTH_TOKEN",
                ours: Some("TOKEN_FILE"),
                flag: "--token-file",
            },
        ];
        assert_eq!(
            alias_args(&aliases, &lookup),
            ["--zds-socket=/var/run/ztunnel/ztunnel.sock"]
        );
    }
}
