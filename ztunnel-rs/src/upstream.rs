//! Running in upstream's ztunnel DaemonSet unchanged: its command line
//! (`ztunnel proxy ztunnel`, or no argument at all) and the environment
//! variables it sets, checked against upstream's `src/main.rs` (the
//! command), `src/config.rs` (`construct_config`: the variable names and how
//! each is read) and `manifests/charts/ztunnel/templates/daemonset.yaml` in
//! istio/istio (what the DaemonSet sets). README's "Upstream names" table is
//! the user-facing list.

use std::ffi::OsString;

use proxy_core::upstream_env::{EnvAlias, alias_args};

/// Upstream variables read as our flags (ours, when set, win).
pub const ALIASES: &[EnvAlias] = &[
    // Upstream reads ISTIO_META_CLUSTER_ID before CLUSTER_ID.
    EnvAlias {
        upstream: "ISTIO_META_CLUSTER_ID",
        ours: None,
        flag: "--cluster-id",
    },
    EnvAlias {
        upstream: "INPOD_UDS",
        ours: Some("ZDS_SOCKET"),
        flag: "--zds-socket",
    },
    // Upstream's token source; a file path here (upstream also takes a
    // literal token, which we refuse: the file is re-read on rotation).
    EnvAlias {
        upstream: "AUTH_TOKEN",
        ours: Some("TOKEN_FILE"),
        flag: "--token-file",
    },
    // One root verifies istiod and every HBONE peer here; upstream can
    // take the xDS and CA roots apart.
    EnvAlias {
        upstream: "XDS_ROOT_CA",
        ours: Some("CA_ROOT_CA"),
        flag: "--root-cert",
    },
    EnvAlias {
        upstream: "ALT_XDS_HOSTNAME",
        ours: Some("XDS_SERVER_NAME"),
        flag: "--istiod-server-name",
    },
    EnvAlias {
        upstream: "SECRET_TTL",
        ours: Some("CERTIFICATE_TTL"),
        flag: "--certificate-ttl",
    },
    EnvAlias {
        upstream: "CONNECTION_TERMINATION_DEADLINE",
        ours: Some("DRAIN_DEADLINE"),
        flag: "--drain-deadline",
    },
    EnvAlias {
        upstream: "ENABLE_ORIG_SRC",
        ours: Some("ENABLE_ORIGINAL_SOURCE"),
        flag: "--original-source",
    },
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "PROXY_MODE={0:?}: ztunnel-rs runs only as the node's shared proxy (PROXY_MODE=shared, upstream's default)"
    )]
    ProxyMode(String),
    #[error(
        "INPOD_ENABLED={0:?}: ztunnel-rs only proxies pods from inside their network namespaces (INPOD_ENABLED=true)"
    )]
    InPod(String),
    #[error("TERMINATION_GRACE_PERIOD_SECONDS={0:?} is not a number of seconds")]
    GracePeriod(String),
}

/// Our command line for `argv` as upstream's DaemonSet runs it: no
/// argument means `proxy` (upstream's default command), and the upstream
/// variables that are set become flags right after `proxy`. Other commands
/// are left as they are.
pub fn proxy_argv(
    mut argv: Vec<OsString>,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<OsString>, Error> {
    if argv.len() == 1 {
        argv.push("proxy".into());
    }
    if argv.get(1).is_none_or(|command| command != "proxy") {
        return Ok(argv);
    }
    let set = |name: &str| lookup(name).filter(|v| !v.is_empty());
    if let Some(mode) = set("PROXY_MODE").filter(|m| m != "shared") {
        return Err(Error::ProxyMode(mode));
    }
    if let Some(inpod) = set("INPOD_ENABLED").filter(|v| !v.eq_ignore_ascii_case("true")) {
        return Err(Error::InPod(inpod));
    }
    let mut flags = alias_args(ALIASES, lookup);
    // Upstream: CONNECTION_TERMINATION_DEADLINE, else the pod's grace
    // period less a margin (5 s, or 1 s for a grace period of 10 s or
    // less, at least 1 s) to cut what is left before the kubelet's SIGKILL.
    let explicit = set("DRAIN_DEADLINE").or_else(|| set("CONNECTION_TERMINATION_DEADLINE"));
    if let (None, Some(grace)) = (explicit, set("TERMINATION_GRACE_PERIOD_SECONDS")) {
        let secs: u64 = grace
            .trim()
            .parse()
            .map_err(|_| Error::GracePeriod(grace))?;
        let margin = if secs > 10 { 5 } else { 1 };
        flags.push(format!(
            "--drain-deadline={}s",
            secs.saturating_sub(margin).max(1)
        ));
    }
    let rest = argv.split_off(2);
    argv.extend(flags.into_iter().map(OsString::from));
    argv.extend(rest);
    Ok(argv)
}

/// `ZTUNNEL_WORKER_THREADS` as upstream reads it: a number, or a
/// percentage of the CPU limit (`ZTUNNEL_CPU_LIMIT`, which upstream's
/// DaemonSet sets from the container's limit, else the machine's cores),
/// rounded up, at least 1.
pub fn worker_threads(value: &str, cpu_limit: Option<&str>) -> Result<usize, String> {
    let Some(percent) = value.trim().strip_suffix('%') else {
        return value
            .trim()
            .parse()
            .map_err(|e| format!("{value:?} is neither a number nor a percentage: {e}"));
    };
    let percent: f64 = percent
        .parse()
        .map_err(|e| format!("{value:?}: invalid percentage: {e}"))?;
    if !(percent > 0.0 && percent <= 100.0) {
        return Err(format!(
            "{value:?}: a percentage must be over 0 and at most 100"
        ));
    }
    let cpus = match cpu_limit.map(str::trim).filter(|s| !s.is_empty()) {
        Some(limit) => limit
            .parse::<usize>()
            .map_err(|e| format!("ZTUNNEL_CPU_LIMIT={limit:?}: {e}"))?,
        None => std::thread::available_parallelism().map_or(1, usize::from),
    };
    Ok(((cpus as f64 * percent / 100.0).ceil() as usize).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(argv: &[&str], env: &[(&str, &str)]) -> Result<Vec<String>, Error> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let argv = argv.iter().map(OsString::from).collect();
        proxy_argv(argv, &|name| env.get(name).cloned())
            .map(|argv| argv.into_iter().map(|a| a.into_string().unwrap()).collect())
    }

    #[test]
    fn the_upstream_daemonset_command_and_environment_become_our_flags() {
        let env = [
            ("CA_ADDRESS", "istiod.istio-system.svc:15012"),
            ("ISTIO_META_CLUSTER_ID", "east"),
            ("CLUSTER_ID", "ignored-as-upstream"),
            ("INPOD_ENABLED", "true"),
            ("INPOD_UDS", "/run/z.sock"),
            ("TERMINATION_GRACE_PERIOD_SECONDS", "30"),
        ];
        assert_eq!(
            run(&["ztunnel-rs", "proxy", "ztunnel"], &env).unwrap(),
            [
                "ztunnel-rs",
                "proxy",
                "--cluster-id=east",
                "--zds-socket=/run/z.sock",
                "--drain-deadline=25s",
                "ztunnel"
            ]
        );
        // No argument: upstream's default command.
        assert_eq!(run(&["ztunnel-rs"], &[]).unwrap(), ["ztunnel-rs", "proxy"]);
        // Our own variable wins over upstream's.
        assert_eq!(
            run(
                &["ztunnel-rs", "proxy"],
                &[("INPOD_UDS", "/a"), ("ZDS_SOCKET", "/b")]
            )
            .unwrap(),
            ["ztunnel-rs", "proxy"]
        );
        // The node agent's command is not the proxy's.
        assert_eq!(
            run(&["ztunnel-rs", "cni", "--x"], &[("INPOD_UDS", "/a")]).unwrap(),
            ["ztunnel-rs", "cni", "--x"]
        );
    }

    #[test]
    fn grace_period_leaves_a_margin_before_the_kill() {
        let deadline = |grace: &str| {
            run(
                &["z", "proxy"],
                &[("TERMINATION_GRACE_PERIOD_SECONDS", grace)],
            )
        };
        assert_eq!(deadline("30").unwrap()[2], "--drain-deadline=25s");
        assert_eq!(deadline("5").unwrap()[2], "--drain-deadline=4s");
        assert_eq!(deadline("1").unwrap()[2], "--drain-deadline=1s");
        assert_eq!(
            deadline("soon").unwrap_err(),
            Error::GracePeriod("soon".into())
        );
        // An explicit deadline, ours or upstream's, wins.
        let explicit = run(
            &["z", "proxy"],
            &[
                ("TERMINATION_GRACE_PERIOD_SECONDS", "30"),
                ("CONNECTION_TERMINATION_DEADLINE", "7s"),
            ],
        )
        .unwrap();
        assert_eq!(explicit, ["z", "proxy", "--drain-deadline=7s"]);
    }

    #[test]
    fn modes_we_do_not_run_are_refused_by_name() {
        assert_eq!(
            run(&["z", "proxy"], &[("PROXY_MODE", "dedicated")]).unwrap_err(),
            Error::ProxyMode("dedicated".into())
        );
        assert!(run(&["z", "proxy"], &[("PROXY_MODE", "shared")]).is_ok());
        assert_eq!(
            run(&["z", "proxy"], &[("INPOD_ENABLED", "false")]).unwrap_err(),
            Error::InPod("false".into())
        );
    }

    #[test]
    fn worker_threads_take_a_number_or_a_share_of_the_cpu_limit() {
        assert_eq!(worker_threads("3", None), Ok(3));
        assert_eq!(worker_threads("50%", Some("4")), Ok(2));
        assert_eq!(worker_threads("10%", Some("4")), Ok(1));
        assert_eq!(worker_threads("100%", Some("3")), Ok(3));
        assert!(worker_threads("0%", Some("4")).is_err());
        assert!(worker_threads("150%", Some("4")).is_err());
        assert!(worker_threads("many", None).is_err());
        assert!(worker_threads("50%", Some("two")).is_err());
    }
}
